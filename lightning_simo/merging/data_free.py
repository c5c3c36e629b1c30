"""Pieces shared by the data-free merge methods (TSV, Iso-C/CTS, consensus, MagMax, Model Stock,
Breadcrumbs, DELLA, WUDI): option checks they have in common and the per-key building blocks.

The methods themselves live in :mod:`~lightning_simo.merging.svd_methods`,
:mod:`~lightning_simo.merging.mask_methods`, :mod:`~lightning_simo.merging.sparse_methods` and
:mod:`~lightning_simo.merging.wudi`; each registers itself with
:func:`~lightning_simo.merging.methods.register_merge_method`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from lightning_simo.merging.methods import MergeInputs, _accumulate, _Invalid, _real

__all__ = [
    "is_matrix",
    "mean_task_vector",
    "merge_matrices",
    "non_negative_integer",
    "non_negative_or_per_task",
    "optional_per_task",
    "per_task",
    "positive",
    "positive_integer",
]


def is_matrix(inputs: MergeInputs, key: str) -> bool:
    """Whether the SVD-based methods treat ``key`` as a matrix: exactly two dimensions, as in
    FusionBench (conv kernels, embeddings with a leading batch axis, biases and norms are not)."""
    return inputs.pretrained[key].dim() == 2


def mean_task_vector(taus: Sequence[Tensor]) -> Tensor:
    """The mean of the task vectors, the fallback of every SVD-based method for non-matrices."""
    return _accumulate(taus).div_(len(taus))


def merge_matrices(
    inputs: MergeInputs,
    merge_matrix: Callable[[list[Tensor], str], Tensor],
    scaling: float,
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """The loop of the SVD-style methods: ``merge_matrix(taus, key)`` on two-dimensional tensors,
    the mean task vector on every other one, each task vector first scaled by its ``weights``
    entry (if given), and ``theta_0 + scaling * merged`` as the result."""
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        taus = inputs.task_vectors(key)
        if weights is not None:
            taus = [tau.mul_(w) for tau, w in zip(taus, weights)]
        direction = merge_matrix(taus, key) if is_matrix(inputs, key) else mean_task_vector(taus)
        out[key] = inputs.scaled(key, direction, scaling)
    return out


def per_task(values: Sequence[float] | None, inputs: MergeInputs, method: str, option: str):
    """``values`` checked against the number of tasks (``None`` stays ``None``)."""
    if values is not None and len(values) != inputs.n_tasks:
        raise ValueError(
            f"option {option!r} of merge method {method!r} has {len(values)} value(s) for "
            f"{inputs.n_tasks} task(s); give one per task"
        )
    return values


def _finite(value: Any, expected: str) -> float:
    number = _real(value, expected)
    if not math.isfinite(number):
        raise _Invalid(expected)
    return number


def optional_per_task(value: Any) -> tuple[float, ...] | None:
    """``None`` or a list of finite numbers, one per task (the length is checked at merge time)."""
    expected = "null or a list of finite numbers, one per task"
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise _Invalid(expected)
    return tuple(_finite(v, expected) for v in value)


def non_negative_or_per_task(value: Any) -> float | tuple[float, ...]:
    """A finite number >= 0, or a list of them (one per task)."""
    expected = "a finite number >= 0 or a list of them, one per task"
    values = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else None
    if values is not None and not values:
        raise _Invalid(expected)
    numbers = [_finite(v, expected) for v in (values if values is not None else [value])]
    if any(n < 0 for n in numbers):
        raise _Invalid(expected)
    return tuple(numbers) if values is not None else numbers[0]


def positive(value: Any) -> float:
    expected = "a finite number > 0"
    number = _finite(value, expected)
    if number <= 0:
        raise _Invalid(expected)
    return number


def positive_integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid("an integer >= 1")
    return int(value)


def non_negative_integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid("an integer >= 0")
    return int(value)
