"""SIMOModule: single-task, merged or re-aligned SIMO models (any subset of tasks).

The same module serves every stage that trains or evaluates a SIMONet with per-task losses:
single-task fine-tuning (linear probe, then full fine-tune), evaluating a merged encoder, and
re-alignment (the MergeCallback decides *what* is trainable before optimizers exist; this module
only optimises what requires grad).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_simo.data.base import EVAL_SPLITS
from lightning_simo.evaluation import delta_mtl, normalized_performance
from lightning_simo.models.encoders import EncoderConfig, EncoderOutput
from lightning_simo.models.heads import HeadConfig
from lightning_simo.models.simo import SIMONet
from lightning_simo.modules.schedules import SCHEDULES, on_plateau, one_cycle, stepping_batches
from lightning_simo.tasks import Task, build_tasks

__all__ = ["SIMOModule", "load_reference_metrics"]


def load_reference_metrics(paths: list[str]) -> dict[str, float]:
    """Merge the ``test_metrics.json`` files of single-task runs into one baseline mapping."""
    merged: dict[str, float] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"{path}: reference metrics not found (run `lightning_simo test` on the "
                "single-task model first: it writes test_metrics.json in its run folder)"
            )
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            values = data.get("metrics", data) if isinstance(data, dict) else None
            if not isinstance(values, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not a mapping of metrics")
            merged.update({k: float(v) for k, v in values.items() if v is not None})
        except (UnicodeDecodeError, ValueError, TypeError) as err:
            detail = str(err).split("\n", 1)[0] or type(err).__name__
            raise ValueError(
                f"{path}: not a test_metrics.json ({detail}) (give the file `lightning_simo "
                "test` wrote for the single-task model, or rerun that test)"
            ) from None
    return merged


class SIMOModule(L.LightningModule):
    """Train or evaluate one encoder with one head per task.

    Args:
        tasks: task names (linked from the datamodule's ``tasks``).
        num_classes: class counts of classification tasks (linked from the datamodule).
        encoder: the shared encoder (timm name, weights, levels, input scaling).
        head: the head shape used for every task.
        normal_loss: ``cosine`` (paper) or ``l1`` (the authors' code).
        lr: learning rate of the encoder (and of heads unless ``head_lr`` is set).
        head_lr: learning rate of the heads.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the one-cycle schedule spent warming up (5% in the paper).
        schedule: ``onecycle``, ``constant`` or ``plateau`` (learning rates times
            ``plateau_factor`` after each epoch without a new val-loss minimum; for runs that
            stop on a plateau, see :mod:`lightning_simo.modules.schedules`).
        plateau_factor: the decay of the ``plateau`` schedule.
        plateau_threshold: the relative val-loss improvement the ``plateau`` schedule counts
            as progress (use the same ``min_rel_delta`` in ``PlateauStopping``).
        freeze_encoder: linear probe: the encoder never trains in this run.
        probe_epochs: linear probe then fine-tune in one run: encoder gradients are cut for the
            first ``probe_epochs`` epochs, then the whole model trains.
        init_from: start from the encoder and heads of another checkpoint (e.g. the linear
            probe), loaded as data (no pickled code).
        reference_metrics: ``test_metrics.json`` files of the single-task models; when given,
            ``test`` also reports normalised performance and Δ_MTL (both forms).
        metrics_file: where ``test`` writes its metrics. Default: ``test_metrics.json`` in the
            run folder, ``trainer.default_root_dir``; when that was left at Lightning's default
            (the working directory), the logger's ``log_dir`` instead, and without a logger
            nothing is written (metrics never land in the working directory by accident).
    """

    def __init__(
        self,
        tasks: list[str],
        num_classes: dict[str, int] | None = None,
        encoder: EncoderConfig | None = None,
        head: HeadConfig | None = None,
        normal_loss: str = "cosine",
        lr: float = 1e-4,
        head_lr: float | None = None,
        weight_decay: float = 1e-4,
        warmup_fraction: float = 0.05,
        schedule: str = "onecycle",
        plateau_factor: float = 0.3,
        plateau_threshold: float = 0.01,
        freeze_encoder: bool = False,
        probe_epochs: int = 0,
        init_from: str | None = None,
        reference_metrics: list[str] | None = None,
        metrics_file: str | None = None,
    ) -> None:
        super().__init__()
        enc_cfg = EncoderConfig.coerce(encoder)
        head_cfg = HeadConfig.coerce(head)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction}.")
        self.save_hyperparameters()
        # plain dicts so checkpoints load with weights_only=True
        self.hparams["encoder"] = enc_cfg.to_dict()
        self.hparams["head"] = head_cfg.to_dict()
        self.task_specs: dict[str, Task] = build_tasks(tasks, num_classes, normal_loss)
        self.net = SIMONet(self.task_specs, enc_cfg, head_cfg)
        if init_from:
            self.load_net_weights(init_from)
        if freeze_encoder:
            self.net.encoder.requires_grad_(False)
        self.metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict(
                    {t: spec.make_metrics() for t, spec in self.task_specs.items()}
                )
                for split in EVAL_SPLITS
            }
        )
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))
        self.feature_source: Any = None  # set by re-alignment to serve cached encoder features
        self.eval_feature_source: Any = None  # the same for evaluation, one cache per loop
        self.nonfinite_guard: Any = None  # set by callbacks.guard.NonFiniteGuard
        self.last_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ weights
    def load_net_weights(self, path: str, strict_heads: bool = True) -> None:
        """Load encoder + heads for this module's tasks from another checkpoint of a SIMONet."""
        from lightning_simo.checkpoints import (
            CheckpointError,
            encoder_state_dict,
            head_state_dicts,
            load_state_dict,
        )

        state = load_state_dict(path)
        encoder = encoder_state_dict(state)
        own = self.net.encoder.state_dict()
        wrong = [k for k, v in encoder.items() if k in own and own[k].shape != v.shape]
        if wrong:
            raise CheckpointError(
                f"{path}: made with another encoder ({wrong[0]} has shape "
                f"{list(encoder[wrong[0]].shape)}, this model {list(own[wrong[0]].shape)}) (use "
                "a checkpoint made with the same encoder settings: name, model_kwargs)"
            )
        self.net.encoder.load_state_dict(encoder, strict=False)
        heads = head_state_dicts(state)
        for task in self.task_specs:
            if task not in heads:
                if strict_heads:
                    raise ValueError(
                        f"Checkpoint {path!r} has no head for task {task!r} "
                        f"(it has: {', '.join(sorted(heads)) or 'none'})."
                    )
                continue
            self.net.heads[task].load_state_dict(heads[task])

    @property
    def tasks(self) -> list[str]:
        return list(self.task_specs)

    # ------------------------------------------------------------------ forward
    def encode(self, batch: Mapping[str, Tensor]) -> EncoderOutput:
        """Encoder features of a batch; training batches are served from a cache when
        re-alignment installed one, and evaluation batches from another, one per loop
        (validation, test...: other splits reuse sample indices)."""
        if self.feature_source is not None and self.training:
            cached = self.feature_source(batch)
            if cached is not None:
                return cached
        if self.eval_feature_source is not None and not self.training:
            stage = self._trainer.state.stage if self._trainer is not None else None
            cached = None if stage is None else self.eval_feature_source(batch, str(stage.value))
            if cached is not None:
                return cached
        feats = self.net.encoder(batch["image"])
        if self.training and self.current_epoch < self.hparams.probe_epochs:
            feats = EncoderOutput(
                [f.detach() for f in feats.features],
                None if feats.class_tokens is None else [t.detach() for t in feats.class_tokens],
                feats.image_size,
            )
        return feats

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.net(images)

    def task_losses(
        self, batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        preds = self.net.forward_heads(self.encode(batch))
        losses = {t: self.task_specs[t].loss(preds[t], batch[t]) for t in self.task_specs}
        return preds, losses

    def combine_losses(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The training objective: the unweighted mean of task losses (the SIMO paper)."""
        return torch.stack(list(losses.values())).mean()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        _, losses = self.task_losses(batch)
        guard = self.nonfinite_guard
        if guard is not None and not guard.allows(losses, self.global_step):
            return None  # Lightning skips the batch: no backward, no weight update
        total = self.combine_losses(losses)
        self._log_losses("train", losses, total, batch)
        self.samples_seen += batch["image"].shape[0]
        return total

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("test", batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.net.forward_heads(self.encode(batch))

    def _eval_step(self, split: str, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        preds, losses = self.task_losses(batch)
        total = self.combine_losses(losses)
        self._log_losses(split, losses, total, batch)
        for t, metric in self.metrics[split].items():
            metric.update(preds[t], batch[t])
        return {"preds": {t: p.detach() for t, p in preds.items()}}  # type: ignore[dict-item]

    def _log_losses(
        self, split: str, losses: Mapping[str, Tensor], total: Tensor, batch: Mapping[str, Tensor]
    ) -> None:
        n = int(batch["image"].shape[0])
        on_step = split == "train"
        for t, loss in losses.items():
            self.log(
                f"{split}/{t}/loss",
                loss,
                batch_size=n,
                on_step=on_step,
                on_epoch=True,
                sync_dist=not on_step,
            )
        self.log(
            f"{split}/loss",
            total,
            batch_size=n,
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            sync_dist=not on_step,
        )

    # ------------------------------------------------------------------ epoch ends
    def _compute_metrics(self, split: str) -> dict[str, float]:
        flat: dict[str, float] = {}
        for t, metric in self.metrics[split].items():
            for name, value in metric.compute().items():
                flat[f"{t}/{name}"] = float(value)
            metric.reset()
        return flat

    def on_train_epoch_end(self) -> None:
        # labelled samples seen by all ranks: the cost column of the results tables
        seen = float(self.samples_seen) * self.trainer.world_size
        self.log("train/samples_seen", seen, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metric in self.metrics["val"].values():
                metric.reset()
            return
        values = self._compute_metrics("val")
        self.last_metrics["val"] = values
        self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        values = self._compute_metrics("test")
        logs = {f"test/{k}": v for k, v in values.items()}
        refs = self.hparams.reference_metrics
        if refs:
            baseline = load_reference_metrics(refs)
            logs.update({f"test/{k}": v for k, v in self.relative_scores(values, baseline).items()})
        self.last_metrics["test"] = values
        self.log_dict(logs, sync_dist=False)
        if self.trainer.world_size > 1:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                "Test metrics were computed on several devices; the distributed sampler may "
                "repeat samples to even out batches. Report numbers from a single-device test."
            )
        self._write_metrics_file(logs)

    def primary_metrics(self, values: Mapping[str, float]) -> dict[str, float]:
        return {f"{t}/{s.primary}": values[f"{t}/{s.primary}"] for t, s in self.task_specs.items()}

    def relative_scores(
        self, values: Mapping[str, float], baseline: Mapping[str, float]
    ) -> dict[str, float]:
        """Normalised performance per task and Δ_MTL (ratio and difference forms) vs baseline."""
        out: dict[str, float] = {}
        keys, hib = [], {}
        for t, spec in self.task_specs.items():
            key = f"{t}/{spec.primary}"
            if key not in baseline:
                raise ValueError(
                    f"The reference metrics have no {key!r}; give the test_metrics.json of the "
                    f"single-task model of task {t!r}."
                )
            out[f"{t}/normalized"] = normalized_performance(
                values[key], baseline[key], spec.higher_is_better
            )
            keys.append(key)
            hib[key] = spec.higher_is_better
        res = {k: values[k] for k in keys}
        base = {k: baseline[k] for k in keys}
        out["delta_mtl_ratio"] = delta_mtl(res, base, hib, form="ratio")
        out["delta_mtl_difference"] = delta_mtl(res, base, hib, form="difference")
        return out

    def _write_metrics_file(self, logs: Mapping[str, float]) -> None:
        # every rank resolves the path: under DDP ``Trainer.log_dir`` is a broadcast, and a
        # collective called on one rank only leaves the others a step behind until they hang
        path = self.hparams.metrics_file or _run_folder_metrics(self.trainer)
        if not self.trainer.is_global_zero:
            return
        from lightning_simo.io import atomic_write_text

        if path is None:
            rank_zero_info(
                "test metrics not written: no run folder (set trainer.default_root_dir, a logger "
                "or model.metrics_file)"
            )
            return
        metrics = {k.removeprefix("test/"): v for k, v in logs.items()}
        payload = {
            "tasks": self.tasks,
            "trainable_params": self.trainable_parameters(),
            "metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()},
        }
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Encoder and heads as separate groups (their own learning rates); frozen ones skipped."""
        hp = self.hparams
        head_ids = {id(p) for p in self.net.heads.parameters()}
        heads = [p for p in self.net.heads.parameters() if p.requires_grad]
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = []
        if rest:
            groups.append({"params": rest, "lr": hp.lr, "name": "encoder"})
        if heads:
            groups.append({"params": heads, "lr": hp.head_lr or hp.lr, "name": "heads"})
        return groups

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> Any:
        groups = self.parameter_groups()
        if not groups:
            raise ValueError(
                "Nothing to train: every parameter is frozen. Choose a re-alignment mode that "
                "trains something, or run `test` instead of `fit`."
            )
        hp = self.hparams
        opt = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return opt
        if hp.schedule == "plateau":
            schedule = on_plateau(opt, hp.plateau_factor, hp.plateau_threshold)
            if not self.automatic_optimization:  # the module steps it with the val loss
                del schedule["monitor"]
        else:
            schedule = one_cycle(opt, stepping_batches(self.trainer), hp.warmup_fraction)
        return {"optimizer": opt, "lr_scheduler": schedule}

    def on_fit_start(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        metrics = {"hp/trainable_params": float(self.trainable_parameters())}
        for logger in self.loggers:  # only TensorBoard takes hparam metrics; the rest get scalars
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.hparams, metrics)
            else:
                logger.log_hyperparams(self.hparams)
                logger.log_metrics(metrics, step=0)


def _run_folder_metrics(trainer: L.Trainer) -> str | None:
    """``test_metrics.json`` in the run folder; ``None`` when the only candidate is the working
    directory (Lightning's default root), where a stray file would be mistaken for a result."""
    cwd = Path.cwd().resolve()
    root = trainer.default_root_dir
    if root is not None and Path(root).resolve() != cwd:
        return str(Path(root) / "test_metrics.json")
    log_dir = trainer.log_dir  # asked only when needed: a collective under DDP
    if log_dir is not None and Path(log_dir).resolve() != cwd:
        return str(Path(log_dir) / "test_metrics.json")
    return None
