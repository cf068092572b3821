"""Seeding, and every random generator's state as checkpointable tensors and numbers, so
that a resumed run draws what an uninterrupted one would have drawn."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators from one integer (``train.seed`` plus
    offsets per rank and epoch, which may pass NumPy's 2**32 limit: it takes the residue)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)


def rng_state() -> Dict[str, Any]:
    """Python's, NumPy's, torch's and (where there is one) CUDA's generator states, in a
    form ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
