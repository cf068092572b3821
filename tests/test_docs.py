"""The examples in agkd_ops' docstrings run as written and print what they show."""
import doctest
import importlib
from pathlib import Path

import torch

import pytest

MODULES = ["agkd_ops", "agkd_ops.functional", "agkd_ops.losses"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"


def test_the_readme_training_loop_runs_and_scales_a_constant_map_to_zero_gradient():
    """The README's "Use in a training loop" block, run as written on tiny stand-in models."""
    import warnings
    from pathlib import Path

    import torch

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python\nimport torch\nimport agkd_ops\n\ndef minmax")
    block = text[start + len("```python\n"):text.index("```", start + 10)]
    torch.manual_seed(0)
    conv, head = torch.nn.Conv2d(3, 112, 3, stride=2, padding=1), torch.nn.Linear(112, 10)
    scope = {
        "student": lambda x: (head(conv(x).mean((2, 3))), conv(x)),
        "teacher": lambda x: (torch.randn(x.shape[0], 10), torch.rand(x.shape[0], 1, 28, 28)),
        "loader": [(torch.randn(4, 3, 28, 28), torch.randint(0, 10, (4,))) for _ in range(2)],
        "optimizer": torch.optim.SGD([*conv.parameters(), *head.parameters()], lr=0.1),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated name, no silent conversion
        exec(block, scope)
    assert torch.isfinite(scope["loss"])
    constant = torch.zeros(2, 1, 5, 5, requires_grad=True)
    scope["minmax"](constant).sum().backward()
    assert torch.equal(constant.grad, torch.zeros_like(constant))


def test_the_readme_logit_family_block_runs():
    """The README's logit-KD family block, run as written."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### The logit-KD family"):]
    block = section[section.index("```python") + len("```python"):]
    block = block[:block.index("```")]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["student"].grad is not None and torch.isfinite(scope["student"].grad).all()
