"""Random encoders for the merge-method tests, and the reference implementations to compare with.

The state dicts mimic a small ViT/CNN: 2-D weights of several shapes (tall, wide, square),
biases, norms, a conv kernel, a position embedding and an integer buffer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "method_references.py"
_spec = importlib.util.spec_from_file_location("method_references", _PATH)
assert _spec is not None and _spec.loader is not None
references = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(references)

SHAPES = {
    "patch_embed.proj.weight": (8, 3, 2, 2),
    "patch_embed.proj.bias": (8,),
    "pos_embed": (1, 5, 8),
    "blocks.0.norm1.weight": (8,),
    "blocks.0.attn.qkv.weight": (24, 8),
    "blocks.0.attn.qkv.bias": (24,),
    "blocks.0.attn.proj.weight": (8, 8),
    "blocks.0.mlp.fc1.weight": (20, 8),
    "blocks.0.mlp.fc2.weight": (8, 20),
    "norm.bias": (8,),
}
SCALE = 0.1  # task-vector scale


def random_encoders(
    n_tasks: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    pretrained = {k: torch.randn(s, generator=generator, dtype=dtype) for k, s in SHAPES.items()}
    pretrained["bn.num_batches_tracked"] = torch.tensor(7)
    finetuned = []
    for task in range(n_tasks):
        state = {
            k: v + SCALE * torch.randn(v.shape, generator=generator, dtype=dtype)
            for k, v in pretrained.items()
            if v.is_floating_point()
        }
        state["bn.num_batches_tracked"] = torch.tensor(100 + task)
        finetuned.append(state)
    return pretrained, finetuned


def assert_close_states(
    actual: dict[str, Tensor], expected: dict[str, Tensor], tolerance: float = 1e-5
) -> None:
    """Same keys, dtypes and integer buffers; floats equal to ``tolerance`` of the task-vector
    scale."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        if value.is_floating_point():
            error = float((actual[key].double() - value.double()).abs().max())
            assert error <= tolerance * SCALE, (key, error)
        else:
            assert torch.equal(actual[key], value), key


def assert_bad_option(method: str, options: dict, message: str) -> None:
    """Merging with ``options`` fails with one line matching ``message``."""
    from lightning_simo.merging import merge

    pretrained, finetuned = random_encoders()
    with pytest.raises(ValueError, match=message) as info:
        merge(pretrained, finetuned, method, **options)
    assert "\n" not in str(info.value)
