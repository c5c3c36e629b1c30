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
- gradient aggregators (``upgrad``, ``pcgrad``, ``mgda``, ``cagrad``, ...: every weighting with
  ``requires_jacobian``): manual optimisation. The task jacobian of the shared encoder (or of its
  features, ``jacobian_of: features``) is computed row by row with ``torch.autograd.grad``; the
  strategy turns it into the encoder's direction; each head gets its own task's gradient; one
  backward of a linear surrogate then writes both (see :mod:`lightning_simo.modules.jacobian`).
- ``famo``: automatic optimisation, plus :meth:`Weighting.update` with the same batch's losses
  after the optimiser step (a no-grad forward in ``on_train_batch_end``).

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
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lightning_simo.models.encoders import EncoderOutput
from lightning_simo.modules.jacobian import split_like, surrogate, task_jacobian
from lightning_simo.modules.schedules import PLATEAU_MONITOR
from lightning_simo.modules.simo import SIMOModule
from lightning_simo.weighting import GradNorm, GramianWeighting, Weighting, build_weighting

__all__ = ["JACOBIAN_OF", "JointMTLModule"]

#: What a gradient aggregator's jacobian is taken of.
JACOBIAN_OF = ("parameters", "features")


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
        weighting: any registered name (``lightning_simo.weighting.available_weightings()``):
            loss weightings ``equal`` | ``uncertainty`` | ``gradnorm`` | ``dwa`` | ``rlw`` |
            ``famo`` | ``stch``, aggregators ``upgrad`` | ``dualproj`` | ``pcgrad`` | ``mgda`` |
            ``cagrad`` | ``nash_mtl`` | ``imtl`` | ``aligned_mtl`` | ``graddrop`` | ``gradvac``
            | ``fairgrad`` | ``db_mtl``.
        weighting_options: keyword arguments of the strategy (e.g. ``{alpha: 1.5}`` for GradNorm,
            ``{form: libmtl}`` for uncertainty, ``{temperature: 2.0}`` for DWA).
        grad_clip: clip the global gradient norm of the model to this value (``null``: no
            clipping). Do not also set ``trainer.gradient_clip_val``.
        jacobian_of: what aggregators see: ``parameters`` (the (T, P) jacobian of every trainable
            encoder parameter, the methods' definition) or ``features`` (the jacobian of the
            encoder's outputs the heads read: T backward passes through the heads only, then
            one through the encoder; MGDA-UB's trick, for large encoders).
        jacobian_chunk: jacobian rows per backward call (1: a loop, least memory; more: batched
            with ``is_grads_batched``).
        **kwargs: every other :class:`SIMOModule` argument (encoder, head, learning rates,
            schedule, linear probe, reference metrics, ...).
    """

    def __init__(
        self,
        tasks: list[str],
        weighting: str = "equal",
        weighting_options: dict[str, Any] | None = None,
        grad_clip: float | None = 25.0,
        jacobian_of: str = "parameters",
        jacobian_chunk: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks=tasks, **kwargs)
        freeze_encoder = bool(kwargs.get("freeze_encoder", False))
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {grad_clip}.")
        if jacobian_of not in JACOBIAN_OF:
            raise ValueError(f"jacobian_of must be one of {JACOBIAN_OF}, got {jacobian_of!r}.")
        if jacobian_chunk < 1:
            raise ValueError(f"jacobian_chunk must be at least 1, got {jacobian_chunk}.")
        self.weighting: Weighting = _build(weighting, self.task_specs, weighting_options or {})
        if (
            self.weighting.requires_jacobian
            and jacobian_of == "features"
            and not getattr(self.weighting, "supports_features", True)
        ):
            raise ValueError(
                f"weighting {weighting!r} keeps per-parameter state and needs "
                "jacobian_of: parameters."
            )
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
        self._step_losses: dict[str, Tensor] = {}
        # features mode: the encoder's real outputs and the detached leaves the heads read
        self._encoder_out: EncoderOutput | None = None
        self._feature_leaves: list[Tensor] = []
        self._update_pending = False

    # ------------------------------------------------------------------ objective
    def shared_parameters(self) -> list[Tensor]:
        """GradNorm's ``W``: the parameters of the deepest encoder block the heads read."""
        blocks = self.net.encoder.block_modules()
        return list(blocks[max(self.net.encoder.indices)].parameters())

    def encoder_trains(self) -> bool:
        """Whether the encoder receives gradients in the current epoch."""
        hp = self.hparams
        return not hp.freeze_encoder and self.current_epoch >= hp.probe_epochs

    def encoder_parameters(self) -> list[Tensor]:
        """The shared parameters an aggregator's jacobian covers: every trainable encoder one."""
        return [p for p in self.net.encoder.parameters() if p.requires_grad]

    def head_parameters(self, task: str) -> list[Tensor]:
        return [p for p in self.net.heads[task].parameters() if p.requires_grad]

    def aggregates(self) -> bool:
        """Whether this training step aggregates a jacobian (an aggregator, encoder training)."""
        return self.weighting.requires_jacobian and self.encoder_trains()

    def encode(self, batch: Mapping[str, Tensor]) -> EncoderOutput:
        """With ``jacobian_of: features``, the heads read detached float32 copies of the
        features (the jacobian's inputs); the real outputs are kept for the encoder's backward."""
        feats = super().encode(batch)
        if not (self.training and self.hparams.jacobian_of == "features" and self.aggregates()):
            return feats
        self._encoder_out = feats
        leaves = [f.detach().float().requires_grad_(True) for f in feats.features]
        tokens = None
        if feats.class_tokens is not None:
            tokens = [t.detach().float().requires_grad_(True) for t in feats.class_tokens]
        self._feature_leaves = leaves + (tokens or [])
        return EncoderOutput(leaves, tokens, feats.image_size)

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
        self._step_losses = dict(losses)
        self._update_pending = self.weighting.requires_update
        # the weights this step's total is built with (GradNorm.step updates them in place)
        self._step_weights = self.weighting.weights()
        if isinstance(self.weighting, GradNorm) and self.encoder_trains():
            return self.weighting.step(losses, self.shared_parameters())
        return self.weighting.combine(losses)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        total = super().training_step(batch, batch_idx)
        if total is None:
            return None  # NonFiniteGuard skipped the batch
        if self.aggregates():
            self._aggregate_update()
            self._step_weights = self.weighting.weights()  # the weights just applied
        elif not self.automatic_optimization:
            self._manual_update(total)
        self._log_weights(int(batch["image"].shape[0]))
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """FAMO: the same batch's losses after the optimiser step (same on every rank).

        The extra forward runs in training mode, as LibMTL's, but its BatchNorm statistics are
        put back: normalisation layers see each batch once, and every DDP rank keeps the
        statistics DDP synchronised.
        """
        if not self._update_pending:
            return
        self._update_pending = False
        saved = [(b, b.clone()) for b in self.net.buffers()]
        with torch.no_grad():
            _, losses = self.task_losses(batch)
            for buffer, value in saved:
                buffer.copy_(value)
        self.weighting.update(torch.stack([losses[t].float() for t in self.weighting.tasks]))

    def _aggregate_update(self) -> None:
        """Jacobian, aggregated direction, own-task head gradients, one backward, one step.

        DDP: the jacobian (``parameters``) or its Gramian (``features``, summed over ranks and
        divided by world_size^2: the Gramian of the whole batch's feature jacobian) is reduced
        before the strategy sees it, so every rank computes the same direction from the same
        input; the surrogate's backward then goes through DDP's reducer, whose average of
        identical directions changes nothing.
        """
        tasks = self.weighting.tasks
        stacked = torch.stack([self._step_losses[t] for t in tasks])
        losses = self._mean_over_ranks(stacked.detach().float())
        chunk = int(self.hparams.jacobian_chunk)
        heads = {t: self.head_parameters(t) for t in tasks}
        head_grads = {
            t: torch.autograd.grad(self._step_losses[t], heads[t], retain_graph=True)
            if heads[t]
            else ()
            for t in tasks
        }
        pairs = [(heads[t], head_grads[t]) for t in tasks]
        if self.hparams.jacobian_of == "features":
            leaves, out = self._feature_leaves, self._encoder_out
            assert out is not None
            jac = task_jacobian(stacked, leaves, chunk)
            if isinstance(self.weighting, GramianWeighting):
                world = self.trainer.world_size
                with torch.autocast(jac.device.type, enabled=False):  # fp32 under bf16 too
                    jac = jac if jac.dtype == torch.float64 else jac.float()
                    gramian = self._sum_over_ranks(jac @ jac.T) / world**2
                    direction = self.weighting.gramian_weights(gramian, losses) @ jac
            else:
                direction = self.weighting.aggregate(jac, losses)
            real = out.features + (out.class_tokens or [])
            pairs.append((real, split_like(direction, leaves)))
            self._encoder_out, self._feature_leaves = None, []
        else:
            shared = self.encoder_parameters()
            jac = self._mean_over_ranks(task_jacobian(stacked, shared, chunk))
            direction = self.weighting.aggregate(jac, losses)
            pairs.append((shared, split_like(direction, shared)))
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(surrogate(pairs))
        opt.step()
        self._step_batch_schedule()

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
        self._step_batch_schedule()

    def _step_batch_schedule(self) -> None:
        """Manual optimisation steps its schedule itself: one cycle after every batch; the
        plateau schedule needs the val loss and steps in :meth:`on_train_epoch_end`."""
        sched = self.lr_schedulers()
        if sched is not None and not isinstance(sched, ReduceLROnPlateau):
            sched.step()

    def _step_plateau_schedule(self) -> None:
        """The plateau schedule under manual optimisation, after the epoch's validation (the
        val loss is synchronised, so every rank takes the same decision)."""
        sched = self.lr_schedulers()
        loss = self.trainer.callback_metrics.get(PLATEAU_MONITOR)
        if isinstance(sched, ReduceLROnPlateau) and loss is not None:
            sched.step(float(loss))

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
        if not self.automatic_optimization:
            self._step_plateau_schedule()
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
        if not self.automatic_optimization:
            self._share_buffers_of_rank_zero()

    def on_train_end(self) -> None:
        self._share_buffers_of_rank_zero()

    def _share_buffers_of_rank_zero(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics).

        DDP broadcasts buffers at the start of a forward only when the previous forward was
        followed by DDP's own backward; Lightning runs the manual backward inside DDP's forward,
        so with GradNorm or an aggregator each rank would keep its own running statistics and
        validate with a different model (automatic optimisation gets this from DDP itself). At
        the end of a fit every mode needs it: the last training forward updated each rank's
        statistics from its own batch, and no DDP forward follows to re-synchronise them.
        """
        if self.trainer.world_size < 2:
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
        if self.weighting.requires_manual_backward and _shards_parameters(self.trainer.strategy):
            raise ValueError(
                f"weighting {self.hparams.weighting!r} needs per-task gradients of a whole "
                "shared encoder block, which FSDP shards across ranks; train it with "
                "--trainer.strategy ddp_find_unused_parameters_true, or use weighting equal or "
                "uncertainty under FSDP."
            )
        if hasattr(self.weighting, "reduce_fn") and self.trainer.world_size > 1:
            self.weighting.reduce_fn = self._mean_over_ranks  # GradNorm's and FAMO's statistics

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if hasattr(self.weighting, "reduce_fn"):
            self.weighting.reduce_fn = None  # drop the reference to the trainer's strategy

    def _mean_over_ranks(self, values: Tensor) -> Tensor:
        """Element-wise all-reduce mean over data-parallel ranks (identity on one device)."""
        if self.trainer.world_size < 2:
            return values
        return self.trainer.strategy.reduce(values, reduce_op="mean")

    def _sum_over_ranks(self, values: Tensor) -> Tensor:
        if self.trainer.world_size < 2:
            return values
        return self.trainer.strategy.reduce(values, reduce_op="sum")

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


def _shards_parameters(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters (FSDP, or FSDP2 through ModelParallelStrategy)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)
