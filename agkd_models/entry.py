"""The ``agkd`` command's entry point: the command itself (:mod:`agkd_models.cli`) needs
the ``train`` extra, and without it says so in one line instead of a traceback."""
from __future__ import annotations

import sys
from typing import List, Optional

# The train extra's modules, by import name (pyproject.toml, [project.optional-dependencies]).
TRAIN_MODULES = ("torchvision", "timm", "numpy", "yaml", "tqdm", "sklearn", "matplotlib")


def missing_train_extra(exc: ModuleNotFoundError) -> bool:
    """Whether ``exc`` is a module of the train extra not being installed."""
    return (exc.name or "").split(".")[0] in TRAIN_MODULES


def main(argv: Optional[List[str]] = None) -> int:
    try:
        from agkd_models.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if missing_train_extra(exc):
            print(f"agkd: the trainer needs the 'train' extra ({exc.name} is not installed): "
                  f"pip install --no-build-isolation 'agkd[train]' (or '.[train]' from a checkout)", file=sys.stderr)
            return 2
        raise
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
