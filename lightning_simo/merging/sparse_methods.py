"""Sparsifying data-free merging after mergekit: Model Breadcrumbs and DELLA.

References (conventions followed exactly, code not copied): mergekit ``mergekit/sparsify.py``
(``magnitude_outliers``, ``della_magprune``, ``rescaled_masked_tensor``) and
``mergekit/merge_methods/generalized_task_arithmetic.py`` (``breadcrumbs``: no sign consensus,
no normalisation, no rescale; ``della``: TIES "sum" sign consensus, normalised, L1 rescale).

* Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
  ECCV 2024.
* Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
  Sampling", 2024.

mergekit defaults ``density`` to 1 (no sparsification); the defaults here sparsify (0.9 for
Breadcrumbs, 0.7 for DELLA); ``gamma`` 0.01 and ``epsilon`` 0.15 are mergekit's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_simo.merging.data_free import optional_per_task, per_task
from lightning_simo.merging.methods import (
    MergeInputs,
    Option,
    _accumulate,
    _density,
    _drop_rate,
    _integer,
    _non_negative,
    _stable_seed,
    _validate,
    register_merge_method,
)

__all__ = ["breadcrumbs_mask", "della_keep_probabilities", "della_prune", "lowest_ranks"]

_RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale below this L1 norm


def lowest_ranks(magnitude: Tensor, count: int) -> Tensor:
    """Mask of the ``count`` smallest entries of a flat tensor, ties broken by position (the
    order of a stable ascending sort), found with one selection instead of a sort."""
    n = magnitude.numel()
    if count <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if count >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    value = magnitude.kthvalue(count).values
    below = magnitude < value
    tied = magnitude == value
    need = count - int(below.sum())
    if int(tied.sum()) > need:
        tied &= tied.cumsum(0) <= need
    return below | tied


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """mergekit's ``magnitude_outliers`` mask: drop the ``int(gamma n)`` largest magnitudes and
    enough of the smallest to keep ``int(density n)`` entries (fewer large ones are dropped when
    both do not fit). Ranks follow a stable ascending sort of ``|tau|``.

    One deviation: mergekit slices ``sorted[n_bot:-n_top]``, which is empty when ``n_top`` is 0
    (tensors smaller than ``1 / gamma``), so it zeroes those task vectors entirely; here they keep
    their ``int(density n)`` largest entries, as the method describes."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top += bottom
        bottom = 0
    magnitude = tau.abs().reshape(-1)
    mask = lowest_ranks(magnitude, n - top) & ~lowest_ranks(magnitude, bottom)
    return mask.reshape(tau.shape)


def _breadcrumbs(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """Model Breadcrumbs: each task vector loses its largest outliers and its smallest entries
    (per tensor), then ``theta_0 + scaling * sum_t weight_t * tau_t`` (mergekit's ``lambda``)."""
    weights = per_task(options["weights"], inputs, "breadcrumbs", "weights")
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        taus = inputs.task_vectors(key)
        kept = []
        for task, tau in enumerate(taus):
            tau.masked_fill_(~breadcrumbs_mask(tau, options["density"], options["gamma"]), 0.0)
            kept.append(tau if weights is None else tau.mul_(weights[task]))
        out[key] = inputs.scaled(key, _accumulate(kept), options["scaling"])
    return out


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probability per entry: from ``density - epsilon`` (smallest magnitude) to
    ``density + epsilon`` (largest), linear in the magnitude rank along dimension 1 (mergekit
    ranks rows of matrices, and along axis 1 of higher-dimensional tensors; vectors are one row).
    Where that dimension has one entry mergekit divides 0 by 0; here it gets ``density``."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    width = rows.shape[1]
    if width == 1:
        return torch.full_like(tau, density)
    order = rows.abs().argsort(dim=1, stable=True)
    shape = [1] * rows.dim()
    shape[1] = width
    positions = torch.arange(width, dtype=tau.dtype, device=tau.device).reshape(shape)
    # one sort and a scatter give the ranks (mergekit sorts twice); the rest is mergekit's
    # expression, operation for operation, so the probabilities are bit-identical
    ranks = torch.empty_like(rows).scatter_(1, order, positions.expand_as(rows))
    rank_norm = (ranks / (width - 1)).clamp_(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tau.shape)


def della_prune(tau: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with its DELLA probability, then one L1-preserving rescale of the whole
    tensor (``|tau|_1 / |kept|_1``, skipped below 1e-7), not ``1 / p`` per entry."""
    if density >= 1:
        return tau
    probabilities = della_keep_probabilities(tau, density, epsilon)
    # Drawn on the CPU so the mask does not depend on the device the tensors live on.
    draws = torch.rand(tau.shape, generator=generator, dtype=tau.dtype).to(tau.device)
    # 1 where draws < probabilities, else 0: float kernels (boolean masks cost several times more)
    kept = tau * torch.sign(probabilities.sub_(draws)).relu_()
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept.mul_(before / after)


def _della(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """DELLA: magnitude-ranked random pruning (:func:`della_prune`), then TIES-style sign
    consensus as mergekit's ``della``: the elected sign is that of the summed pruned vectors
    (+1 where the sum is 0), and each entry is the mean of the pruned values with that sign.
    Result ``theta_0 + scaling * merged``. The mask of task ``t`` at ``key`` comes from a
    generator seeded with a stable hash of ``(seed, t, key)``, so merges are reproducible."""
    density, epsilon = options["density"], options["epsilon"]
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        pruned = []
        for task, tau in enumerate(inputs.task_vectors(key)):
            generator = torch.Generator().manual_seed(_stable_seed(options["seed"], task, key))
            pruned.append(della_prune(tau, density, epsilon, generator))
        # mergekit's reductions over the stacked tasks: an elected sign decided by a sum near 0
        # must not depend on the order of additions
        stack = torch.stack(pruned)
        del pruned
        # +1 where the sum is >= 0, else -1 (sign(sign(x) + 0.5)), then each value's magnitude
        # where it carries that sign: same-signed sums equal the sign times their magnitudes'
        elected = torch.sign(torch.sign(stack.sum(dim=0)).add_(0.5))
        agreeing = stack.mul_(elected).relu_()
        count = torch.sign(agreeing).sum(dim=0).clamp_(min=1)
        total = agreeing.sum(dim=0).mul_(elected).add_(0.0)  # + 0.0: no negative zeros
        out[key] = inputs.scaled(key, total.div_(count), options["scaling"])
    return out


_BREADCRUMBS_OPTIONS = {
    "density": Option(0.9, _density),
    "gamma": Option(0.01, _drop_rate),
    "scaling": Option(1.0, _non_negative),
    "weights": Option(None, optional_per_task),
}
_DELLA_OPTIONS = {
    "density": Option(0.7, _density),
    "epsilon": Option(0.15, _drop_rate),
    "scaling": Option(1.0, _non_negative),
    "seed": Option(0, _integer),
}


def _validate_della(options: Mapping[str, Any]) -> dict[str, Any]:
    result = _validate("della", _DELLA_OPTIONS, options)
    density, epsilon = result["density"], result["epsilon"]
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(
            f"option 'epsilon' of merge method 'della' must keep density - epsilon > 0 and "
            f"density + epsilon < 1, got epsilon {epsilon!r} with density {density!r}"
        )
    return result


register_merge_method("breadcrumbs", _breadcrumbs, options=_BREADCRUMBS_OPTIONS)
register_merge_method("della", _della, options=_DELLA_OPTIONS, validate=_validate_della)
