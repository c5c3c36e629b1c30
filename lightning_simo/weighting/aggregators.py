"""Gradient aggregators backed by TorchJD: UPGrad, DualProj, PCGrad, MGDA, IMTL-G, Aligned-MTL,
GradDrop, GradVac, FairGrad and Nash-MTL.

TorchJD implements each method as a weighting of the jacobian's Gramian (or, for GradDrop, of
the jacobian itself); these classes only adapt it to :class:`Weighting`'s contract: options
named as in LibMTL, randomness from a seeded generator kept in a buffer, and every bit of state
(GradVac's cosine targets, Nash-MTL's warm start and step count) in buffers instead of TorchJD's
Python attributes, so that checkpoints carry it. TorchJD's modules are held outside the module
tree (no duplicate, unsaveable state) and rebuilt from the options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from torchjd import aggregation as jd

from lightning_simo.weighting.base import (
    GramianWeighting,
    JacobianWeighting,
    SeededMixin,
    register_weighting,
)
from lightning_simo.weighting.dual_cone import default_projector

__all__ = [
    "MGDA",
    "PCGrad",
    "UPGrad",
    "AlignedMTL",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "IMTLG",
    "NashMTL",
    "gramian_root",
]


def _hold(owner: torch.nn.Module, name: str, obj: Any) -> None:
    """Keep a TorchJD object as a plain attribute, outside the module tree and its state dict."""
    object.__setattr__(owner, name, obj)


def gramian_root(gramian: Tensor) -> Tensor:
    """A (T, T) matrix ``R`` with ``R R^T = G``, for TorchJD weightings that take a matrix."""
    values, vectors = torch.linalg.eigh(gramian.double())
    return (vectors * values.clamp_min(0).sqrt()).to(gramian.dtype)


class _DualConeMethod(GramianWeighting):
    """TorchJD's dual-cone aggregators, with the projector chosen by :func:`default_projector`.

    Args:
        norm_eps, reg_eps: the projector's Gramian normalisation floor and diagonal
            regularisation (TorchJD's and LibMTL's defaults, 1e-4).
    """

    _torchjd: ClassVar[type]

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__(tasks, task_types)
        _hold(self, "_jd", self._torchjd(projector=default_projector(norm_eps, reg_eps)))

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self._jd(gramian)


@register_weighting("upgrad")
class UPGrad(_DualConeMethod):
    """UPGrad (Quinton & Rey 2024): every task gradient projected onto the dual cone of all of
    them, then averaged; the direction never conflicts with any task. Options: ``norm_eps``,
    ``reg_eps``."""

    _torchjd = jd.UPGradWeighting


@register_weighting("dualproj")
class DualProj(_DualConeMethod):
    """DualProj: the mean gradient projected onto the dual cone of the task gradients (GEM's
    projection, as in TorchJD). Options: ``norm_eps``, ``reg_eps``."""

    _torchjd = jd.DualProjWeighting


@register_weighting("pcgrad")
class PCGrad(SeededMixin, GramianWeighting):
    """PCGrad (Yu et al. 2020): each task gradient is projected off the normal plane of every
    other one it conflicts with, in random order; the projected gradients are summed (as LibMTL
    and TorchJD do). ``seed`` fixes the order stream; it is saved with the run.
    """

    def __init__(
        self, tasks: Sequence[str], task_types: Mapping[str, str] | None = None, seed: int = 0
    ) -> None:
        super().__init__(tasks, task_types)
        self._init_rng(seed)
        _hold(self, "_jd", jd.PCGradWeighting())

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        with self._seeded():
            return self._jd(gramian)


@register_weighting("mgda")
class MGDA(GramianWeighting):
    """MGDA (Sener & Koltun 2018): the minimum-norm point of the convex hull of the (normalised)
    task gradients, by TorchJD's Frank-Wolfe solver.

    Args:
        normalization: LibMTL's ``mgda_gn``: each gradient divided by ``1`` (``"none"``, its
            default), its L2 norm (``"l2"``), its loss (``"loss"``) or both (``"loss+"``) before
            the min-norm problem; the direction combines the normalised gradients.
        epsilon, max_iters: Frank-Wolfe stopping rule (TorchJD's defaults).
    """

    NORMALIZATIONS: ClassVar[tuple[str, ...]] = ("none", "l2", "loss", "loss+")

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        normalization: Literal["none", "l2", "loss", "loss+"] = "none",
        epsilon: float = 1e-3,
        max_iters: int = 100,
    ) -> None:
        super().__init__(tasks, task_types)
        if normalization not in self.NORMALIZATIONS:
            raise ValueError(
                f"mgda normalization must be one of {self.NORMALIZATIONS}, got {normalization!r}"
            )
        self.normalization = normalization
        _hold(self, "_jd", jd.MGDAWeighting(epsilon=epsilon, max_iters=max_iters))

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        scale = {
            "none": torch.ones_like(losses),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.normalization]
        inverse = 1.0 / scale
        weights = self._jd(gramian * inverse[:, None] * inverse[None, :])
        return weights * inverse  # weights of the raw rows


@register_weighting("imtl")
class IMTLG(GramianWeighting):
    """IMTL-G (Liu et al. 2021): the direction with equal projections on every unit task
    gradient; TorchJD's pseudo-inverse form, which also handles linearly dependent gradients."""

    def __init__(self, tasks: Sequence[str], task_types: Mapping[str, str] | None = None) -> None:
        super().__init__(tasks, task_types)
        _hold(self, "_jd", jd.IMTLGWeighting())

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self._jd(gramian)


@register_weighting("aligned_mtl")
class AlignedMTL(GramianWeighting):
    """Aligned-MTL (Senushkin et al. 2023): the jacobian's condition number set to 1 by an
    eigen-decomposition of the Gramian, scaled by its smallest non-zero eigenvalue.

    Args:
        reduction: ``"sum"`` (default) adds the aligned gradients, as the authors' code and
            LibMTL do; ``"mean"`` averages them, as TorchJD does (1/T of the sum).
        scale_mode: TorchJD's eigenvalue used for scaling (``"min"``, the authors' choice).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        reduction: Literal["sum", "mean"] = "sum",
        scale_mode: Literal["min", "median", "rmse"] = "min",
    ) -> None:
        super().__init__(tasks, task_types)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"aligned_mtl reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        pref = torch.ones(self.num_tasks) if reduction == "sum" else None
        _hold(self, "_jd", jd.AlignedMTLWeighting(pref_vector=pref, scale_mode=scale_mode))

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self._jd(gramian)


@register_weighting("fairgrad")
class FairGrad(GramianWeighting):
    """FairGrad (Ban & Ji 2024): alpha-fair weights solving ``G w = w^{-1/alpha}``, by TorchJD
    (scipy least squares). ``alpha`` defaults to LibMTL's 1.0."""

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        alpha: float = 1.0,
        max_iters: int | None = None,
    ) -> None:
        super().__init__(tasks, task_types)
        _hold(self, "_jd", jd.FairGradWeighting(alpha=alpha, max_iters=max_iters))

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self._jd(gramian)


