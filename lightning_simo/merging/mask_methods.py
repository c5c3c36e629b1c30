"""Element-wise data-free merging: TALL-mask consensus, MagMax, and Model Stock's interpolation.

References (conventions followed exactly, code not copied):

* consensus: Wang et al., "Localizing Task Information for Improved Model Merging and
  Compression", ICML 2024 (code: nik-dim/tall_masks, ``construct_consensus_mask``); TALL masks as
  in FusionBench ``fusion_bench/method/tall_mask/utils.py`` (``generate_task_masks``).
* magmax: Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning",
  ECCV 2024; FusionBench ``fusion_bench/method/magmax/magmax.py``.
* model_stock: Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024;
  FusionBench ``fusion_bench/method/model_stock/model_stock.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_simo.merging.data_free import (
    mean_task_vector,
    non_negative_integer,
    non_negative_or_per_task,
    per_task,
)
from lightning_simo.merging.methods import (
    MERGE_METHODS,
    MergeInputs,
    Option,
    _accumulate,
    _choice,
    _non_negative,
    _validate,
    register_merge_method,
)

__all__ = ["merged_task_vectors", "tall_masks"]

_MODEL_STOCK_EPS = 1e-8  # FusionBench's EPS in the cosine and the ratio


class _KeyView(Mapping[str, Tensor]):
    """A read-only state dict whose tensors are computed on access, one key at a time."""

    def __init__(self, keys: tuple[str, ...], make: Callable[[str], Tensor]) -> None:
        self._keys, self._make = keys, make

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._make(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def merged_task_vectors(
    inputs: MergeInputs, method: str, options: Mapping[str, Any]
) -> dict[str, Tensor]:
    """The task vector another registered method merges to, at full compute precision.

    The method runs on the same task vectors placed around a zero theta_0 held in the compute
    dtype, so its output *is* the merged task vector: nothing is rounded to the checkpoints' dtype
    and no rounded weights are subtracted, whatever the method does internally.
    """
    dtype, keys = inputs.dtype, inputs.keys

    def zero(key: str) -> Tensor:
        return torch.zeros_like(inputs.pretrained[key], dtype=dtype)

    def task_vector(task: int) -> _KeyView:
        theta = inputs.finetuned[task]
        return _KeyView(keys, lambda k: theta[k].to(dtype) - inputs.pretrained[k].to(dtype))

    around_zero = MergeInputs(
        pretrained=_KeyView(keys, zero),
        finetuned=[task_vector(t) for t in range(inputs.n_tasks)],
        keys=keys,
        dtype=dtype,
    )
    return MERGE_METHODS.get(method).fn(around_zero, options)


def tall_masks(
    theta0: Tensor, thetas: list[Tensor], multi: Tensor, lambdas: list[float]
) -> list[Tensor]:
    """TALL masks: task t claims the entries where ``|theta_0 - theta_t| > lambda_t *
    |theta_MTL - theta_t|`` (strictly), ``theta_MTL = theta_0 + multi``. Computed on the weights,
    as FusionBench does, so decisions at the boundary are the reference's own."""
    merged = theta0 + multi
    return [
        (theta0 - theta).abs_() > (merged - theta).abs_().mul_(lam)
        for theta, lam in zip(thetas, lambdas)
    ]


_CONSENSUS_OPTIONS = {
    "k": Option(2, non_negative_integer),
    "tall_lambda": Option(0.6, non_negative_or_per_task),
    "base": Option("task_arithmetic", _choice("task_arithmetic", "ties")),
    "scaling": Option(1.0, _non_negative),
}


def _validate_consensus(options: Mapping[str, Any]) -> dict[str, Any]:
    base = options.get("base", _CONSENSUS_OPTIONS["base"].default)
    spec = dict(_CONSENSUS_OPTIONS)
    context = ""
    if base == "ties":
        ties = {k: v for k, v in MERGE_METHODS.get("ties").options.items() if k != "scaling"}
        # the TALL-mask authors build the consensus TIES vector with the "sum" disjoint merge
        if "merge_rule" in ties:
            ties["merge_rule"] = Option("sum", ties["merge_rule"].check)
        spec.update(ties)
        context = " with base 'ties'"
    return _validate("consensus", spec, options, context)


