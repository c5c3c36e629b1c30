"""RNGStateCheckpoint: keep the random number generators in checkpoints, for exact resumes.

Lightning restores weights, optimizer, schedulers and loop counters on resume, but not the global
random generators: a resumed run shuffles its training data, seeds its loader workers (and with
them the augmentation of each worker), and draws dropout or masks from a generator that
``seed_everything`` has just reset, not from where the interrupted run was. With this callback the
Python, NumPy and torch (CPU and CUDA) generator states are saved in every checkpoint and put
back when the run resumes, so a run resumed from an end-of-epoch checkpoint repeats the
uninterrupted run exactly (see ``tests/test_resume.py``).

Together with the training loaders of :mod:`lightning_simo.data.sampling` (order and augmentation
drawn from the seed, the epoch and the sample, never from these generators) this holds for
checkpoints taken inside an epoch as well (``InterruptionCheckpoint`` saves one where a signal
stopped the run; see ``tests/test_faults.py``).
States are stored as tensors and plain lists so the checkpoint still loads with
``torch.load(weights_only=True)``. Under DDP every rank resumes from rank 0's states.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

__all__ = ["RNGStateCheckpoint", "get_rng_states", "set_rng_states"]


def get_rng_states() -> dict[str, Any]:
    """The Python, NumPy and torch generator states, as tensors, lists and numbers."""
    version, state, gauss = random.getstate()
    # the legacy global generator is the one seed_everything seeds and libraries draw from
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`get_rng_states` returned."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = states["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    legacy = (npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(legacy)  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(L.Callback):
    """Save the global random generator states in checkpoints and restore them on resume."""

    def state_dict(self) -> dict[str, Any]:
        return get_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict)
