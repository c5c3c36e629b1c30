"""Straightforward implementations of the data-free merge methods, the way their reference code
computes them: every task vector materialised as a full state dict first, per-key stacks, zero-
padded SVD bases, ``diag`` products, autograd for WUDI, double ``argsort`` for DELLA's ranks.

They follow the conventions of FusionBench (``task_singular_vector``, ``isotropic_merging``,
``tall_mask``, ``magmax``, ``model_stock``, ``wudi``) and mergekit (``sparsify.py``,
``generalized_task_arithmetic.py``), written afresh from those descriptions. They are the ground
truth of ``tests/test_merge_*.py`` and the baseline of ``benchmarks/merge_speed.py --methods``.

Each function takes ``(pretrained, finetuned, **options)`` and returns a full state dict: merged
floating-point tensors in ``pretrained``'s dtypes, everything else copied from ``pretrained``.
Computation happens in float32, or float64 when an input is float64.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "REFERENCES",
    "breadcrumbs_reference",
    "consensus_reference",
    "della_reference",
    "iso_c_reference",
    "iso_cts_reference",
    "magmax_reference",
    "model_stock_reference",
    "tsv_reference",
    "wudi_reference",
]

State = Mapping[str, Tensor]


def _dtype(pretrained: State, finetuned: Sequence[State]) -> torch.dtype:
    wide = any(sd[k].dtype == torch.float64 for sd in [pretrained, *finetuned] for k in sd)
    return torch.float64 if wide else torch.float32


def _task_vectors(pretrained: State, finetuned: Sequence[State]) -> list[dict[str, Tensor]]:
    dtype = _dtype(pretrained, finetuned)
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    return [{k: ft[k].to(dtype) - pretrained[k].to(dtype) for k in keys} for ft in finetuned]


def _add(pretrained: State, merged_tv: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    out = {}
    for key, value in pretrained.items():
        if key in merged_tv:
            out[key] = (value.to(merged_tv[key].dtype) + scaling * merged_tv[key]).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def _mean(tvs: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    return torch.stack([tv[key] for tv in tvs]).mean(dim=0)


# ----------------------------------------------------------------------------- FusionBench


def tsv_reference(
    pretrained: State,
    finetuned: Sequence[State],
    scaling: float = 1.0,
    task_weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """TSV-M: zero-padded (m x k) / (k x n) bases, each task's int(k / T) triplets in its block,
    both bases whitened by the U V^T of their SVD, multi_dot with diag(S)."""
    tvs = _task_vectors(pretrained, finetuned)
    if task_weights is not None:
        tvs = [{k: v * w for k, v in tv.items()} for tv, w in zip(tvs, task_weights)]
    n_tasks = len(tvs)
    merged = {}
    for key in tvs[0]:
        if tvs[0][key].dim() != 2:
            merged[key] = _mean(tvs, key)
            continue
        sum_u = sum_s = sum_vh = None
        for i, tv in enumerate(tvs):
            u, s, vh = torch.linalg.svd(tv[key], full_matrices=False)
            if sum_u is None:
                sum_u, sum_s, sum_vh = (
                    torch.zeros_like(u),
                    torch.zeros_like(s),
                    torch.zeros_like(vh),
                )
            r = int(s.shape[0] * (1 / n_tasks))
            sum_u[:, i * r : (i + 1) * r] = u[:, :r]
            sum_s[i * r : (i + 1) * r] = s[:r]
            sum_vh[i * r : (i + 1) * r, :] = vh[:r, :]
        u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
        u_v, _, vh_v = torch.linalg.svd(sum_vh, full_matrices=False)
        merged[key] = torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_v, vh_v))
    return _add(pretrained, merged, scaling)


def iso_c_reference(pretrained: State, finetuned: Sequence[State], scaling: float = 1.0):
    """Iso-C: SVD of the summed task vectors with all singular values set to their mean."""
    tvs = _task_vectors(pretrained, finetuned)
    merged = {}
    for key in tvs[0]:
        total = torch.stack([tv[key] for tv in tvs]).sum(dim=0)
        if total.dim() == 2:
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            merged[key] = torch.linalg.multi_dot((u, torch.diag(torch.full_like(s, s.mean())), vh))
        else:
            merged[key] = total / len(tvs)
    return _add(pretrained, merged, scaling)


def iso_cts_reference(
    pretrained: State,
    finetuned: Sequence[State],
    scaling: float = 1.0,
    common_fraction: float = 0.8,
):
    """Iso-CTS: common subspace of the sum, task-specific subspaces after projecting it out,
    bases in one (m x k) / (k x n) block each, whitened, isotropic spectrum."""
    tvs = _task_vectors(pretrained, finetuned)
    n_tasks = len(tvs)
    merged = {}
    for key in tvs[0]:
        if tvs[0][key].dim() != 2:
            merged[key] = _mean(tvs, key)
            continue
        k = min(tvs[0][key].shape)
        common = int(k * common_fraction)
        common = k - round((k - common) / n_tasks) * n_tasks
        per_task = int((k - common) / n_tasks)
        u, s, vh = torch.linalg.svd(sum(tv[key] for tv in tvs), full_matrices=False)
        cu, cs, cvh = u[:, :common], s[:common], vh[:common, :]
        big_u, big_s, big_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        for i, tv in enumerate(tvs):
            w = tv[key] - cu @ cu.T @ tv[key]
            ut, st, vht = torch.linalg.svd(w, full_matrices=False)
            big_u[:, i * per_task : (i + 1) * per_task] = ut[:, :per_task]
            big_s[i * per_task : (i + 1) * per_task] = st[:per_task]
            big_vh[i * per_task : (i + 1) * per_task, :] = vht[:per_task, :]
        start = n_tasks * per_task
        big_u[:, start : start + common] = cu
        big_s[start : start + common] = cs
        big_vh[start : start + common, :] = cvh
        a, _, b = torch.linalg.svd(big_u, full_matrices=False)
        c, _, d = torch.linalg.svd(big_vh, full_matrices=False)
        spectrum = torch.diag(torch.full_like(big_s, big_s.mean()))
        merged[key] = torch.linalg.multi_dot((a @ b, spectrum, c @ d))
    return _add(pretrained, merged, scaling)


def _ties_vector(tvs: Sequence[Mapping[str, Tensor]], density: float, merge_rule: str) -> dict:
    """The flat TIES of ``merge_speed.py`` applied around a zero theta_0: its merged task vector."""
    spec = importlib.util.spec_from_file_location(
        "merge_speed", Path(__file__).with_name("merge_speed.py")
    )
    assert spec is not None and spec.loader is not None
    merge_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_speed)
    zero = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    return merge_speed.reference_ties_flat(zero, tvs, density, 1.0, merge_rule)


def consensus_reference(
    pretrained: State,
    finetuned: Sequence[State],
    k: int = 2,
    tall_lambda: float | Sequence[float] = 0.6,
    base: str = "task_arithmetic",
    scaling: float = 1.0,
    density: float = 0.2,
    merge_rule: str = "sum",
    base_vector: Mapping[str, Tensor] | None = None,
):
    """Consensus: TALL masks on flattened weights (|theta_0 - theta_t| > lambda |theta_mt - theta_t|),
    the multi-task vector kept where at least k masks agree. ``base: ties`` uses global TIES
    (``density`` / ``merge_rule``), or ``base_vector`` when given (the TIES task vector computed
    elsewhere, so this reference does not depend on one TIES top-k convention)."""
    tvs = _task_vectors(pretrained, finetuned)
    keys = list(tvs[0])
    lambdas = list(tall_lambda) if isinstance(tall_lambda, Sequence) else [tall_lambda] * len(tvs)
    dtype = tvs[0][keys[0]].dtype
    flat_ptm = torch.cat([pretrained[key].to(dtype).reshape(-1) for key in keys])
    flat_ft = torch.stack(
        [torch.cat([ft[key].to(dtype).reshape(-1) for key in keys]) for ft in finetuned]
    )
    if base == "ties":
        multi_sd = (
            base_vector if base_vector is not None else _ties_vector(tvs, density, merge_rule)
        )
        multi = torch.cat([multi_sd[key].reshape(-1) for key in keys])
    else:
        multi = (flat_ft - flat_ptm).sum(dim=0)
    flat_multi = flat_ptm + multi
    votes = torch.zeros_like(multi)
    for t in range(len(tvs)):
        mask = (flat_ptm - flat_ft[t]).abs() > (flat_multi - flat_ft[t]).abs() * lambdas[t]
        votes += mask.float()
    merged_flat = multi * (votes >= k)
    merged, offset = {}, 0
    for key in keys:
        size = pretrained[key].numel()
        merged[key] = merged_flat[offset : offset + size].reshape(pretrained[key].shape)
        offset += size
    return _add(pretrained, merged, scaling)


def magmax_reference(pretrained: State, finetuned: Sequence[State], scaling: float = 0.5):
    """MagMax: fold the task vectors keeping the larger magnitude, later task on ties."""
    tvs = _task_vectors(pretrained, finetuned)
    merged = {k: v.clone() for k, v in tvs[0].items()}
    for tv in tvs[1:]:
        for key, value in tv.items():
            merged[key] = torch.where(value.abs() >= merged[key].abs(), value, merged[key])
    return _add(pretrained, merged, scaling)


def model_stock_reference(pretrained: State, finetuned: Sequence[State]):
    """Model Stock: per key, mean pairwise angle in degrees, t = T cos / ((T - 1) cos + 1 + eps),
    merged = t * mean(theta_t) + (1 - t) * theta_0."""
    eps = 1e-8
    dtype = _dtype(pretrained, finetuned)
    out = {}
    n = len(finetuned)
    for key, base in pretrained.items():
        if not base.is_floating_point():
            out[key] = base.clone()
            continue
        w0 = base.to(dtype)
        thetas = [ft[key].to(dtype) for ft in finetuned]
        angles = []
        for i in range(n):
            for j in range(i + 1, n):
                v1, v2 = thetas[i] - w0, thetas[j] - w0
                cos = torch.sum(v1 * v2) / (math.sqrt(torch.sum(v1**2) * torch.sum(v2**2)) + eps)
                angles.append(math.degrees(float(torch.acos(cos.clamp(-1, 1)))))
        angle = math.radians(sum(angles) / len(angles))
        ratio = n * math.cos(angle) / ((n - 1) * math.cos(angle) + 1 + eps)
        average = torch.stack(thetas).mean(dim=0)
        out[key] = (average * ratio + w0 * (1 - ratio)).to(base.dtype)
    return out


def wudi_reference(
    pretrained: State,
    finetuned: Sequence[State],
    iterations: int = 400,
    lr: float = 1e-5,
    scaling: float = 1.0,
):
    """WUDI: Adam through autograd on sum_t ||(M - tau_t) tau_t^T||^2 / ||tau_t||^2 from the sum."""
    tvs = _task_vectors(pretrained, finetuned)
    merged = {}
    for key in tvs[0]:
        stack = torch.stack([tv[key] for tv in tvs])
        if stack.dim() != 3:
            merged[key] = stack.mean(dim=0)
            continue
        param = torch.nn.Parameter(stack.sum(dim=0))
        optimizer = torch.optim.Adam([param], lr=lr, weight_decay=0)
        norms = torch.square(torch.norm(stack.reshape(stack.shape[0], -1), p=2, dim=-1))
        for _ in range(iterations):
            with torch.enable_grad():
                product = torch.matmul(param.unsqueeze(0) - stack, stack.transpose(1, 2))
                loss = torch.sum(torch.square(product) / norms[:, None, None])
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
        merged[key] = param.detach()
    return _add(pretrained, merged, scaling)


# ----------------------------------------------------------------------------- mergekit


def breadcrumbs_reference(
    pretrained: State,
    finetuned: Sequence[State],
    density: float = 0.9,
    gamma: float = 0.01,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
):
    """Breadcrumbs: per tensor, stable ascending sort of |tau|, keep sorted[n_bot : n - n_top]
    (mergekit slices ``[n_bot:-n_top]``, empty when n_top is 0); weighted sum; lambda."""
    tvs = _task_vectors(pretrained, finetuned)
    weights = [1.0] * len(tvs) if weights is None else list(weights)
    merged = {}
    for key in tvs[0]:
        deltas = []
        for tv in tvs:
            tensor = tv[key]
            n = tensor.numel()
            if density < 1:
                target, n_top = int(density * n), int(gamma * n)
                n_bot = n - target - n_top
                if n_bot < 0:
                    n_top, n_bot = n_top + n_bot, 0
                order = torch.sort(tensor.abs().reshape(-1), stable=True).indices
                mask = torch.zeros(n, dtype=tensor.dtype)
                mask[order[n_bot : n - n_top]] = 1
                tensor = tensor * mask.reshape(tensor.shape)
            deltas.append(tensor)
        stack = torch.stack(deltas)
        w = torch.tensor(weights, dtype=stack.dtype).reshape(-1, *([1] * (stack.dim() - 1)))
        merged[key] = (stack * w).sum(dim=0)
    return _add(pretrained, merged, scaling)


def della_reference(
    pretrained: State,
    finetuned: Sequence[State],
    draws: Callable[[int, str, torch.Size, torch.dtype], Tensor],
    density: float = 0.7,
    epsilon: float = 0.15,
    scaling: float = 1.0,
):
    """DELLA: ranks along dim 1 by double argsort (1-based), p = density - eps + 2 eps * rank_norm,
    keep where ``draws(task, key) < p`` (a Bernoulli draw from given uniforms), one L1 rescale per
    tensor, then "sum" sign consensus (sum >= 0 -> +1), mean of agreeing values, lambda."""
    tvs = _task_vectors(pretrained, finetuned)
    merged = {}
    for key in tvs[0]:
        deltas = []
        for task, tv in enumerate(tvs):
            tensor = tv[key]
            if density < 1:
                rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor
                ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(rows.dtype) + 1
                low, high = (
                    ranks.min(dim=1, keepdim=True).values,
                    ranks.max(dim=1, keepdim=True).values,
                )
                if rows.shape[1] == 1:
                    norm = torch.full_like(rows, 0.5)
                else:
                    norm = ((ranks - low) / (high - low)).clamp(0, 1)
                probs = (density - epsilon) + norm * 2 * epsilon
                mask = (
                    draws(task, key, tensor.shape, tensor.dtype) < probs.reshape(tensor.shape)
                ).to(tensor.dtype)
                masked = tensor * mask
                before, after = tensor.abs().sum(), masked.abs().sum()
                tensor = masked if before < 1e-7 or after < 1e-7 else masked * (before / after)
            deltas.append(tensor)
        stack = torch.stack(deltas)
        majority = (stack.sum(dim=0) >= 0).to(stack.dtype) * 2 - 1
        mask = stack.sign() == majority
        total = (stack * mask).sum(dim=0)
        divisor = mask.to(stack.dtype).sum(dim=0)
        divisor[divisor == 0] = 1
        merged[key] = total / divisor
    return _add(pretrained, merged, scaling)


REFERENCES: dict[str, Callable[..., dict[str, Tensor]]] = {
    "tsv": tsv_reference,
    "iso_c": iso_c_reference,
    "iso_cts": iso_cts_reference,
    "consensus": consensus_reference,
    "magmax": magmax_reference,
    "model_stock": model_stock_reference,
    "breadcrumbs": breadcrumbs_reference,
    "della": della_reference,
    "wudi": wudi_reference,
}
