"""The process's random generators, captured into a checkpoint and restored from it, so that dropout and other
draws after a resume continue as in a run that never stopped."""

from __future__ import annotations

from typing import Any

import torch


def rng_states() -> dict[str, Any]:
    """The process's random generators (torch CPU and CUDA, Python, NumPy) as tensors, ints and lists: what a
    checkpoint holds so that dropout and other draws after a resume continue as in a run that never stopped. Plain
    types, so the file still loads with ``weights_only=True``."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back the generators ``rng_states`` captured."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
