"""Data-based merge methods: RegMean and Fisher merging, as pure functions of gathered statistics.

Both need statistics of each task's own fine-tuned model on data; the MergeCallback gathers them
(:mod:`lightning_simo.merging.statistics`) and passes them as the ``grams`` / ``fishers`` option,
so these functions stay pure and can be called from a notebook with statistics computed anywhere.

Formulas follow FusionBench (``regmean.merging_with_regmean_weights``,
``fisher_merging.merging_with_fisher_weights``, after MergeLM):

- ``regmean`` (Jin et al., 2023): for the weight ``W_t`` (``out x in``) of every linear layer
  with Gram matrices ``G_t`` of its inputs, ``W = (Σ_t G'_t)^-1 Σ_t G'_t W_t^T`` transposed, where
  ``G'`` keeps the diagonal and multiplies the off-diagonal entries by ``reduce_non_diagonal``
  (1 = plain RegMean, 0 = diagonal only). Every other tensor is the mean of the fine-tuned ones.
- ``fisher`` (Matena & Raffel, 2022): ``θ = Σ_t c_t F_t θ_t / Σ_t c_t F_t`` per coordinate, with
  ``F_t`` the diagonal Fisher plus ``minimal_weight``; ``c_t`` are ``scaling_coefficients``
  (default 1/T each), multiplied when ``normalize`` by ``(1/‖F_t‖) / Σ_s (1/‖F_s‖)`` (the L2
  norm of each task's raw Fisher over all its tensors, plus ``minimal_weight``). Tensors without
  a Fisher (buffers) take the mean.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_simo.merging.methods import (
    MergeInputs,
    Option,
    _Invalid,
    register_merge_method,
)

__all__ = ["REGMEAN_STATISTIC", "FISHER_STATISTIC", "reduce_non_diagonal"]

REGMEAN_STATISTIC = "grams"
FISHER_STATISTIC = "fishers"


def _unit_interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise _Invalid("a number in [0, 1]")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise _Invalid("an integer >= 1")
    return int(value)


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise _Invalid("a number > 0")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _statistics(value: Any) -> list[dict[str, Tensor]] | None:
    if value is None:
        return None
    if isinstance(value, Mapping) or not isinstance(value, Sequence):
        raise _Invalid("one {key: tensor} mapping per task")
    return [dict(v) for v in value]


def _coefficients(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        raise _Invalid("null or one number > 0 per task")
    return [_positive(v) for v in value]


def _require(statistics: list[dict[str, Tensor]] | None, name: str, method: str, n: int) -> list:
    if statistics is None:
        raise ValueError(
            f"merge method {method!r} needs the {name!r} statistics of each task: use it through "
            f"the MergeCallback (merge.method: {method}, which gathers them on training images), "
            f"or pass {name}=[...] (one mapping per task) to merge()."
        )
    if len(statistics) != n:
        raise ValueError(f"{method}: got {len(statistics)} {name} for {n} fine-tuned models")
    return statistics


def reduce_non_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """``gram`` with its off-diagonal entries multiplied by ``ratio`` (the diagonal kept)."""
    scale = torch.full_like(gram, ratio)
    scale.diagonal().fill_(1.0)
    return gram * scale


def _mean(inputs: MergeInputs, key: str) -> Tensor:
    thetas = inputs.thetas(key)
    total = thetas[0].clone()
    for theta in thetas[1:]:
        total += theta
    return total / inputs.n_tasks


def _regmean(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    grams = _require(options[REGMEAN_STATISTIC], REGMEAN_STATISTIC, "regmean", inputs.n_tasks)
    ratio = options["reduce_non_diagonal"]
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        if not all(key in g for g in grams) or inputs.pretrained[key].dim() != 2:
            out[key] = inputs.finish(key, _mean(inputs, key))
            continue
        reduced = [reduce_non_diagonal(g[key].to(inputs.dtype), ratio) for g in grams]
        weights = inputs.thetas(key)
        if reduced[0].shape[0] != weights[0].shape[1]:
            raise ValueError(
                f"regmean: the Gram matrix for {key!r} is {tuple(reduced[0].shape)}, but the "
                f"weight takes inputs of size {weights[0].shape[1]}"
            )
        total = sum(reduced[1:], reduced[0])
        rhs = sum((g @ w.T for g, w in zip(reduced[1:], weights[1:])), reduced[0] @ weights[0].T)
        merged = torch.linalg.solve(total, rhs)  # (Σ G)^-1 Σ G W^T, without forming the inverse
        out[key] = inputs.finish(key, merged.T)
    return out


def _fisher(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    fishers = _require(options[FISHER_STATISTIC], FISHER_STATISTIC, "fisher", inputs.n_tasks)
    eps = options["minimal_weight"]
    coefficients = options["scaling_coefficients"]
    if coefficients is None:
        coefficients = [1.0 / inputs.n_tasks] * inputs.n_tasks
    if len(coefficients) != inputs.n_tasks:
        raise ValueError(
            f"fisher: got {len(coefficients)} scaling_coefficients for {inputs.n_tasks} tasks"
        )
    weighted = [k for k in inputs.keys if all(k in f for f in fishers)]
    c = torch.tensor(coefficients, dtype=inputs.dtype)
    if options["normalize"]:
        norms = torch.stack(
            [
                torch.stack([f[k].to(inputs.dtype).norm() for k in weighted]).norm()
                if weighted
                else torch.zeros((), dtype=inputs.dtype)
                for f in fishers
            ]
        )
        inverse = 1.0 / (norms + eps)
        c = c * inverse / inverse.sum()
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        if key not in weighted:
            out[key] = inputs.finish(key, _mean(inputs, key))
            continue
        thetas = inputs.thetas(key)
        f = [
            fishers[t][key].to(device=thetas[0].device, dtype=inputs.dtype) + eps
            for t in range(inputs.n_tasks)
        ]
        numerator = sum(c[t] * f[t] * thetas[t] for t in range(inputs.n_tasks))
        denominator = sum(c[t] * f[t] for t in range(inputs.n_tasks))
        out[key] = inputs.finish(key, numerator / denominator)
    return out


register_merge_method(
    "regmean",
    _regmean,
    options={
        "reduce_non_diagonal": Option(0.95, _unit_interval),
        "samples": Option(256, _positive_int),
        REGMEAN_STATISTIC: Option(None, _statistics),
    },
)
register_merge_method(
    "fisher",
    _fisher,
    options={
        "samples": Option(256, _positive_int),
        "normalize": Option(True, _flag),
        "minimal_weight": Option(1e-6, _positive),
        "scaling_coefficients": Option(None, _coefficients),
        FISHER_STATISTIC: Option(None, _statistics),
    },
)
