"""Methods TorchJD does not provide, written to give LibMTL's numbers on the same inputs:
CAGrad (with LibMTL's ``rescale``), DB-MTL, and the loss weightings RLW, FAMO and STCH.

Each class names the LibMTL file it follows and its defaults (LibMTL's ``config.py``); where
LibMTL departs from the paper or the authors' code, the docstring says which is followed. All
state is in buffers (checkpoints carry it); every input is checked for NaN/inf before any state
changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor
from torchjd.aggregation import RandomWeighting

from lightning_simo.weighting.base import (
    GramianWeighting,
    JacobianWeighting,
    ReduceFn,
    SeededMixin,
    Weighting,
    register_weighting,
)

__all__ = ["CAGrad", "DBMTL", "FAMO", "RLW", "STCH"]


@register_weighting("cagrad")
class CAGrad(GramianWeighting):
    """CAGrad (Liu et al. 2021), as LibMTL's ``CAGrad.py`` (itself the authors' code): maximise
    the worst task improvement within a ball of radius ``c * ||g0||`` around the mean gradient
    ``g0``, solved over the simplex by scipy's SLSQP; the direction is ``g0 + lambda * g_w``.

    TorchJD's CAGrad solves the same problem with cvxpy (an optional package) and has no
    ``rescale``; this form keeps LibMTL's solver and its three rescalings.

    Args:
        c: LibMTL's ``calpha`` (0.5).
        rescale: ``0`` none, ``1`` divide by ``1 + c^2`` (LibMTL's default), ``2`` by ``1 + c``.
    """

    RESCALES: ClassVar[tuple[int, ...]] = (0, 1, 2)

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        c: float = 0.5,
        rescale: int = 1,
    ) -> None:
        super().__init__(tasks, task_types)
        if c < 0:
            raise ValueError(f"cagrad c must be >= 0, got {c}")
        if rescale not in self.RESCALES:
            raise ValueError(f"cagrad rescale must be one of {self.RESCALES}, got {rescale!r}")
        self.c = float(c)
        self.rescale = int(rescale)

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        n = self.num_tasks
        gg = gramian.detach().float().cpu()
        g0_norm = (gg.mean() + 1e-8).sqrt()
        x_start = np.ones(n) / n
        a = gg.numpy()
        b = x_start.copy()
        radius = float(self.c * g0_norm + 1e-8)

        def objective(x: np.ndarray) -> float:
            row = x.reshape(1, -1)
            quad = row.dot(a).dot(x.reshape(-1, 1)) + 1e-8
            return float((row.dot(a).dot(b.reshape(-1, 1)) + radius * np.sqrt(quad)).sum())

        result = minimize(
            objective,
            x_start,
            bounds=tuple((0, 1) for _ in x_start),
            constraints=({"type": "eq", "fun": lambda x: 1 - sum(x)},),
        )
        w = torch.tensor(result.x, dtype=torch.float32)
        gw_norm = (w @ gg @ w).clamp_min(0).sqrt()
        lam = radius / (gw_norm + 1e-8)
        weights = torch.full((n,), 1.0 / n) + lam * w
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return (weights / divisor).to(gramian.device)


class _ResizableBuffers:
    """Buffers whose shape is only known at the first call (P); resized when a checkpoint loads."""

    _resizable: ClassVar[tuple[str, ...]] = ()

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in self._resizable:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


@register_weighting("db_mtl")
class DBMTL(_ResizableBuffers, JacobianWeighting):
    """DB-MTL (Lin et al. 2023), as LibMTL's ``DB_MTL.py``: gradients of ``log(L_t + 1e-8)``
    (``J_t / (L_t + 1e-8)``) are averaged by an EMA with rate ``beta / step^beta_sigma``, then each
    is scaled to the largest EMA norm and summed.

    The (T, P) EMA is the buffer ``grad_ema`` (allocated at the first call); it is per shared
    parameter, so ``jacobian_of: features`` (whose columns change with the batch) is refused.
    LibMTL also gives the heads the gradients of the log-losses; here every head gets its own
    task's plain gradient, as with every aggregator.

    Args:
        beta: LibMTL's ``DB_beta`` (0.9).
        beta_sigma: LibMTL's ``DB_beta_sigma`` (0).
    """

    supports_features: ClassVar[bool] = False
    _resizable: ClassVar[tuple[str, ...]] = ("grad_ema",)

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
    ) -> None:
        super().__init__(tasks, task_types)
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.grad_ema: Tensor
        self.steps: Tensor
        self.register_buffer("grad_ema", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        if self.grad_ema.shape != jacobian.shape:
            if self.grad_ema.numel():
                raise ValueError(
                    f"weighting 'db_mtl' keeps a gradient EMA of shape {tuple(self.grad_ema.shape)}"
                    f" but got a jacobian of shape {tuple(jacobian.shape)}; the shared "
                    "parameters changed, which this method cannot follow"
                )
            self.grad_ema = torch.zeros_like(jacobian)
        step = int(self.steps) + 1
        batch = jacobian / (losses + 1e-8)[:, None]
        rate = self.beta / step**self.beta_sigma
        ema = batch + rate * (self.grad_ema - batch)
        norms = ema.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        self.grad_ema.copy_(ema)
        self.steps.fill_(step)
        return alpha @ ema


@register_weighting("rlw")
class RLW(SeededMixin, Weighting):
    """Random loss weighting (Lin et al. 2022), as LibMTL's ``RLW.py``: every training step
    weights the losses by the softmax of T standard-normal draws (TorchJD's ``RandomWeighting``),
    from a generator seeded by ``seed`` and saved with the run."""

    def __init__(
        self, tasks: Sequence[str], task_types: Mapping[str, str] | None = None, seed: int = 0
    ) -> None:
        super().__init__(tasks, task_types)
        self._init_rng(seed)
        self._draw = RandomWeighting()
        self.last_weights: Tensor
        self.register_buffer("last_weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks))

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self._stack(losses)
        self._check_finite(losses=stacked.detach())
        with self._seeded():
            weights = self._draw(torch.zeros(self.num_tasks, 1)).to(stacked)
        self.last_weights.copy_(weights.detach().to(self.last_weights))
        return (weights * stacked).sum()

    def weights(self) -> dict[str, float]:
        return self._as_dict(self.last_weights)


def _adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """``torch.optim.Adam``'s update (L2 ``weight_decay``) on buffers, in place."""
    beta1, beta2 = betas
    grad = grad + weight_decay * param
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


@register_weighting("famo")
class FAMO(Weighting):
    """FAMO (Liu et al. 2023), as LibMTL's ``FAMO.py``: the loss ``sum_t z_t log(L_t) / c`` with
    ``z = softmax(w)`` and ``c = sum_t z_t / L_t``, and after the optimiser step an Adam step on
    the logits ``w`` towards the tasks whose log-loss fell least (:meth:`update`, given the same
    batch's losses after the step).

    Follows LibMTL, which departs from the authors' code in two places: the logits' L2 decay
    ``gamma`` defaults to 1e-3 (the authors' class default is 0.01; LibMTL exposes
    ``FAMO_w_gamma``), and the model gradient is not clipped inside the method (the authors clip
    it to ``max_norm=1``; here clipping is ``model.grad_clip``, one knob for every weighting).

    The logits, Adam's moments and step and the previous losses are buffers. Under DDP the
    losses are averaged over ranks with ``reduce_fn`` (set by the module) before use.

    Args:
        w_lr: LibMTL's ``FAMO_w_lr`` (0.025).
        gamma: LibMTL's ``FAMO_w_gamma`` (1e-3).
    """

    requires_update: ClassVar[bool] = True
    _EPS: ClassVar[float] = 1e-8

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        w_lr: float = 0.025,
        gamma: float = 1e-3,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        super().__init__(tasks, task_types)
        if w_lr <= 0 or gamma < 0:
            raise ValueError(f"famo needs w_lr > 0 and gamma >= 0, got {w_lr}, {gamma}")
        self.w_lr = float(w_lr)
        self.gamma = float(gamma)
        self.reduce_fn = reduce_fn
        n = self.num_tasks
        self.logits: Tensor
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("min_losses", torch.zeros(n))
        self.register_buffer("prev_losses", torch.full((n,), float("nan")))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_weights", torch.full((n,), 1.0 / n), persistent=False)

    def _reduced(self, losses: Tensor) -> Tensor:
        losses = losses.detach().float()
        return losses if self.reduce_fn is None else self.reduce_fn(losses).to(losses)

    def _check_positive(self, losses: Tensor) -> None:
        self._check_finite(losses=losses)
        if bool((losses - self.min_losses <= -self._EPS).any()):
            raise ValueError(
                "weighting 'famo' takes log(L_t): every task loss must be positive, got "
                f"{losses.tolist()}; use another weighting for losses that can be negative"
            )

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self._stack(losses)
        reduced = self._reduced(stacked)
        self._check_positive(reduced)
        z = F.softmax(self.logits.float(), -1)
        gaps = stacked - self.min_losses + self._EPS
        c = (z / gaps).sum().detach()
        self.prev_losses.copy_(reduced)
        self.last_weights.copy_((z / (c * gaps)).detach())
        return (gaps.log() * z / c).sum()

    @torch.no_grad()
    def update(self, losses: Tensor) -> None:
        current = self._reduced(losses.reshape(-1))
        self._check_positive(current)
        if bool(torch.isnan(self.prev_losses).any()):
            raise RuntimeError("FAMO.update needs a training step (combine) first")
        delta = (self.prev_losses - self.min_losses + self._EPS).log() - (
            current - self.min_losses + self._EPS
        ).log()
        z = F.softmax(self.logits, -1)
        grad = z * (delta - (z * delta).sum())  # d softmax(w) / dw, transposed, times delta
        self.steps.add_(1)
        _adam_step(
            self.logits, grad, self.exp_avg, self.exp_avg_sq, int(self.steps), self.w_lr, self.gamma
        )

    def weights(self) -> dict[str, float]:
        """The multiplier of each task's gradient in the last step, ``z_t / (c L_t)``."""
        return self._as_dict(self.last_weights)

    def extra_logs(self) -> dict[str, float]:
        z = F.softmax(self.logits.float(), -1)
        return {f"famo/z/{t}": v for t, v in self._as_dict(z).items()}


@register_weighting("stch")
class STCH(Weighting):
    """Smooth Tchebycheff scalarisation (Lin et al. 2024), as LibMTL's ``STCH.py``.

    For the first ``warmup_epoch`` epochs and the one numbered ``warmup_epoch`` (0-based) the loss
    is ``sum_t log L_t``; the nadir point is the average of the task losses over epoch
    ``warmup_epoch`` (here the all-rank epoch average :meth:`on_epoch_end` receives, the same
    mean). Afterwards the loss is ``T mu log sum_t exp((l_t - max l) / mu)`` with
    ``l_t = log(L_t / nadir_t + 1e-20)``.

    Args:
        mu: LibMTL's ``STCH_mu`` (1.0).
        warmup_epoch: LibMTL's ``STCH_warmup_epoch`` (4).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        mu: float = 1.0,
        warmup_epoch: int = 4,
    ) -> None:
        super().__init__(tasks, task_types)
        if mu <= 0 or warmup_epoch < 0:
            raise ValueError(f"stch needs mu > 0 and warmup_epoch >= 0, got {mu}, {warmup_epoch}")
        self.mu = float(mu)
        self.warmup_epoch = int(warmup_epoch)
        n = self.num_tasks
        self.nadir: Tensor
        self.register_buffer("nadir", torch.full((n,), float("nan")))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_weights", torch.ones(n), persistent=False)

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self._stack(losses)
        self._check_finite(losses=stacked.detach())
        if bool(torch.isnan(self.nadir).any()):
            self.last_weights.copy_(1.0 / (stacked.detach() + 1e-20))
            return torch.log(stacked + 1e-20).sum()
        logs = torch.log(stacked / self.nadir + 1e-20)
        reg = logs - logs.detach().max()
        total = self.mu * torch.log(torch.exp(reg / self.mu).sum()) * self.num_tasks
        share = torch.softmax(reg.detach() / self.mu, 0)
        scale = self.num_tasks / (stacked.detach() + 1e-20 * self.nadir)
        self.last_weights.copy_(share * scale)
        return total

    def weights(self) -> dict[str, float]:
        """The multiplier of each task's gradient in the last step (``dloss / dL_t``)."""
        return self._as_dict(self.last_weights)

    @torch.no_grad()
    def on_epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        current = self._stack({t: torch.as_tensor(float(v)) for t, v in epoch_losses.items()})
        if int(self.epochs_seen) == self.warmup_epoch:
            self._check_finite(losses=current)
            self.nadir.copy_(current.to(self.nadir))
        self.epochs_seen.add_(1)
