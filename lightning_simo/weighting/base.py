"""What every weighting is: the base class, the registry, and the jacobian contract.

A joint multi-task model produces one loss per task. A :class:`Weighting` either turns them into
the one scalar that is back-propagated (a *loss weighting*: :meth:`Weighting.combine`), or, when
``requires_jacobian`` is true, turns the (T, P) jacobian of the shared parameters into the (P,)
direction applied as their gradient (a *gradient aggregator*: :meth:`Weighting.aggregate`).
Both kinds keep their state (EMAs, step counters, solver warm starts, random-generator states)
in buffers, so that a checkpoint carries it and a resumed run continues bit for bit.

Every loss mapping passed to a strategy must hold exactly the strategy's tasks: a missing or an
unexpected task is a bug in the caller and raises ``KeyError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from lightning_simo.registry import Registry
from lightning_simo.tasks import LOSS_FAMILIES

__all__ = [
    "TASK_TYPES",
    "WEIGHTINGS",
    "GramianWeighting",
    "JacobianWeighting",
    "NonFiniteInputError",
    "ReduceFn",
    "SeededMixin",
    "Weighting",
    "available_weightings",
    "build_weighting",
    "register_weighting",
]

#: The task types a weighting distinguishes (only uncertainty weighting uses them).
TASK_TYPES = LOSS_FAMILIES

#: An all-reduce-mean over data-parallel ranks, e.g. ``lambda t: strategy.reduce(t, "mean")``.
ReduceFn = Callable[[Tensor], Tensor]


class NonFiniteInputError(ValueError):
    """A jacobian or loss handed to a weighting holds NaN or infinity."""


class Weighting(nn.Module):
    """Base class: turns per-task losses (or their jacobian) into what is back-propagated.

    Loss weightings implement :meth:`combine` and :meth:`weights`; gradient aggregators derive
    from :class:`JacobianWeighting`. The task order given here fixes the order of every per-task
    tensor the strategy stores (and the rows of the jacobian), so that state dicts are stable.

    Args:
        tasks: task names, in a fixed order; at least one, no duplicates.
        task_types: task name -> ``"classification"`` or ``"regression"``. Tasks left out count
            as regression (the form most implementations apply to every task).
    """

    #: The registry name, set by :func:`register_weighting` (used in error messages).
    name: ClassVar[str] = "weighting"
    #: ``True`` when the caller must use :meth:`GradNorm.step` under manual optimisation instead
    #: of back-propagating :meth:`combine`.
    requires_manual_backward: ClassVar[bool] = False
    #: ``True`` for gradient aggregators: the caller computes the jacobian and applies
    #: :meth:`aggregate`'s direction.
    requires_jacobian: ClassVar[bool] = False
    #: ``True`` when the strategy needs :meth:`update` with the losses after the optimiser step.
    requires_update: ClassVar[bool] = False

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

    def _check_finite(self, **tensors: Tensor) -> None:
        """Refuse NaN/inf before any state changes, naming the method and the fix."""
        for what, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteInputError(
                    f"weighting {self.name!r} got a non-finite {what} (NaN or inf); its state is "
                    "unchanged. Lower the learning rate, enable gradient clipping (model.grad_clip) "
                    "or skip such batches with the NonFiniteGuard callback."
                )

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

    def update(self, losses: Tensor) -> None:
        """Receives the (T,) losses of the same batch after the optimiser step (FAMO only).

        Must be given the same values on every rank.
        """

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        """The (P,) direction from the (T, P) jacobian and (T,) losses (aggregators only)."""
        raise NotImplementedError(f"weighting {self.name!r} is a loss weighting, not an aggregator")


class JacobianWeighting(Weighting):
    """A gradient aggregator: :meth:`aggregate` maps the task jacobian to the applied direction.

    Subclasses implement :meth:`_direction`. The base checks shapes and finiteness first (a
    refused call changes no state), computes in float32 whatever the autocast dtype, and keeps
    the last direction's cosine with each task gradient for logging.

    :meth:`combine` (the sum of the task losses) is what is back-propagated while the encoder
    does not train (a linear probe): each head then gets its own task's gradient, as it does
    when the jacobian is aggregated.
    """

    requires_jacobian: ClassVar[bool] = True
    requires_manual_backward: ClassVar[bool] = True
    #: Whether the strategy accepts the jacobian of the shared features (``jacobian_of:
    #: features``); those with per-parameter state (e.g. DB-MTL's gradient EMA) need parameters.
    supports_features: ClassVar[bool] = True

    def __init__(self, tasks: Sequence[str], task_types: Mapping[str, str] | None = None) -> None:
        super().__init__(tasks, task_types)
        self.last_cosines: Tensor
        self.register_buffer(
            "last_cosines", torch.full((self.num_tasks,), float("nan")), persistent=False
        )

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        return self._stack(losses).sum()

    def weights(self) -> dict[str, float]:
        return {}

    def extra_logs(self) -> dict[str, float]:
        if bool(torch.isnan(self.last_cosines).all()):
            return {}
        return {f"cosine/{t}": v for t, v in self._as_dict(self.last_cosines).items()}

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        """The (P,) direction for the (T, P) ``jacobian`` (row t: task t's gradient).

        Runs outside autocast: under bf16 mixed precision the Gramian and the solvers must see
        the float32 jacobian, not a bf16 product of it."""
        with torch.autocast(jacobian.device.type, enabled=False):
            jacobian, losses = self._checked(_at_least_fp32(jacobian), _at_least_fp32(losses))
            direction = self._direction(jacobian, losses)
            self._record_cosines(jacobian, direction)
        return direction

    def _checked(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        if jacobian.ndim != 2 or jacobian.shape[0] != self.num_tasks:
            raise ValueError(
                f"weighting {self.name!r} expects a ({self.num_tasks}, P) jacobian, got shape "
                f"{tuple(jacobian.shape)}"
            )
        losses = losses.detach().float().reshape(-1)
        if losses.numel() != self.num_tasks:
            raise ValueError(
                f"weighting {self.name!r} expects {self.num_tasks} losses, got {losses.numel()}"
            )
        jacobian = jacobian.detach().float()
        self._check_finite(jacobian=jacobian, losses=losses)
        return jacobian, losses

    @torch.no_grad()
    def _record_cosines(self, jacobian: Tensor, direction: Tensor) -> None:
        norms = jacobian.norm(dim=1) * direction.norm()
        cosines = (jacobian @ direction) / norms.clamp_min(1e-12)
        self.last_cosines.copy_(cosines.to(self.last_cosines))

    def _direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        raise NotImplementedError


class GramianWeighting(JacobianWeighting):
    """An aggregator whose direction is ``w @ J`` with ``w`` a function of ``J J^T`` and losses.

    Most aggregators are of this form. It matters at scale: with ``jacobian_of: features`` the
    weights come from the Gramian of the feature jacobian, which is exactly the sum of the ranks'
    Gramians under DDP, and the direction on the parameters is ``sum_t w_t grad L_t``.
    """

    def __init__(self, tasks: Sequence[str], task_types: Mapping[str, str] | None = None) -> None:
        super().__init__(tasks, task_types)
        self.last_weights: Tensor
        self.register_buffer(
            "last_weights", torch.full((self.num_tasks,), float("nan")), persistent=False
        )

    def weights(self) -> dict[str, float]:
        if bool(torch.isnan(self.last_weights).all()):
            return {}
        return self._as_dict(self.last_weights)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """The (T,) weights for the (T, T) Gramian of the jacobian (checked first)."""
        gramian, losses = self._checked(_at_least_fp32(gramian), _at_least_fp32(losses))
        weights = self._weights(gramian, losses).to(gramian)
        self.last_weights.copy_(weights.to(self.last_weights))
        with torch.no_grad():  # cos(g_t, w @ J) from the Gramian alone
            inner = gramian @ weights
            norms = (gramian.diagonal() * (weights @ inner)).clamp_min(0).sqrt()
            self.last_cosines.copy_((inner / norms.clamp_min(1e-12)).to(self.last_cosines))
        return weights

    def _direction(self, jacobian: Tensor, losses: Tensor) -> Tensor:
        weights = self._weights(jacobian @ jacobian.T, losses).to(jacobian)
        self.last_weights.copy_(weights.to(self.last_weights))
        return weights @ jacobian

    def _weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        raise NotImplementedError


def _at_least_fp32(tensor: Tensor) -> Tensor:
    """float32, unless the tensor is already float64 (which stays exact)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def generator_state(seed: int) -> Tensor:
    """The CPU generator state of ``seed``, to keep in a buffer."""
    return torch.Generator().manual_seed(int(seed)).get_state()


class SeededMixin:
    """Randomised strategies draw from their own generator, whose state is a buffer.

    Runs are then reproducible from ``seed``, a resumed run continues the same random stream, and
    every DDP rank (same seed, same calls) draws the same numbers. Libraries that draw from
    torch's global generator run inside :meth:`_seeded`, which forks the global state, installs
    ours, and saves what the library consumed.
    """

    rng_state: Tensor

    def _init_rng(self, seed: int) -> None:
        self.seed = int(seed)
        self.register_buffer("rng_state", generator_state(seed))  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _seeded(self, device: torch.device | None = None) -> Iterator[None]:
        devices = [device] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.rng_state.cpu())
            if devices:
                # a CUDA draw (GradDrop's mask on a GPU jacobian) is seeded from our CPU stream
                torch.cuda.manual_seed(int(torch.randint(0, 2**62, ())))
            yield
            self.rng_state.copy_(torch.get_rng_state().to(self.rng_state.device))


#: Registry name -> strategy class.
WEIGHTINGS: Registry[type[Weighting]] = Registry(
    "weighting", hint="set model.weighting to one of them"
)

W = TypeVar("W", bound=type[Weighting])


def register_weighting(name: str) -> Callable[[W], W]:
    """Class decorator: register a strategy under ``name`` and give it that name."""

    def add(cls: W) -> W:
        cls.name = name
        WEIGHTINGS.register(name, cls)
        return cls

    return add


def available_weightings() -> list[str]:
    """Registered strategy names, sorted."""
    return WEIGHTINGS.names()


def build_weighting(
    name: str,
    tasks: Sequence[str],
    task_types: Mapping[str, str] | None = None,
    **options: Any,
) -> Weighting:
    """Builds the strategy registered as ``name`` (case-insensitive) with its ``options``.

    Raises:
        UnknownNameError: ``name`` is not registered (a ``ValueError``); the message lists the
            valid names.
    """
    return WEIGHTINGS.get(name)(tasks, task_types, **options)
