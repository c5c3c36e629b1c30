"""Loss weighting strategies for joint multi-task training.

A joint multi-task model produces one loss per task; a :class:`Weighting` turns them into the one
scalar that is back-propagated. The strategies are plain ``nn.Module`` objects (no Lightning
import) so that their state (learnable log-variances, GradNorm weights, DWA loss history) lives in
the owning module's ``state_dict`` and comes back on resume, and so that they can be unit-tested
on toy problems.

Strategies (see :data:`WEIGHTINGS` and :func:`build_weighting`):

- ``"equal"``: :class:`EqualWeighting`, mean (default) or sum of the task losses;
- ``"uncertainty"``: :class:`UncertaintyWeighting` (Kendall, Gal, Cipolla 2018);
- ``"gradnorm"``: :class:`GradNorm` (Chen et al. 2018), needs manual optimisation;
- ``"dwa"``: :class:`DWA`, dynamic weight average (Liu, Johns, Davison 2019).

Every loss mapping passed to a strategy must hold exactly the strategy's tasks: a missing or an
unexpected task is a bug in the caller and raises ``KeyError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_simo.tasks import LOSS_FAMILIES

__all__ = [
    "DWA",
    "TASK_TYPES",
    "WEIGHTINGS",
    "EqualWeighting",
    "GradNorm",
    "ReduceFn",
    "UncertaintyWeighting",
    "Weighting",
    "available_weightings",
    "build_weighting",
]

#: The task types a weighting distinguishes (only :class:`UncertaintyWeighting` uses them).
TASK_TYPES = LOSS_FAMILIES

#: An all-reduce-mean over data-parallel ranks, e.g. ``lambda t: strategy.reduce(t, "mean")``.
ReduceFn = Callable[[Tensor], Tensor]


class Weighting(nn.Module):
    """Base class: turns a mapping of per-task losses into one scalar to back-propagate.

    Subclasses implement :meth:`combine` and :meth:`weights`. The task order given here fixes the
    order of every per-task tensor the strategy stores, so that state dicts are stable.

    Args:
        tasks: task names, in a fixed order; at least one, no duplicates.
        task_types: task name -> ``"classification"`` or ``"regression"``. Tasks left out count
            as regression (the form most implementations apply to every task).
    """

    #: ``True`` when the caller must use :meth:`GradNorm.step` under manual optimisation instead
    #: of back-propagating :meth:`combine`.
    requires_manual_backward: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[str], task_types: Mapping[str, str] | None = None) -> None:
        super().__init__()
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("a weighting needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {list(tasks)}")
        task_types = dict(task_types or {})
        unknown = sorted(set(task_types) - set(tasks))
        if unknown:
            raise ValueError(f"task_types names tasks {unknown} that are not in {list(tasks)}")
        for task, kind in task_types.items():
            if kind not in TASK_TYPES:
                raise ValueError(f"task type of {task!r} is {kind!r}; expected one of {TASK_TYPES}")
        self.tasks: tuple[str, ...] = tasks
        self.task_types: dict[str, str] = {t: task_types.get(t, "regression") for t in tasks}

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return len(self.tasks)

    def _stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Losses as a float32 vector in task order (fp32 so bf16 losses do not lose precision)."""
        missing = [t for t in self.tasks if t not in losses]
        extra = sorted(set(losses) - set(self.tasks))
        if missing or extra:
            raise KeyError(
                f"losses must hold exactly the tasks {list(self.tasks)}; "
                f"missing {missing}, unexpected {extra}"
            )
        return torch.stack([losses[t].float().reshape(()) for t in self.tasks])

    def _as_dict(self, values: Tensor) -> dict[str, float]:
        return {t: float(v) for t, v in zip(self.tasks, values.detach().cpu().tolist())}

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The total loss to back-propagate."""
        raise NotImplementedError

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Same as :meth:`combine`, so a strategy can be called like any module."""
        return self.combine(losses)

    def weights(self) -> dict[str, float]:
        """Current multiplier of each task loss in the total, for logging."""
        raise NotImplementedError

    def extra_logs(self) -> dict[str, float]:
        """Strategy-specific scalars worth logging (none by default)."""
        return {}

    def on_epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        """Receives the epoch-average loss of each task (unused by default).

        Must be given the same values on every rank (synchronise them first under DDP).
        """


