"""Loss weightings and gradient aggregators for joint multi-task training.

A joint multi-task model produces one loss per task. A weighting either combines the losses into
the one scalar that is back-propagated (equal, uncertainty, GradNorm, DWA, RLW, FAMO, STCH) or,
with ``requires_jacobian``, aggregates the (T, P) jacobian of the shared parameters into the
applied direction (UPGrad, DualProj, PCGrad, MGDA, IMTL-G, Aligned-MTL, GradDrop, GradVac,
FairGrad, Nash-MTL: TorchJD's aggregators; CAGrad, DB-MTL: LibMTL's formulas). Every strategy is
registered by name in :data:`WEIGHTINGS` and built with :func:`build_weighting`; see docs/mtl.md.
"""

from lightning_simo.weighting import aggregators, libmtl, losses
from lightning_simo.weighting.aggregators import (
    IMTLG,
    MGDA,
    AlignedMTL,
    DualProj,
    FairGrad,
    GradDrop,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from lightning_simo.weighting.base import (
    TASK_TYPES,
    WEIGHTINGS,
    GramianWeighting,
    JacobianWeighting,
    NonFiniteInputError,
    ReduceFn,
    Weighting,
    available_weightings,
    build_weighting,
    register_weighting,
)
from lightning_simo.weighting.libmtl import DBMTL, FAMO, RLW, STCH, CAGrad
from lightning_simo.weighting.losses import DWA, EqualWeighting, GradNorm, UncertaintyWeighting

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "IMTLG",
    "MGDA",
    "RLW",
    "STCH",
    "TASK_TYPES",
    "WEIGHTINGS",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "EqualWeighting",
    "FairGrad",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GramianWeighting",
    "JacobianWeighting",
    "NashMTL",
    "NonFiniteInputError",
    "PCGrad",
    "ReduceFn",
    "UPGrad",
    "UncertaintyWeighting",
    "Weighting",
    "aggregators",
    "available_weightings",
    "build_weighting",
    "libmtl",
    "losses",
    "register_weighting",
]
