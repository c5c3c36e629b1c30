"""Tiny configurations and a quiet trainer, shared by the test suite and the benchmarks.

A 4-block, width-32 ViT on 32 x 40 images trains a step in milliseconds on a CPU, which is what
tests and quick benchmark runs need; the quiet trainer drops everything that prints or writes
(logger, checkpoints, progress bar, model summary, sanity check) so that only what a caller asks
for happens.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L

__all__ = ["QUIET_TRAINER", "TINY_VIT", "quiet_trainer", "tiny_vit"]

TINY_VIT: dict[str, Any] = {
    "name": "vit_small_patch16_224",
    "model_kwargs": {
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 4,
        "num_heads": 2,
        "img_size": [32, 40],
    },
    "indices": [0, 1, 2, 3],
}
"""An encoder config (:class:`~lightning_simo.models.encoders.EncoderConfig` keys) of a tiny ViT."""

QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}
"""Trainer options that turn off every output Lightning makes by default."""


def tiny_vit(**model_kwargs: Any) -> dict[str, Any]:
    """A fresh copy of :data:`TINY_VIT` with ``model_kwargs`` overridden."""
    config = copy.deepcopy(TINY_VIT)
    config["model_kwargs"].update(model_kwargs)
    return config


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """A ``Trainer`` with :data:`QUIET_TRAINER` (``overrides`` win)."""
    return L.Trainer(**{**QUIET_TRAINER, **overrides})