class EqualWeighting(Weighting):
    """Fixed, equal weights.

    ``reduction="mean"`` (default) divides the summed losses by T, as the uncertainty-weighting
    paper's baseline; ``"sum"`` adds them, as several reference codebases do. The two differ only
    by a constant factor, which matters when the learning rate is kept fixed.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        super().__init__(tasks, task_types)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self._stack(losses)
        return stacked.mean() if self.reduction == "mean" else stacked.sum()

    def weights(self) -> dict[str, float]:
        value = 1.0 / self.num_tasks if self.reduction == "mean" else 1.0
        return dict.fromkeys(self.tasks, value)


class UncertaintyWeighting(Weighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal, Cipolla 2018).

    Each task has a learnable ``s_t = log sigma_t^2`` (the parameter ``log_var``, in task order),
    trained by the model's optimiser together with the network. Forms:

    - ``"per_type"`` (default, the paper): regression ``1/2 e^{-s} L + 1/2 s``, classification
      ``e^{-s} L + 1/2 s``; the optimum for a fixed loss ``c`` is ``s* = log c`` and
      ``s* = log(2c)``.
    - ``"regression"``: ``1/2 (e^{-s} L + s)`` for every task, ``s`` initialised to 0.
    - ``"libmtl"``: ``L / (2 e^s) + s / 2`` for every task with ``s`` initialised to -0.5, as
      LibMTL and the MTAN code do (the same function as ``"regression"``, another start).

    The ``1/2 s`` regulariser is unbounded below, so the total loss goes negative once a task's
    loss is below about 1: that is expected, not a bug. Exclude ``log_var`` from weight decay,
    which would pull every sigma towards 1.

    Args:
        form: see above.
        init: initial ``s``; default 0, or -0.5 for ``"libmtl"``.
    """

    FORMS: ClassVar[tuple[str, ...]] = ("per_type", "regression", "libmtl")

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        form: Literal["per_type", "regression", "libmtl"] = "per_type",
        init: float | None = None,
    ) -> None:
        super().__init__(tasks, task_types)
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        self.form = form
        if init is None:
            init = -0.5 if form == "libmtl" else 0.0
        self.log_var = nn.Parameter(torch.full((self.num_tasks,), float(init)))
        # Multiplier of e^{-s} L per task: 1 for classification only in the per-type form.
        scale = [
            1.0 if form == "per_type" and self.task_types[t] == "classification" else 0.5
            for t in self.tasks
        ]
        self.register_buffer("loss_scale", torch.tensor(scale), persistent=False)

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self._stack(losses)
        log_var = self.log_var.float()
        return (self.loss_scale * torch.exp(-log_var) * stacked + 0.5 * log_var).sum()

    def weights(self) -> dict[str, float]:
        return self._as_dict(self.loss_scale * torch.exp(-self.log_var.detach().float()))

    def extra_logs(self) -> dict[str, float]:
        return {f"log_var/{t}": v for t, v in self._as_dict(self.log_var).items()}


