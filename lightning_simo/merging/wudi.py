"""WUDI merging: a data-free optimisation of each merged matrix against the task vectors.

Reference: Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", ICML 2025; FusionBench ``fusion_bench/method/wudi/wudi.py``
(``wudi_merging``), whose conventions are followed exactly (code not copied): start from the sum
of the task vectors, Adam (lr 1e-5, no weight decay) on

    L(M) = sum_t || (M - tau_t) tau_t^T ||_F^2 / || tau_t ||_F^2

for ``iterations`` steps (400 in FusionBench's config), two-dimensional tensors only; every other
floating-point tensor takes the mean task vector. FusionBench adds the result unscaled; ``scaling``
(default 1) is the α the callback searches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_simo.merging.data_free import merge_matrices, positive, positive_integer
from lightning_simo.merging.methods import (
    MergeInputs,
    Option,
    _accumulate,
    _non_negative,
    register_merge_method,
)

__all__ = ["wudi_matrix"]


def wudi_matrix(taus: Sequence[Tensor], iterations: int, lr: float) -> Tensor:
    """Minimise WUDI's loss for one matrix with Adam, from the sum of the task vectors.

    The gradient has a closed form, ``2 (M A - B)`` with ``A = sum_t tau_t^T tau_t / n_t`` and
    ``B = sum_t tau_t tau_t^T tau_t / n_t`` (``n_t = |tau_t|_F^2``), so both are computed once and
    each step costs one ``(m x n) @ (n x n)`` product instead of autograd through ``T`` products
    of size ``m x m``; Adam (``torch.optim.Adam``) then takes exactly the reference's steps. A
    zero task vector, whose term is 0/0 in the reference, contributes nothing.
    """
    merged = _accumulate(taus)
    n = merged.shape[1]
    a = torch.zeros(n, n, dtype=merged.dtype, device=merged.device)
    b = torch.zeros_like(merged)
    for tau in taus:
        norm = float(tau.reshape(-1).dot(tau.reshape(-1)))
        if norm == 0:
            continue
        gram = tau.T @ tau
        a.add_(gram, alpha=1 / norm)
        b.add_(tau @ gram, alpha=1 / norm)
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(iterations):
        merged.grad = torch.addmm(b, merged, a, beta=-2, alpha=2)
        optimizer.step()
    merged.grad = None
    return merged


def _wudi(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """WUDI on each two-dimensional tensor (:func:`wudi_matrix`); mean task vector elsewhere."""
    iterations, lr = options["iterations"], options["lr"]
    return merge_matrices(
        inputs, lambda taus, key: wudi_matrix(taus, iterations, lr), options["scaling"]
    )


register_merge_method(
    "wudi",
    _wudi,
    options={
        "iterations": Option(400, positive_integer),
        "lr": Option(1e-5, positive),
        "scaling": Option(1.0, _non_negative),
    },
)
