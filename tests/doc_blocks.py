"""The fenced code blocks of the README and docs/, and how each kind is run.

* ``python`` blocks run as written. A block that uses names it does not define (a
  ``student``, a ``loader``) names its stand-ins in an HTML comment on the line before the
  fence, ``<!-- docs-test: CONTEXT -->``, invisible when the Markdown is rendered;
  :data:`CONTEXTS` builds them on tiny tensors.
* ``bash`` blocks are command lines: :mod:`tests.test_docs` parses every ``agkd`` command
  with the command's own parser and resolves its configuration, and checks that the other
  commands name files, modules and extras that exist (installing packages or running a
  GPU check is what ``.ci/ops_only`` and ``.ci/gpu`` do).
* ``text`` blocks (diagrams, file trees) are not code, nor are MyST directives
  (`` ```{toctree} ``).

Only torch and agkd_ops are imported here, so that ``.ci/ops_only`` can run the README's
examples in an environment that has nothing else:
``python tests/doc_blocks.py README.md``.
"""
from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("python", "bash", "text")
_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>.*)$")
_CONTEXT = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<name>[\w-]+)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    context: Optional[str]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def documents() -> List[Path]:
    """The README and every Markdown page under docs/ (the site's build folder excepted)."""
    pages = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
    return [ROOT / "README.md"] + pages


def blocks(path: Path) -> List[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening["indent"], opening["info"].strip()
        context_line = _CONTEXT.match(lines[i - 1]) if i > 0 else None
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: a code block that is never closed")
        if not language.startswith("{"):  # a MyST directive ({toctree}) is not code
            found.append(Block(path, i + 1, language, "\n".join(body) + "\n",
                               context_line["name"] if context_line else None))
        i = j + 1
    return found


# ---- stand-ins for the names a block uses but does not define --------------------------------

def _loop_context() -> Dict[str, object]:
    """The README's training loop: a student giving (logits, last-stage features), a frozen
    teacher giving (logits, attention map), two batches and an optimizer."""
    import torch

    torch.manual_seed(0)
    conv, head = torch.nn.Conv2d(3, 112, 3, stride=2, padding=1), torch.nn.Linear(112, 10)

    def student(images):
        features = conv(images)  # (N, 112, 14, 14) for 28 px images
        return head(features.mean((2, 3))), features

    def teacher(images):
        return torch.randn(images.shape[0], 10), torch.rand(images.shape[0], 1, 28, 28)

    return {
        "student": student, "teacher": teacher,
        "loader": [(torch.randn(4, 3, 28, 28), torch.randint(0, 10, (4,))) for _ in range(2)],
        "optimizer": torch.optim.SGD([*conv.parameters(), *head.parameters()], lr=0.1),
    }


def _mixup_context() -> Dict[str, object]:
    """A timm-style loop on 100 classes: student and teacher map images to logits."""
    import torch

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 100))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 100)).eval()
    return {"student": student, "teacher": teacher,
            "loader": [(torch.randn(4, 3, 8, 8), torch.randint(0, 100, (4,))) for _ in range(2)]}


CONTEXTS: Dict[str, Callable[[], Dict[str, object]]] = {
    "standalone": dict,
    "loop": _loop_context,
    "mixup": _mixup_context,
}


def run_python(block: Block) -> Dict[str, object]:
    """Run one python block in a fresh namespace (its stand-ins included) with every
    warning an error, so that an example using a deprecated name fails; the backend the
    block may change is put back afterwards."""
    import agkd_ops

    if block.context is not None and block.context not in CONTEXTS:
        raise ValueError(f"{block.where}: docs-test context {block.context!r} is not one of {sorted(CONTEXTS)}")
    scope = CONTEXTS[block.context or "standalone"]()
    backend = agkd_ops.get_backend()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exec(compile(block.text, block.where, "exec"), scope)
    finally:
        agkd_ops.set_backend(backend)
    return scope


def main(argv: List[str]) -> int:
    """Run the python blocks of the given Markdown files (default: the README)."""
    paths = [Path(p).resolve() for p in argv] or [ROOT / "README.md"]
    count = 0
    for path in paths:
        for block in blocks(path):
            if block.language == "python":
                run_python(block)
                count += 1
                print(f"ran {block.where}")
    if count == 0:
        print("no python blocks found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
