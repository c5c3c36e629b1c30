"""The one set of state-dict operations: tau_t = theta_t - theta_0, theta_0 + alpha * tau, casting.

Every merge method, the MergeCallback, the analysis sweeps and layer-wise merging go through
:func:`compute_dtype` (the casting rule), :func:`add_scaled` (theta_0 + alpha * tau, the only
place it is written) and the state-dict forms :func:`task_vector` / :func:`apply_task_vector`.

The casting rule: arithmetic runs in float32, or float64 as soon as one input is float64; bf16 /
fp16 differences are not representable in their own dtype, so subtracting there would lose the
task vector. Results are cast back to theta_0's dtype and device at the end (``cast_like``).

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
    "add_scaled",
    "apply_task_vector",
    "cast_like",
    "check_compatible",
    "compute_dtype",
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


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any of ``tensors`` is float64, else float32 (the casting rule of the module)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def add_scaled(base: Tensor, tau: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
    """``base + alpha * tau`` in :func:`compute_dtype` of the two (a fresh tensor).

    ``alpha`` may be a tensor (a differentiable coefficient, or one coefficient per task already
    contracted into ``tau``). The result is not cast back; see :func:`cast_like`.
    """
    dtype = compute_dtype(base, tau)
    return base.to(dtype) + alpha * tau.to(dtype)


def cast_like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` in ``reference``'s dtype and on its device (the end of every merge)."""
    return value.to(device=reference.device, dtype=reference.dtype)


def apply_task_vector(
    theta0: Mapping[str, Tensor],
    tau: Mapping[str, Tensor],
    alpha: float = 1.0,
    *,
    clamp_running_var: bool = True,
) -> dict[str, Tensor]:
    """``theta_0 + alpha * tau`` for every key of ``theta0``, in theta_0's dtypes.

    Floating-point keys of ``tau`` move (see :func:`add_scaled`); a non-floating key of ``tau``
    (an integer buffer a merge decided on) replaces theta_0's; keys ``tau`` lacks are theta_0's
    own tensors (not copies). BatchNorm running variances are clamped at 0 (``alpha`` above 1 or
    a sum of several vectors can push them negative) unless ``clamp_running_var`` is false.
    """
    out: dict[str, Tensor] = {}
    for key, base in theta0.items():
        if key not in tau:
            out[key] = base
        elif not base.is_floating_point():
            out[key] = tau[key]
        else:
            value = add_scaled(base, tau[key], alpha)
            if clamp_running_var and key.endswith("running_var"):
                value = value.clamp_min(0.0)
            out[key] = cast_like(value, base)
    return out


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
        dtype = compute_dtype(base, other)
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
