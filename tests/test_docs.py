"""The examples in agkd_ops' docstrings run as written and print what they show."""
import doctest
import importlib

import pytest

MODULES = ["agkd_ops", "agkd_ops.functional", "agkd_ops.losses"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
