"""Task-vector merging: pure functions on state dicts, usable without Lightning.

>>> merged = merge(theta0, [theta_seg, theta_depth], "ties", density=0.2, scaling=1.0)
"""

# The data-free methods register themselves on import, next to the built-in ones.
from lightning_simo.merging import (  # noqa: F401
    data_based,  # noqa: F401  (registers regmean, fisher)
    mask_methods,
    sparse_methods,
    svd_methods,
    wudi,
)
from lightning_simo.merging.methods import (
    BN_STATS_POLICIES,
    MERGE_METHODS,
    MergeFn,
    MergeInputs,
    MergeMethod,
    Option,
    keep_count,
    merge,
    register_merge_method,
)
from lightning_simo.merging.task_vectors import (
    add_scaled,
    apply_task_vector,
    cast_like,
    check_compatible,
    compute_dtype,
    cosine_similarity_matrix,
    is_bn_running_stat,
    norms,
    task_vector,
    task_vectors,
)

__all__ = [
    "BN_STATS_POLICIES",
    "MERGE_METHODS",
    "MergeFn",
    "MergeInputs",
    "MergeMethod",
    "Option",
    "add_scaled",
    "apply_task_vector",
    "cast_like",
    "check_compatible",
    "compute_dtype",
    "cosine_similarity_matrix",
    "is_bn_running_stat",
    "keep_count",
    "merge",
    "norms",
    "register_merge_method",
    "task_vector",
    "task_vectors",
]
