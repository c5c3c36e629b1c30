"""Task-vector arithmetic on state dicts: tau_t = theta_t - theta_0, and statistics of them.

Everything here works key by key on ``{name: tensor}`` mappings. Tensors are matched by *name*,
never by position (zipping ``state_dict().values()`` silently misaligns as soon as buffers such
as BatchNorm statistics are present), and nothing ever concatenates a whole model: statistics
such as norms and cosine similarities are accumulated tensor by tensor, so a ViT-B needs no more
than one tensor's worth of extra memory per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_compatible",
    "cosine_similarity_matrix",
    "is_bn_running_stat",
    "norms",
    "task_vector",
    "task_vectors",
]

_BN_STATS = ("running_mean", "running_var")


def is_bn_running_stat(key: str) -> bool:
    """Whether ``key`` names a BatchNorm running statistic (which is not a learned weight)."""
    return key.endswith(_BN_STATS)


def _describe(tensor: Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def check_compatible(
    reference: Mapping[str, Tensor],
    others: Sequence[Mapping[str, Tensor]],
    names: Sequence[str] | None = None,
    reference_name: str = "reference",
) -> None:
    """Raise ``ValueError`` unless every state dict in ``others`` matches ``reference``.

    Matching means the same keys, the same shapes, and floating-point tensors where the reference
    has floating-point tensors (dtypes may differ otherwise, e.g. bf16 fine-tuned vs fp32
    pretrained). The message names the first offending key and checkpoint, so that merging an
    encoder fine-tuned from a different backbone fails loudly instead of producing garbage.

    ``names`` label the ``others`` in messages (default ``checkpoint 0``, ``checkpoint 1`` ...);
    ``reference_name`` labels the reference.
    """
    if names is None:
        names = [f"checkpoint {i}" for i in range(len(others))]
    if len(names) != len(others):
        raise ValueError(f"got {len(names)} names for {len(others)} checkpoints")
    for name, other in zip(names, others):
        for key, ref in reference.items():
            if key not in other:
                raise ValueError(
                    f"key {key!r} of {reference_name!r} is missing from {name!r} "
                    f"({len(other)} keys there vs {len(reference)})"
                )
            value = other[key]
            if value.shape != ref.shape:
                raise ValueError(
                    f"shape mismatch for key {key!r}: {reference_name!r} has "
                    f"{tuple(ref.shape)}, {name!r} has {tuple(value.shape)}"
                )
            if value.is_floating_point() != ref.is_floating_point():
                raise ValueError(
                    f"dtype mismatch for key {key!r}: {reference_name!r} has {_describe(ref)}, "
                    f"{name!r} has {_describe(value)}"
                )
        if len(other) != len(reference):
            extra = next(k for k in other if k not in reference)
            raise ValueError(f"{name!r} has key {extra!r} that {reference_name!r} lacks")


def _delta_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """float64 if either side is float64, else float32: bf16/fp16 differences are not
    representable in their own dtype, so subtracting there would lose the task vector."""
    if torch.float64 in (a.dtype, b.dtype):
        return torch.float64
    return torch.float32


def task_vector(
    pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``theta_t - theta_0`` for every floating-point tensor (integer buffers are skipped).

    Differences are computed and returned in float32 (float64 if an input is float64).
    """
    check_compatible(pretrained, [finetuned], names=["finetuned"], reference_name="pretrained")
    return _difference(pretrained, finetuned)


def _difference(
    pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    vector: dict[str, Tensor] = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            continue
        other = finetuned[key]
        dtype = _delta_dtype(base, other)
        vector[key] = other.to(dtype) - base.to(dtype)
    return vector


def task_vectors(
    pretrained: Mapping[str, Tensor], finetuned_list: Sequence[Mapping[str, Tensor]]
) -> list[dict[str, Tensor]]:
    """:func:`task_vector` for each fine-tuned state dict, after checking them all at once."""
    names = [f"finetuned {i}" for i in range(len(finetuned_list))]
    check_compatible(pretrained, finetuned_list, names=names, reference_name="pretrained")
    return [_difference(pretrained, finetuned) for finetuned in finetuned_list]


def _check_same_keys(vectors: Sequence[Mapping[str, Tensor]]) -> None:
    if vectors:
        names = [f"vector {i}" for i in range(1, len(vectors))]
        check_compatible(vectors[0], vectors[1:], names=names, reference_name="vector 0")


def _gram(vectors: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Pairwise dot products, accumulated in float64 one tensor at a time."""
    _check_same_keys(vectors)
    n = len(vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    if n == 0:
        return gram
    for key in vectors[0]:
        rows = torch.stack([v[key].detach().reshape(-1).to(torch.float64) for v in vectors])
        gram += (rows @ rows.T).cpu()
    return gram


def norms(vectors: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """L2 norm of each task vector over all its tensors, as a float64 tensor of shape ``(n,)``."""
    _check_same_keys(vectors)
    result = torch.zeros(len(vectors), dtype=torch.float64)
    for i, vector in enumerate(vectors):
        total = torch.zeros((), dtype=torch.float64)
        for value in vector.values():
            flat = value.detach().reshape(-1).to(torch.float64)
            total += torch.dot(flat, flat).cpu()
        result[i] = total.sqrt()
    return result


def cosine_similarity_matrix(vectors: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Pairwise cosine similarities of task vectors, a float64 ``(n, n)`` tensor.

    A zero vector has similarity 0 with everything (itself included) instead of NaN, so the
    matrix can be plotted directly.
    """
    gram = _gram(vectors)
    norm = gram.diagonal().clamp(min=0).sqrt()
    denom = norm[:, None] * norm[None, :]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, gram / safe, torch.zeros_like(gram)).clamp(-1.0, 1.0)