@register_weighting("gradvac")
class GradVac(SeededMixin, GramianWeighting):
    """Gradient Vaccine (Wang et al. 2021), TorchJD's form: for each task, in random order over
    the others, raise its cosine with each other task to an EMA target; the target of every pair
    is updated at every step (as the paper; LibMTL updates it per parameter group).

    The (T, T) cosine targets are the buffer ``targets``; ``seed`` fixes the order stream.

    Args:
        beta: EMA rate of the targets (LibMTL's default 0.5).
        eps: TorchJD's division guard.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        beta: float = 0.5,
        eps: float = 1e-8,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, task_types)
        self._init_rng(seed)
        self.targets: Tensor
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks))
        _hold(self, "_jd", jd.GradVacWeighting(beta=beta, eps=eps))

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        solver = self._jd
        gramian = gramian.cpu()
        solver._phi_t = self.targets.detach().cpu().to(gramian.dtype).clone()
        solver._state_key = (self.num_tasks, gramian.dtype)
        with self._seeded():
            weights = solver(gramian)
        self.targets.copy_(solver._phi_t.to(self.targets))
        solver.reset()
        return weights


@register_weighting("nash_mtl")
class NashMTL(GramianWeighting):
    """Nash-MTL (Navon et al. 2022): the Nash bargaining solution ``G a = 1/a``, by TorchJD's
    port of the authors' concave-convex procedure (cvxpy + ECOS), warm-started from the previous
    step's weights.

    The warm start, the step counter and the normalisation are buffers. TorchJD needs the
    optional ``cvxpy`` and ``ecos`` packages for this method (``pip install "torchjd[nash_mtl]"``).

    Args:
        update_every: solve every this many steps, reuse the weights in between (1).
        optim_niter: CCP iterations per solve (20).
        max_norm: the direction's norm is capped to this (1.0; 0 disables).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        update_every: int = 1,
        optim_niter: int = 20,
        max_norm: float = 1.0,
    ) -> None:
        super().__init__(tasks, task_types)
        missing = [name for name in ("cvxpy", "ecos") if find_spec(name) is None]
        if missing:
            raise ValueError(
                f"weighting 'nash_mtl' needs the packages {missing} (TorchJD's solver); install "
                'them with pip install "torchjd[nash_mtl]" or choose another weighting'
            )
        self.prev_alpha: Tensor
        self.steps: Tensor
        self.register_buffer("prev_alpha", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        _hold(
            self,
            "_jd",
            jd.NashMTL(
                self.num_tasks,
                max_norm=max_norm,
                update_weights_every=update_every,
                optim_niter=optim_niter,
            ).weighting,
        )

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        solver = self._jd
        if not hasattr(solver, "prob"):
            solver._init_optim_problem()  # a resumed run rebuilds the cvxpy problem once
        solver.step = float(self.steps)
        solver.prvs_alpha = self.prev_alpha.cpu().numpy().astype(np.float32)
        weights = solver(gramian_root(gramian))
        self.prev_alpha.copy_(torch.as_tensor(np.asarray(solver.prvs_alpha, dtype=np.float64)))
        self.steps.fill_(int(solver.step))
        return weights


@register_weighting("graddrop")
class GradDrop(SeededMixin, JacobianWeighting):
    """GradDrop (Chen et al. 2020): per coordinate, keep the gradients of one sign, drawn with
    the sign's purity as probability (TorchJD's form on the jacobian's rows).

    LibMTL applies it to representation gradients only; here it applies to whichever jacobian
    ``jacobian_of`` selects (shared parameters or shared features).

    Args:
        leak: share of every gradient that passes the mask (LibMTL's ``leak``, 0).
        seed: seed of the mask stream, saved with the run.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        leak: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, task_types)
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"graddrop leak must lie in [0, 1], got {leak}")
        self.leak = float(leak)
        self._init_rng(seed)
        _hold(self, "_jd", jd.GradDrop(leak=torch.full((self.num_tasks,), self.leak)))

    def _direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        self._jd.leak = self._jd.leak.to(jacobian)
        with self._seeded(jacobian.device):
            return self._jd(jacobian)
