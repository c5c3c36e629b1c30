"""Shared fixtures: tiny encoders and tiny synthetic data so every test runs in seconds on CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network

TINY_VIT = {
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


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def tiny_vit() -> dict:
    return {**TINY_VIT, "model_kwargs": dict(TINY_VIT["model_kwargs"])}
