"""Progress bars where someone watches them: on a terminal only. Written into a log file
(``agkd demo > log 2>&1``, nohup, a batch scheduler) a bar's carriage-return updates pile
up into one enormous line, so there the callers print one line per epoch instead."""
from __future__ import annotations

import sys
from typing import Iterable

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable, description: str):
    """A tqdm bar over ``iterable`` when standard error is a terminal, else None."""
    if not _is_terminal():
        return None
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False)


def _is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())
