"""The documentation runs as written: agkd_ops' docstring examples, every python block of
the README and docs/ (on tiny stand-ins, tests/doc_blocks.py), and every command line in
their bash blocks (parsed by the `agkd` command's own parser, its configuration resolved;
other commands must name files, modules and extras that exist)."""
import doctest
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

from tests.doc_blocks import LANGUAGES, ROOT, blocks, documents, run_python

MODULES = ["agkd_ops", "agkd_ops.functional", "agkd_ops.losses"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"


ALL_BLOCKS = [block for path in documents() for block in blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language == "python"]
BASH_BLOCKS = [b for b in ALL_BLOCKS if b.language == "bash"]


def test_every_code_block_says_what_it_is():
    """An unlabelled block would be neither run nor checked."""
    unlabelled = [f"{b.where} ({b.language or 'no language'})" for b in ALL_BLOCKS if b.language not in LANGUAGES]
    assert not unlabelled, f"label these blocks one of {LANGUAGES}: {unlabelled}"
    assert len(PYTHON_BLOCKS) >= 6 and len(BASH_BLOCKS) >= 8  # the parser found the pages' blocks


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_block_runs(block):
    scope = run_python(block)
    for name in ("loss", "terms"):
        value = scope.get(name)
        if isinstance(value, torch.Tensor):
            assert torch.isfinite(value).all(), f"{block.where}: {name} is {value}"


def test_the_readme_loop_scales_the_maps_in_the_loss():
    """The front page's loop feeds unit-L2 student maps to SSIM: only correct scaled."""
    (loop,) = [b for b in PYTHON_BLOCKS if b.path.name == "README.md" and b.context == "loop"]
    assert 'scale="minmax"' in loop.text
    scope = run_python(loop)
    assert scope["attention_loss"].scale == "minmax"


# ---- command lines --------------------------------------------------------------------------

def command_lines(block):
    """(line, argv) per command of a bash block: continuations joined, comments dropped,
    leading VAR=value assignments dropped, and a `for V in A B; do ... done` loop's body
    checked with its first value."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    loop_var, commands = None, []
    for number, line in enumerate(joined.splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "for":
            loop_var = (words[1], words[3].rstrip(";"))
            continue
        if words == ["done"]:
            loop_var = None
            continue
        if loop_var:
            words = [w.replace(f"${loop_var[0]}", loop_var[1]) for w in words]
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]
        commands.append((line.strip(), words))
    return commands


def _check_agkd(argv, where):
    from agkd_models.cli import build_parser
    from agkd_models.config import load_config
    from agkd_models.experiments.compare import parse_grid, parse_methods

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `agkd {' '.join(argv)}` does not parse (exit {exc.code})")
    cfg = load_config(args.config, args.set)
    if args.command == "compare":
        parse_methods(args.methods)
        parse_grid(args.grid, cfg)


def _extras():
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


_REPO_PATH = re.compile(r"^(tests|benchmarks|examples|\.ci|docs|agkd_ops|agkd_models|csrc)/")


def _check_repo_paths(words, where):
    for word in words:
        path = word.split("=", 1)[-1]
        if _REPO_PATH.match(path) and not any(c in path for c in "*{$"):
            assert (ROOT / path).exists() or (ROOT / (path + ".py")).exists(), f"{where}: {path} does not exist"


def _check_command(words, where):
    program = Path(words[0]).name
    if program == "agkd":
        return _check_agkd(words[1:], where)
    if program == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "agkd_models.cli", where
        return _check_agkd(words[words.index("-m") + 2:], where)
    if program == "pip" or (program in ("python", "python3") and words[1:3] == ["-m", "pip"]):
        for spec in words:
            extras = re.fullmatch(r"\.\[([\w,]+)\]", spec)
            if extras:
                missing = set(extras[1].split(",")) - _extras()
                assert not missing, f"{where}: pyproject.toml has no extra {missing}"
        return None
    if program in ("python", "python3"):
        if "-m" in words:
            module = words[words.index("-m") + 1]
            if module not in ("pytest", "pip"):
                assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        return _check_repo_paths(words[1:], where)
    if program == "bash":
        assert (ROOT / words[1]).is_file(), f"{where}: no script {words[1]}"
        return _check_repo_paths(words[2:], where)
    if program == "sphinx-build":
        assert (ROOT / "docs" / "conf.py").is_file(), where
        return None
    pytest.fail(f"{where}: tests/test_docs.py does not know how to check `{program}`; teach it")


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=[b.where for b in BASH_BLOCKS])
def test_bash_block_commands_exist_and_parse(block):
    commands = command_lines(block)
    assert commands, f"{block.where}: an empty bash block"
    for line, words in commands:
        for part in _split_on_and(words):
            _check_command(part, f"{block.where}: {line}")


def _split_on_and(words):
    parts = [[]]
    for word in words:
        parts.append([]) if word == "&&" else parts[-1].append(word)
    return [p for p in parts if p]


def test_the_command_checks_can_fail():
    """The checks above catch a typo in a flag, a setting, a method and a file."""
    from agkd_models.config import ConfigError

    from tests.doc_blocks import Block

    def check(text):
        block = Block(ROOT / "README.md", 1, "bash", text, None)
        for line, words in command_lines(block):
            for part in _split_on_and(words):
                _check_command(part, line)

    check("agkd distill --teacher t.pt --method agkd --out runs/x")  # the control: passes
    for bad in ("agkd distill --teacher t.pt --methd agkd", "agkd compare --methods none,lgit",
                "agkd distill --teacher t.pt --set agkd.kd_wieght=1", "bash .ci/no_such_script",
                "python -m benchmarks.no_such_module", "pip install '.[no_such_extra]'",
                "bash .ci/setup && agkd demo --no-such-flag", "no_such_program --help"):
        with pytest.raises((pytest.fail.Exception, AssertionError, ConfigError)):
            check(bad)
