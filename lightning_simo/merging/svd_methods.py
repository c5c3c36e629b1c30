"""SVD-based data-free merging: Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

All three work on the two-dimensional tensors (linear layers, attention projections) and give
every other floating-point tensor (biases, norms, conv kernels, position embeddings) the mean task
vector, as FusionBench does; integer buffers are copied from theta_0 by the engine. The result is
``theta_0 + scaling * merged``, so the callback's α search scales ``merged`` as for task arithmetic.

References (conventions followed exactly, code not copied):

* TSV-M: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025; FusionBench ``fusion_bench/method/task_singular_vector`` (TSVM.py,
  ``TSVM_utils.compute_and_sum_svd_mem_reduction``).
* Iso-C / Iso-CTS: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025; FusionBench ``fusion_bench/method/isotropic_merging``
  (``iso_utils.iso_c`` / ``iso_cts``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_simo.merging.data_free import (
    is_matrix,
    merge_matrices,
    optional_per_task,
    per_task,
)
from lightning_simo.merging.methods import (
    MergeInputs,
    Option,
    _accumulate,
    _density,
    _non_negative,
    register_merge_method,
)

__all__ = ["iso_common_size", "polar", "tsv_share"]


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal factor ``U V^T`` of ``matrix``'s thin SVD: the closest matrix with
    orthonormal columns (rows, if wide). FusionBench uses it to whiten the concatenated bases."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def tsv_share(rank: int, n_tasks: int) -> int:
    """Singular components each task keeps: FusionBench's ``int(rank * (1 / n_tasks))``, a fixed
    1/T share whatever the spectra (0 when a matrix has fewer components than tasks)."""
    return int(rank * (1 / n_tasks))


def _tsv_matrix(taus: Sequence[Tensor]) -> Tensor:
    """Concatenate each task's top singular triplets, whiten both bases, recombine.

    FusionBench pads the concatenation with zero columns up to ``min(shape)``; those columns meet
    zero singular values, so whitening only the filled block gives the same matrix for less work.
    """
    share = tsv_share(min(taus[0].shape), len(taus))
    if share == 0:
        return torch.zeros_like(taus[0])
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :share])
        ss.append(s[:share])
        vhs.append(vh[:share])
        del u, vh
    left, right = polar(torch.cat(us, dim=1)), polar(torch.cat(vhs, dim=0))
    return (left * torch.cat(ss)) @ right


def _tsv(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """TSV-M: per matrix, each task's top ``1/T`` singular components, with the concatenated left
    and right bases replaced by their orthogonal factors (removing inter-task interference),
    recombined with the tasks' singular values. ``task_weights`` scales each task vector before
    the SVD (FusionBench's ``alpha`` given as a list), ``scaling`` the merged one (``alpha`` as a
    number)."""
    weights = per_task(options["task_weights"], inputs, "tsv", "task_weights")
    return merge_matrices(inputs, lambda taus, key: _tsv_matrix(taus), options["scaling"], weights)


def _iso_c(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """Iso-C: per matrix, the SVD of the summed task vectors with every singular value replaced by
    their mean (an isotropic spectrum in the common subspace); other tensors take the mean."""
    out: dict[str, Tensor] = {}
    for key in inputs.keys:
        total = _accumulate(inputs.task_vectors(key))
        if is_matrix(inputs, key):
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            direction = (u * s.mean()) @ vh
        else:
            direction = total.div_(inputs.n_tasks)
        out[key] = inputs.scaled(key, direction, options["scaling"])
    return out


def iso_common_size(rank: int, n_tasks: int, common_fraction: float) -> int:
    """Size of Iso-CTS's common subspace, FusionBench's rule: start from
    ``int(rank * common_fraction)`` and give the rest to the tasks in equal shares, the share
    count rounded with Python's ``round`` (half to even), so the common part absorbs the rest."""
    common = int(rank * common_fraction)
    return rank - round((rank - common) / n_tasks) * n_tasks


def _iso_cts_matrix(taus: Sequence[Tensor], common_fraction: float, key: str) -> Tensor:
    rank, n_tasks = min(taus[0].shape), len(taus)
    common = iso_common_size(rank, n_tasks, common_fraction)
    if common < 0:
        raise ValueError(
            f"option 'common_fraction' of merge method 'iso_cts' is too small for {key!r} "
            f"({rank} singular components, {n_tasks} tasks): the task-specific shares exceed "
            "the rank; raise common_fraction"
        )
    per_task_dims = (rank - common) // n_tasks
    u, s, vh = torch.linalg.svd(_accumulate(taus), full_matrices=False)
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common]
    del u, vh
    projector = common_u @ common_u.T  # FusionBench's order: (U U^T) tau, not U (U^T tau)
    us, ss, vhs = [], [], []
    for tau in taus:
        specific = tau - projector @ tau
        u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
        us.append(u_t[:, :per_task_dims])
        ss.append(s_t[:per_task_dims])
        vhs.append(vh_t[:per_task_dims])
    left = polar(torch.cat([*us, common_u], dim=1))
    right = polar(torch.cat([*vhs, common_vh], dim=0))
    return (left * torch.cat([*ss, common_s]).mean()) @ right


def _iso_cts(inputs: MergeInputs, options: Mapping[str, Any]) -> dict[str, Tensor]:
    """Iso-CTS: per matrix, the top directions of the summed task vectors (the common subspace,
    about ``common_fraction`` of the rank) plus each task's top directions orthogonal to it (equal
    shares), both bases whitened, all with the mean singular value; other tensors take the mean."""
    fraction = options["common_fraction"]
    return merge_matrices(
        inputs, lambda taus, key: _iso_cts_matrix(taus, fraction, key), options["scaling"]
    )


register_merge_method(
    "tsv",
    _tsv,
    options={
        "scaling": Option(1.0, _non_negative),
        "task_weights": Option(None, optional_per_task),
    },
)
register_merge_method("iso_c", _iso_c, options={"scaling": Option(1.0, _non_negative)})
register_merge_method(
    "iso_cts",
    _iso_cts,
    options={
        "scaling": Option(1.0, _non_negative),
        "common_fraction": Option(0.8, _density),
    },
)