class GradNorm(Weighting):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich 2018): balance task-gradient magnitudes.

    Per training step, on the last shared layer ``W``:

    - ``G_t = ||grad_W (w_t L_t)||_2 = w_t ||grad_W L_t||_2`` (``w_t > 0``);
    - ``r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0))``, the relative inverse training rate;
    - ``L_grad = sum_t |G_t - stopgrad(mean_j G_j * r_t^alpha)|``.

    ``L_grad`` updates only the task weights ``w`` (never the model), with an optimiser owned by
    this module; afterwards the weights are clamped to at least ``min_weight`` and rescaled so
    that they sum to T. Tasks whose loss falls more slowly than average get a larger gradient
    share.

    The targets cannot all be met when the ``r_t`` differ: their sum is
    ``sum_t G_t * mean_t(r_t^alpha)``, above ``sum_t G_t`` for ``alpha > 1`` (Jensen). The
    L1 objective then leaves the shortfall on some tasks; exact balance holds only while the tasks
    train at similar relative rates.

    The weights and the optimiser state are buffers rather than parameters so that the model's
    optimiser never sees them, while they still move with ``.to()`` and are saved in (and
    restored from) the owner's ``state_dict``.

    Use :meth:`step` in the training step under manual optimisation and back-propagate what it
    returns; :meth:`combine` weights losses with the current ``w`` for validation.

    Data-parallel training: every rank must end up with the same ``w``. Pass ``reduce_fn``, an
    element-wise all-reduce-mean across ranks; :meth:`step` applies it once per call to the 1-D
    tensor ``[G_1..G_T, L_1..L_T]`` (detached; only ``[L_1..L_T]`` while ``L(0)`` is being
    averaged over the first epoch) before anything else uses those values, so the gradient
    norms, the loss ratios, ``L(0)`` and hence the update are identical everywhere. Every rank
    must call :meth:`step` every step (the reduction is a collective).

    Args:
        alpha: restoring-force strength (1.5 in the paper for NYUv2).
        lr: learning rate of the weight optimiser.
        initial_loss: ``"first_step"`` takes ``L(0)`` from the first call of :meth:`step`;
            ``"first_epoch"`` keeps the weights at 1 during the first epoch, averages the losses
            seen there and sets ``L(0)`` at the first :meth:`on_epoch_end`.
        optimizer: ``"adam"`` (default; insensitive to the scale of the gradient norms, which
            ``dL_grad/dw_t = +-||grad_W L_t||`` inherits from the losses) or ``"sgd"``.
        space: ``"log"`` (default) steps the optimiser on ``log w`` (the gradient is
            ``w * dL_grad/dw``), so every weight moves by a relative amount and a weight of 0.01
            settles as precisely as one of 1. ``"linear"`` steps on ``w`` itself, as the
            paper's algorithm is written; its absolute steps make a weight far below the others
            oscillate by tens of percent around its balance point.
        min_weight: lower bound applied to every weight before renormalising.
        reduce_fn: see above; may also be assigned later as the attribute ``reduce_fn``.
    """

    requires_manual_backward: ClassVar[bool] = True
    INITIAL_LOSS_MODES: ClassVar[tuple[str, ...]] = ("first_step", "first_epoch")
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adam", "sgd")
    SPACES: ClassVar[tuple[str, ...]] = ("log", "linear")
    _BETAS: ClassVar[tuple[float, float]] = (0.9, 0.999)
    _ADAM_EPS: ClassVar[float] = 1e-8
    _FLOOR: ClassVar[float] = 1e-12

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        alpha: float = 1.5,
        lr: float = 0.025,
        initial_loss: Literal["first_step", "first_epoch"] = "first_step",
        optimizer: Literal["adam", "sgd"] = "adam",
        space: Literal["log", "linear"] = "log",
        min_weight: float = 1e-4,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        super().__init__(tasks, task_types)
        if initial_loss not in self.INITIAL_LOSS_MODES:
            raise ValueError(
                f"initial_loss must be one of {self.INITIAL_LOSS_MODES}, got {initial_loss!r}"
            )
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {self.OPTIMIZERS}, got {optimizer!r}")
        if space not in self.SPACES:
            raise ValueError(f"space must be one of {self.SPACES}, got {space!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 < min_weight < 1:
            raise ValueError(f"min_weight must be in (0, 1), got {min_weight}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.initial_loss = initial_loss
        self.optimizer = optimizer
        self.space = space
        self.min_weight = float(min_weight)
        self.reduce_fn = reduce_fn
        n = self.num_tasks
        self.task_weights: Tensor
        self.initial_losses: Tensor
        self.register_buffer("task_weights", torch.ones(n))
        self.register_buffer("initial_losses", torch.zeros(n))
        self.register_buffer("has_initial_losses", torch.tensor(False))
        # First-epoch accumulation of (reduced) losses.
        self.register_buffer("loss_sum", torch.zeros(n))
        self.register_buffer("loss_count", torch.tensor(0, dtype=torch.long))
        # Weight-optimiser state (SGD uses only the step count).
        self.register_buffer("opt_step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        # Last step's statistics, for logging only.
        self.register_buffer("last_grad_norms", torch.full((n,), math.nan), persistent=False)
        self.register_buffer("last_ratios", torch.full((n,), math.nan), persistent=False)
        self.register_buffer("last_gradnorm_loss", torch.tensor(math.nan), persistent=False)

    # ------------------------------------------------------------------ public API
    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``sum_t w_t L_t`` with the current weights (detached), e.g. for validation."""
        stacked = self._stack(losses)
        return (self.task_weights.detach().float() * stacked).sum()

    def weights(self) -> dict[str, float]:
        return self._as_dict(self.task_weights)

    def extra_logs(self) -> dict[str, float]:
        """Last step's ``L_grad``, ``G_t`` and ``r_t`` (empty before the first update)."""
        if torch.isnan(self.last_gradnorm_loss):
            return {}
        logs = {"gradnorm/loss": float(self.last_gradnorm_loss)}
        for t, g in self._as_dict(self.last_grad_norms).items():
            logs[f"gradnorm/grad_norm/{t}"] = g
        for t, r in self._as_dict(self.last_ratios).items():
            logs[f"gradnorm/inverse_rate/{t}"] = r
        return logs

    def step(self, losses: Mapping[str, Tensor], shared_params: Sequence[Tensor]) -> Tensor:
        """One GradNorm step: update ``w`` from ``L_grad``; return the loss for the model.

        Args:
            losses: this step's task losses, still attached to the graph.
            shared_params: the parameters of the last shared layer ``W``. Their ``.grad`` is not
                touched and the graph is retained, so the caller back-propagates the returned
                total afterwards.

        Returns:
            ``sum_t w_t L_t`` with the weights in force before this update, detached from
            ``w``: back-propagating it trains the model only.
        """
        stacked = self._stack(losses)
        current = self.task_weights.detach().float().clone()
        total = (current * stacked).sum()

        if self.initial_loss == "first_epoch" and not bool(self.has_initial_losses):
            # Weights stay at 1 during the first epoch; only the losses are averaged.
            reduced = self._reduce(stacked.detach())
            self.loss_sum.add_(reduced.to(self.loss_sum))
            self.loss_count.add_(1)
            return total

        params = [p for p in shared_params if p.requires_grad]
        if not params:
            raise ValueError("shared_params holds no tensor that requires grad")
        norms = torch.stack([self._grad_norm(loss, params) for loss in stacked.unbind()])
        # G_t = w_t * ||grad L_t||, the same as differentiating w_t * L_t since w_t > 0.
        reduced = self._reduce(torch.cat([current * norms, stacked.detach()]))
        grad_norms, loss_now = reduced[: self.num_tasks], reduced[self.num_tasks :]

        if not bool(self.has_initial_losses):
            self.initial_losses.copy_(loss_now)
            self.has_initial_losses.fill_(True)
        loss_ratio = loss_now / self.initial_losses.float().clamp_min(self._FLOOR)
        inverse_rate = loss_ratio / loss_ratio.mean().clamp_min(self._FLOOR)
        target = grad_norms.mean() * inverse_rate.pow(self.alpha)

        # G_t is linear in w_t: rebuild it from a leaf so that L_grad reaches w and nothing else.
        w = current.clone().requires_grad_(True)
        g_of_w = w / current.clamp_min(self._FLOOR) * grad_norms
        gradnorm_loss = (g_of_w - target).abs().sum()
        (grad_w,) = torch.autograd.grad(gradnorm_loss, w)
        self._update_weights(current, grad_w.detach())

        self.last_grad_norms.copy_(grad_norms)
        self.last_ratios.copy_(inverse_rate)
        self.last_gradnorm_loss.copy_(gradnorm_loss.detach())
        return total

    def on_epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        """Sets ``L(0)`` after the first epoch in ``"first_epoch"`` mode; otherwise a no-op.

        ``L(0)`` is the mean of the losses seen by :meth:`step` (already reduced across ranks);
        ``epoch_losses`` is used only if :meth:`step` never ran.
        """
        if self.initial_loss != "first_epoch" or bool(self.has_initial_losses):
            return
        if int(self.loss_count) > 0:
            initial = self.loss_sum / self.loss_count.to(self.loss_sum)
        else:
            initial = self._stack({t: torch.as_tensor(float(v)) for t, v in epoch_losses.items()})
        self.initial_losses.copy_(initial)
        self.has_initial_losses.fill_(True)

    # ------------------------------------------------------------------ internals
    def _reduce(self, values: Tensor) -> Tensor:
        if self.reduce_fn is None:
            return values
        return self.reduce_fn(values).to(values)

    @staticmethod
    def _grad_norm(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        """``||grad_params loss||_2`` without touching ``.grad`` (unused parameters count as 0)."""
        if not loss.requires_grad:
            return torch.zeros((), device=loss.device)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        if not squares:
            return torch.zeros((), device=loss.device)
        return torch.stack(squares).sum().sqrt()

    @torch.no_grad()
    def _update_weights(self, w: Tensor, grad_w: Tensor) -> None:
        """One optimiser step on ``w`` (or ``log w``), then clamp and rescale to sum to T."""
        grad = grad_w * w if self.space == "log" else grad_w
        self.opt_step.add_(1)
        if self.optimizer == "adam":
            beta1, beta2 = self._BETAS
            step = int(self.opt_step)
            self.exp_avg.mul_(beta1).add_(grad.to(self.exp_avg), alpha=1 - beta1)
            self.exp_avg_sq.mul_(beta2).add_(grad.pow(2).to(self.exp_avg_sq), alpha=1 - beta2)
            m_hat = self.exp_avg.float() / (1 - beta1**step)
            v_hat = self.exp_avg_sq.float() / (1 - beta2**step)
            delta = self.lr * m_hat / (v_hat.sqrt() + self._ADAM_EPS)
        else:
            delta = self.lr * grad
        w = w * torch.exp(-delta) if self.space == "log" else w - delta
        w = w.clamp_min(self.min_weight)
        self.task_weights.copy_(w * (self.num_tasks / w.sum()))


class DWA(Weighting):
    """Dynamic weight average (Liu, Johns, Davison 2019).

    At epoch ``k >= 2``: ``w_t(k) = T * softmax_t(r_t / temperature)`` with
    ``r_t = L_t(k-1) / L_t(k-2)``, the ratio of the last two epoch-average losses; ``w = 1`` in the
    first two epochs. The total is ``sum_t w_t L_t`` (weights sum to T, as in the paper). Tasks
    whose loss falls more slowly get more weight.

    The weights change only in :meth:`on_epoch_end`, which must receive the epoch-average
    training loss of every task, identical on every rank. The last two epochs' averages and the
    current weights are buffers, so a resumed run continues with the same weights.

    Args:
        temperature: softmax temperature (2 in the paper); larger is closer to equal weights.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        temperature: float = 2.0,
    ) -> None:
        super().__init__(tasks, task_types)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        n = self.num_tasks
        self.task_weights: Tensor
        self.loss_history: Tensor
        self.register_buffer("task_weights", torch.ones(n))
        # Row 0: epoch k-2, row 1: epoch k-1.
        self.register_buffer("loss_history", torch.zeros(2, n))
        self.register_buffer("epochs_seen", torch.tensor(0, dtype=torch.long))

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        return (self.task_weights.detach().float() * self._stack(losses)).sum()

    def weights(self) -> dict[str, float]:
        return self._as_dict(self.task_weights)

    @torch.no_grad()
    def on_epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        current = self._stack({t: torch.as_tensor(float(v)) for t, v in epoch_losses.items()})
        history = self.loss_history
        history[0] = history[1]
        history[1] = current.to(history)
        self.epochs_seen.add_(1)
        if int(self.epochs_seen) >= 2:
            ratio = history[1] / history[0].clamp_min(1e-12)
            weights = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
            self.task_weights.copy_(weights)


#: Registry name -> strategy class.
WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNorm,
    "dwa": DWA,
}


def available_weightings() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(WEIGHTINGS)


def build_weighting(
    name: str,
    tasks: Sequence[str],
    task_types: Mapping[str, str] | None = None,
    **options: Any,
) -> Weighting:
    """Builds the strategy registered as ``name`` (case-insensitive) with its ``options``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the valid names.
    """
    key = name.lower()
    if key not in WEIGHTINGS:
        raise ValueError(
            f"unknown weighting {name!r}; valid names: {', '.join(available_weightings())}"
        )
    return WEIGHTINGS[key](tasks, task_types, **options)
