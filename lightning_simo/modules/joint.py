"""JointMTLModule: the joint multi-task baseline, one encoder trained on every task at once.

Everything but the training objective is inherited from :class:`SIMOModule` (encoder, heads, task
registry, metrics, logging, linear probe then fine-tune, AdamW + one-cycle): joint MTL differs from
SIMO only in how the task losses become the one loss that is back-propagated, which is the job of a
:mod:`lightning_simo.weighting` strategy held as a submodule (``self.weighting``) so that its state
(GradNorm weights and ``L(0)``, DWA loss history, uncertainty log-variances) is saved in, and
restored from, every checkpoint.

Two optimisation modes:

- ``equal``, ``uncertainty``, ``dwa``: automatic optimisation; the strategy's ``combine`` is the
  training loss. Uncertainty's ``log_var`` is trained by the model optimiser in its own parameter
  group without weight decay; DWA receives the epoch-average training losses (the mean of the
  per-step losses over the steps of every rank) at the end of every training epoch.
- ``gradnorm``: manual optimisation, because GradNorm needs the per-task gradient norms on the
  last shared layer before the model's backward pass. The update runs on the same optimiser and
  schedule as every other strategy.

Gradient clipping is a module argument (``grad_clip``) in every mode: Lightning refuses
``trainer.gradient_clip_val`` under manual optimisation, so keeping one knob on the model lets a
config switch ``--model.weighting`` without touching the trainer section. Clipping runs in
``on_before_optimizer_step``, which Lightning calls after the 16-mixed grad scaler has unscaled
the gradients, so the threshold applies to true gradient norms under every precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_simo.modules.simo import SIMOModule
from lightning_simo.weighting import GradNorm, Weighting, build_weighting

__all__ = ["JointMTLModule"]


class JointMTLModule(SIMOModule):
    """Train one encoder with one head per task on the weighted sum of all task losses.

    The training objective comes from the weighting strategy; validation and test report the
    unweighted mean of the task losses as ``<split>/loss``, so that ``val/loss`` (the checkpoint
    monitor) is comparable across strategies and epochs instead of moving with the strategy's own
    parameters (the uncertainty regulariser even makes the weighted total negative).

    Per training step the weight applied to every task's loss in that step is logged as
    ``weights/<task>`` (GradNorm's update takes effect from the next step), and the strategy's
    extra scalars as ``weights/<name>`` (``weights/log_var/<task>`` for uncertainty,
    ``weights/gradnorm/...`` for GradNorm).

    GradNorm's "last shared layer" is the deepest encoder block whose output the heads read
    (``encoder.indices``): every task's gradient flows through it, and blocks after it receive
    none. While the encoder gets no gradient (the ``probe_epochs`` of a linear probe) there is no
    shared layer to measure: the current weights are applied but not updated, and ``L(0)`` is
    taken when fine-tuning starts. ``gradnorm`` with ``freeze_encoder`` is refused.

    Args:
        tasks: the tasks trained jointly (linked from the datamodule).
        weighting: ``equal`` | ``uncertainty`` | ``gradnorm`` | ``dwa``.
        weighting_options: keyword arguments of the strategy (e.g. ``{alpha: 1.5}`` for GradNorm,
            ``{form: libmtl}`` for uncertainty, ``{temperature: 2.0}`` for DWA).
        grad_clip: clip the global gradient norm of the model to this value (``null``: no
            clipping). Do not also set ``trainer.gradient_clip_val``.
        **kwargs: every other :class:`SIMOModule` argument (encoder, head, learning rates,
            schedule, linear probe, reference metrics, ...).
    """

    def __init__(
        self,
        tasks: list[str],
        weighting: str = "equal",
        weighting_options: dict[str, Any] | None = None,
        grad_clip: float | None = 25.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks=tasks, **kwargs)
        freeze_encoder = bool(kwargs.get("freeze_encoder", False))
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {grad_clip}.")
        self.weighting: Weighting = _build(weighting, self.task_specs, weighting_options or {})
        if self.weighting.requires_manual_backward:
            if freeze_encoder:
                raise ValueError(
                    f"weighting {weighting!r} balances gradients on the shared encoder, which "
                    "freeze_encoder keeps frozen; use another weighting or train the encoder."
                )
            self.automatic_optimization = False
        # Sums of this epoch's per-step training losses (task order) and the step count, for the
        # strategy's end-of-epoch update; not saved: an epoch interrupted mid-way starts over.
        self._epoch_loss_sum: Tensor
        self._epoch_steps: Tensor
        self.register_buffer("_epoch_loss_sum", torch.zeros(len(self.task_specs)), persistent=False)
        self.register_buffer("_epoch_steps", torch.zeros(()), persistent=False)
        self._step_weights: dict[str, float] = {}

    # ------------------------------------------------------------------ objective
    def shared_parameters(self) -> list[Tensor]:
        """GradNorm's ``W``: the parameters of the deepest encoder block the heads read."""
        blocks = self.net.encoder.block_modules()
        return list(blocks[max(self.net.encoder.indices)].parameters())

    def encoder_trains(self) -> bool:
        """Whether the encoder receives gradients in the current epoch."""
        hp = self.hparams
        return not hp.freeze_encoder and self.current_epoch >= hp.probe_epochs

    def combine_losses(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Training: the strategy's objective (one GradNorm update included); evaluation: the
        unweighted mean of the task losses (see the class docstring).

        This is the one place that sees every training step's losses, so it also accumulates
        them for the strategy's end-of-epoch update.
        """
        if not self.training:
            return super().combine_losses(losses)
        with torch.no_grad():
            self._epoch_loss_sum += torch.stack(
                [losses[t].detach().float() for t in self.weighting.tasks]
            )
            self._epoch_steps += 1
        # the weights this step's total is built with (GradNorm.step updates them in place)
        self._step_weights = self.weighting.weights()
        if self.weighting.requires_manual_backward and self.encoder_trains():
            return self.weighting.step(losses, self.shared_parameters())
        return self.weighting.combine(losses)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        total = super().training_step(batch, batch_idx)
        if total is None:
            return None  # NonFiniteGuard skipped the batch
        self._log_weights(int(batch["image"].shape[0]))
        if not self.automatic_optimization:
            self._manual_update(total)
        return total

    def _manual_update(self, total: Tensor) -> None:
        """Backward, (clipping in :meth:`on_before_optimizer_step`), optimiser and schedule.

        ``zero_grad`` runs after :meth:`GradNorm.step`, which reads gradients through
        ``torch.autograd.grad`` and never touches ``.grad``, so the order is immaterial.
        ``manual_backward`` applies the 16-mixed loss scale to the total only.
        """
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(total)
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Clip with ``grad_clip``, after AMP unscaling, in automatic and manual mode alike."""
        clip = self.hparams.grad_clip
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def _log_weights(self, batch_size: int) -> None:
        """The weights applied in this step and the strategy's latest extra scalars."""
        logs = {f"weights/{t}": w for t, w in self._step_weights.items()}
        logs.update({f"weights/{k}": v for k, v in self.weighting.extra_logs().items()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)

    # ------------------------------------------------------------------ epochs
    def on_train_epoch_start(self) -> None:
        self._epoch_loss_sum.zero_()
        self._epoch_steps.zero_()

    def on_train_epoch_end(self) -> None:
        """Give the strategy this epoch's average training losses, identical on every rank."""
        super().on_train_epoch_end()
        sums = torch.cat([self._epoch_loss_sum, self._epoch_steps.reshape(1)])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        steps = float(sums[-1])
        if steps == 0:
            return
        if self.weighting.requires_manual_backward and not self.encoder_trains():
            return  # GradNorm has not started: L(0) comes from the fine-tuning epochs
        averages = (sums[:-1] / steps).tolist()
        self.weighting.on_epoch_end(dict(zip(self.weighting.tasks, averages)))

    def on_validation_epoch_start(self) -> None:
        self._share_buffers_of_rank_zero()

    def on_train_end(self) -> None:
        self._share_buffers_of_rank_zero()

    def _share_buffers_of_rank_zero(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics) under manual optimisation.

        DDP broadcasts buffers at the start of a forward only when the previous forward was
        followed by DDP's own backward; Lightning runs the manual backward inside DDP's forward,
        so with GradNorm each rank would keep its own running statistics and validate (and end
        the fit with) a different model. Automatic optimisation gets this from DDP itself.
        """
        if self.automatic_optimization or self.trainer.world_size < 2:
            return
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        for buffer in self.net.buffers():
            torch.distributed.broadcast(buffer, src=0)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str) -> None:
        """Check the clipping configuration and give GradNorm its all-reduce under DDP."""
        super().setup(stage)
        if stage != "fit":
            return
        if self.hparams.grad_clip is not None and self.trainer.gradient_clip_val:
            raise ValueError(
                "JointMTLModule clips gradients itself (model.grad_clip="
                f"{self.hparams.grad_clip}); remove trainer.gradient_clip_val="
                f"{self.trainer.gradient_clip_val} or set model.grad_clip to null."
            )
        if isinstance(self.weighting, GradNorm) and self.trainer.world_size > 1:
            self.weighting.reduce_fn = self._mean_over_ranks

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if isinstance(self.weighting, GradNorm):
            self.weighting.reduce_fn = None  # drop the reference to the trainer's strategy

    def _mean_over_ranks(self, values: Tensor) -> Tensor:
        """Element-wise all-reduce mean over data-parallel ranks (GradNorm's statistics)."""
        return self.trainer.strategy.reduce(values, reduce_op="mean")

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """SIMOModule's groups plus the strategy's own parameters (uncertainty's ``log_var``) in
        a group without weight decay, which would pull every sigma towards 1; they are
        task-specific like the heads and share the heads' learning rate."""
        own = [p for p in self.weighting.parameters() if p.requires_grad]
        own_ids = {id(p) for p in own}
        groups = []
        for group in super().parameter_groups():
            params = [p for p in group["params"] if id(p) not in own_ids]
            if params:
                groups.append({**group, "params": params})
        if own:
            hp = self.hparams
            groups.append(
                {"params": own, "lr": hp.head_lr or hp.lr, "weight_decay": 0.0, "name": "weighting"}
            )
        return groups


def _build(name: str, specs: Mapping[str, Any], options: Mapping[str, Any]) -> Weighting:
    """Build the strategy, turning a wrong option name into a one-line configuration error."""
    task_types = {t: spec.loss_family for t, spec in specs.items()}
    try:
        return build_weighting(name, list(specs), task_types, **options)
    except TypeError as err:
        raise ValueError(
            f"weighting_options {dict(options)} do not fit weighting {name!r}: {err}"
        ) from None