def _consensus(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """Consensus merging: keep the entries of the multi-task vector (task arithmetic's sum, or the
    TIES vector with ``base: ties``) that at least ``k`` tasks' TALL masks claim.

    ``k = 2`` drops both "catastrophic" (no task) and "selfish" (one task) weights, ``k = 1`` only
    catastrophic ones, ``k = 0`` keeps everything (plain task arithmetic / TIES), ``k > T`` keeps
    nothing. ``tall_lambda`` is the TALL-mask λ, one number or one per task (the authors pick each
    task's λ in 0.2-0.6 on validation data; 0.6 is FusionBench's default). The masks compare
    against the unscaled multi-task vector; ``scaling`` (α) applies to the result.
    """
    lam = options["tall_lambda"]
    lambdas = list(
        per_task(lam, inputs, "consensus", "tall_lambda")
        if isinstance(lam, tuple)
        else [lam] * inputs.n_tasks
    )
    multi: dict[str, Tensor] | None = None
    if options["base"] == "ties":
        ties_options = {k: v for k, v in options.items() if k not in _CONSENSUS_OPTIONS}
        multi = merged_task_vectors(inputs, "ties", {**ties_options, "scaling": 1.0})
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        taus = inputs.task_vectors(key)
        vector = _accumulate(taus) if multi is None else multi.pop(key)
        masks = tall_masks(inputs.theta0(key), inputs.thetas(key), vector, lambdas)
        votes = _accumulate(m.to(torch.int32) for m in masks)
        vector.masked_fill_(votes < options["k"], 0.0)
        out[key] = inputs.scaled(key, vector, options["scaling"])
    return out


def _magmax(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """MagMax: every entry takes the task-vector value of largest magnitude; on equal magnitudes
    the later task wins (the official code's ``>=``). ``scaling`` defaults to 0.5, the official
    8-task reproduction's coefficient (FusionBench's default).

    The running maximum and its magnitude are updated in place, in buffers reused for every
    task: this is a memory-bound fold, and fresh allocations (page faults) would dominate it."""
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        taus = inputs.task_vectors(key)
        best = taus[0]
        best_abs = best.abs()
        magnitude = torch.empty_like(best_abs)
        take = torch.empty_like(best_abs)
        for tau in taus[1:]:
            torch.abs(tau, out=magnitude)
            # take = 1 where |tau| >= |best| else 0, and best = best * (1 - take) + tau * take:
            # float kernels only (boolean masks and where cost several times more on CPUs);
            # one of the two products is a zero, so the sum is the chosen value exactly
            torch.sub(magnitude, best_abs, out=take).sign_().add_(1).clamp_(max=1)
            torch.maximum(magnitude, best_abs, out=best_abs)
            best.mul_(1 - take).add_(tau.mul_(take))
        del taus, best_abs, magnitude, take
        out[key] = inputs.scaled(key, best, options["scaling"])
    return out


def _angle(a: Tensor, b: Tensor, square_a: Tensor, square_b: Tensor) -> float:
    """FusionBench's per-tensor angle in degrees, operation for operation:
    ``acos(<a, b> / (sqrt(|a|^2 |b|^2) + 1e-8))`` clamped, in the tensors' precision."""
    cosine = torch.sum(a * b) / (math.sqrt(square_a * square_b) + _MODEL_STOCK_EPS)
    return math.degrees(float(torch.acos(cosine.clamp(-1.0, 1.0))))


def model_stock_ratio(taus: list[Tensor]) -> float:
    """Model Stock's interpolation ratio ``t = T cos(θ) / ((T - 1) cos(θ) + 1)`` for one tensor,
    θ the mean pairwise angle between the task vectors (angles averaged, not cosines, as
    FusionBench does for more than two models)."""
    n = len(taus)
    squares = [torch.sum(tau**2) for tau in taus]
    angles = [
        _angle(taus[i], taus[j], squares[i], squares[j]) for i in range(n) for j in range(i + 1, n)
    ]
    cos = math.cos(math.radians(sum(angles) / len(angles)))
    return n * cos / ((n - 1) * cos + 1 + _MODEL_STOCK_EPS)


def _model_stock(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """Model Stock: per tensor, ``theta_0 + t * mean(tau)`` (FusionBench's
    ``t * mean(theta) + (1 - t) * theta_0``) with ``t`` from the angle between the task vectors:
    near-orthogonal updates stay close to theta_0, aligned ones move to their average. Needs at
    least two fine-tuned models; there is no α."""
    if inputs.n_tasks < 2:
        raise ValueError(
            f"merge method 'model_stock' needs at least two fine-tuned models, got "
            f"{inputs.n_tasks}; add checkpoints or choose another method"
        )
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        taus = inputs.task_vectors(key)
        ratio = model_stock_ratio(taus)
        out[key] = inputs.scaled(key, mean_task_vector(taus), ratio)
    return out


register_merge_method(
    "consensus", _consensus, options=_CONSENSUS_OPTIONS, validate=_validate_consensus
)
register_merge_method("magmax", _magmax, options={"scaling": Option(0.5, _non_negative)})
register_merge_method("model_stock", _model_stock)
