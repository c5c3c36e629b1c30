"""MergeCallback: build the merged SIMO model from single-task checkpoints, then re-align it.

Everything happens in ``setup``, identically on every rank, before DDP wraps the model and before
optimizers exist (Lightning's order: datamodule.setup -> callback.setup -> checkpoint restore ->
DDP). A resumed run therefore merges the same way (same structure, same adapters) and then gets
its trained weights back from the checkpoint; the sources recorded in this callback's state are
compared on resume so a run is never continued on other checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_simo.callbacks.realign import REALIGN_MODES, FeatureCache, apply_realign_mode
from lightning_simo.checkpoints import (
    encoder_state_dict,
    file_sha256,
    head_state_dicts,
    load_state_dict,
)
from lightning_simo.evaluation import evaluate_net, mean_normalized_performance
from lightning_simo.merging import check_compatible, merge
from lightning_simo.modules.tinting import TINT_MODES, TintingModule

__all__ = ["BN_POLICIES", "DEFAULT_ALPHA_GRID", "MergeCallback"]

DEFAULT_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
BN_POLICIES = ("merge", "pretrained", "reestimate")
_SCALED_METHODS = ("task_arithmetic", "ties", "dare")


class MergeCallback(L.Callback):
    """Merge single-task encoders into the module's encoder and choose what re-alignment trains.

    Args:
        checkpoints: one checkpoint per task (the CLI leaves the callback out when empty) (``{task: path}``): Lightning checkpoints of
            single-task SIMOModules, or state dicts / safetensors holding ``net.encoder.*`` and
            ``net.heads.<task>.*``. Loaded as data only.
        method: ``average``, ``task_arithmetic``, ``ties``, ``dare`` (or any registered method).
        scaling: α, a number, or ``"search"``: each α of ``search_grid`` is evaluated on the
            ``search_split`` by mean normalised performance against the single-task models, and
            the best is kept.
        search_grid: the α candidates (default 0, 0.1, ..., 1; TIES often peaks above 1).
        method_options: the method's own options (``density``, ``trim_scope``, ``merge_rule``,
            ``drop_rate``, ``seed``, ``base``).
        bn_stats: BatchNorm running statistics: ``merge`` like weights, keep the ``pretrained``
            ones, or ``reestimate`` them on ``reestimate_batches`` unlabelled training batches.
        realign: ``none``, ``heads``, ``adapters``, ``full``, ``tinting`` / ``adamerging``
            (these two need ``TintingModule``, whose coefficients start at its own
            ``coefficient_init`` whatever α is).
        adapter_rank: rank of the block adapters (``adapters`` mode).
        adapter_form: ``lora`` (paper: f(x) + BAx) or ``residual`` (the authors' code).
        cache_features: with ``heads``, compute each training sample's encoder features once.
        pretrained: θ0 from this checkpoint instead of the module's own encoder weights.
        search_split: split used to choose α (never the test split).
        search_batches: evaluate α on at most this many batches.
    """

    def __init__(
        self,
        checkpoints: dict[str, str] | None = None,
        method: str = "task_arithmetic",
        scaling: float | str = "search",
        search_grid: Sequence[float] | None = None,
        method_options: dict[str, Any] | None = None,
        bn_stats: str = "merge",
        reestimate_batches: int = 10,
        realign: str = "heads",
        adapter_rank: int = 16,
        adapter_form: str = "lora",
        cache_features: bool = True,
        pretrained: str | None = None,
        search_split: str = "val",
        search_batches: int | None = None,
    ) -> None:
        if isinstance(scaling, str) and scaling != "search":
            raise ValueError(f"scaling must be a number or 'search', got {scaling!r}.")
        if not isinstance(scaling, str) and not (math.isfinite(scaling) and scaling >= 0):
            raise ValueError(f"scaling (α) must be a finite number >= 0, got {scaling}.")
        grid = tuple(float(a) for a in (search_grid or DEFAULT_ALPHA_GRID))
        if any(not math.isfinite(a) or a < 0 for a in grid):
            raise ValueError(f"Every α in search_grid must be a finite number >= 0, got {grid}.")
        if bn_stats not in BN_POLICIES:
            raise ValueError(f"bn_stats must be one of {BN_POLICIES}, got {bn_stats!r}.")
        if realign not in REALIGN_MODES:
            raise ValueError(f"realign must be one of {REALIGN_MODES}, got {realign!r}.")
        if search_split == "test":
            raise ValueError("Choosing α on the test split leaks test data; use 'val'.")
        self.checkpoints = dict(checkpoints or {})
        self.method = method
        self.scaling = scaling
        self.search_grid = grid
        self.method_options = dict(method_options or {})
        self.bn_stats = bn_stats
        self.reestimate_batches = reestimate_batches
        self.realign = realign
        self.adapter_rank = adapter_rank
        self.adapter_form = adapter_form
        self.cache_features = cache_features
        self.pretrained = pretrained
        self.search_split = search_split
        self.search_batches = search_batches
        self.alpha: float | None = None
        self.search_scores: dict[float, float] = {}
        self.baseline: dict[str, float] = {}
        self.sources: dict[str, dict[str, str]] = {}
        self._merged = False
        self.restoring = False

    # ------------------------------------------------------------------ state (resume checks)
    def _identity(self) -> dict[str, Any]:
        return {
            # the file hashes identify the sources; paths may differ between machines
            "sources": {t: src["sha256"] for t, src in self.sources.items()},
            "method": self.method,
            "method_options": self.method_options,
            "bn_stats": self.bn_stats,
            "realign": self.realign,
            "adapter_rank": self.adapter_rank,
            "adapter_form": self.adapter_form,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._identity(),
            "paths": {t: src["path"] for t, src in self.sources.items()},
            "alpha": self.alpha,
            "search_scores": {str(a): s for a, s in self.search_scores.items()},
            "baseline": self.baseline,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self._identity()
        for key, value in mine.items():
            if key in state_dict and state_dict[key] != value:
                raise ValueError(
                    f"This run resumes a checkpoint merged with another {key!r} "
                    f"({state_dict[key]!r} there, {value!r} now); resume with the same merge "
                    "config, or start a new run."
                )
        self.alpha = state_dict.get("alpha")
        self.search_scores = {float(a): s for a, s in state_dict.get("search_scores", {}).items()}
        self.baseline = dict(state_dict.get("baseline", {}))

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._merged:
            return
        if not self.checkpoints:
            raise ValueError(
                "MergeCallback needs one checkpoint per task: set merge.checkpoints "
                "({task: path}) in the config."
            )
        net = getattr(pl_module, "net", None)
        tasks = getattr(pl_module, "task_specs", None)
        if net is None or tasks is None:
            raise ValueError("MergeCallback works with SIMOModule (a module with `net` and tasks).")
        if self.realign in TINT_MODES and not isinstance(pl_module, TintingModule):
            raise ValueError(
                f"realign: {self.realign} needs model class "
                "lightning_simo.modules.tinting.TintingModule"
            )
        missing = [t for t in tasks if t not in self.checkpoints]
        if missing:
            raise ValueError(
                f"No checkpoint given for task(s) {missing}; add them to "
                "MergeCallback's `checkpoints` ({task: path})."
            )
        encoder = net.encoder
        own = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        theta0 = encoder_state_dict(load_state_dict(self.pretrained)) if self.pretrained else own
        reference = (
            f"pretrained encoder {self.pretrained}" if self.pretrained else "pretrained encoder"
        )
        finetuned: list[dict[str, Tensor]] = []
        for task in tasks:
            path = self.checkpoints[task]
            state = load_state_dict(path)
            heads = head_state_dicts(state)
            if task not in heads:
                raise ValueError(
                    f"Checkpoint {path!r} given for task {task!r} has no head for it "
                    f"(heads found: {', '.join(sorted(heads)) or 'none'})."
                )
            weights, name = encoder_state_dict(state), f"{task} checkpoint {path!r}"
            # encoder first: another backbone also changes the head's shapes, but is the cause
            try:
                check_compatible(theta0, [weights], names=[name], reference_name=reference)
            except ValueError as err:
                raise ValueError(
                    f"{err}. Merge only checkpoints fine-tuned from this model's encoder (same "
                    "encoder settings: name, model_kwargs)."
                ) from None
            try:
                net.heads[task].load_state_dict(heads[task])
            except RuntimeError as err:
                raise ValueError(
                    f"The {task!r} head in {path!r} does not fit this model's head (different "
                    f"class count or head kind): {str(err).splitlines()[1].strip()}"
                ) from None
            finetuned.append(weights)
            self.sources[task] = {"path": str(path), "sha256": file_sha256(path)}

        # weights (and α) will come from a checkpoint: skip the search. The CLI sets
        # `restoring` when --ckpt_path is given, since Lightning knows the path only after setup.
        resuming = self.restoring or getattr(trainer, "ckpt_path", None) is not None
        direction = self._merge_direction(theta0, finetuned)
        if self.method not in _SCALED_METHODS:
            alpha = None
        elif self.scaling == "search" and not resuming:
            alpha = self._search(trainer, pl_module, theta0, direction, finetuned)
        elif self.scaling == "search":
            alpha = (
                self.alpha if self.alpha is not None else 1.0
            )  # weights come from the checkpoint
        else:
            alpha = float(self.scaling)
        self.alpha = alpha
        encoder.load_state_dict(
            _apply(theta0, direction, 1.0 if alpha is None else alpha), strict=False
        )
        if self.bn_stats == "reestimate":
            self._reestimate_bn(trainer, pl_module)
        apply_realign_mode(net, self.realign, self.adapter_rank, self.adapter_form)
        if self.realign in TINT_MODES:
            tuned_heads = {t: net.heads[t].state_dict() for t in tasks}
            pl_module.configure_tinting(theta0, finetuned, tuned_heads, self.realign)
        if self.realign == "heads" and self.cache_features:
            pl_module.feature_source = FeatureCache(encoder)
        self._merged = True
        self._report(trainer, pl_module)

    def _merge_direction(
        self, theta0: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """θ(1) - θ0: every supported method is linear in α, so one merge serves the search."""
        options = dict(self.method_options)
        if self.method in _SCALED_METHODS:
            options["scaling"] = 1.0
        bn = "pretrained" if self.bn_stats == "reestimate" else self.bn_stats
        merged = merge(theta0, finetuned, self.method, bn_stats=bn, **options)
        return {
            k: (merged[k].float() - theta0[k].float())
            if theta0[k].is_floating_point()
            else merged[k]
            for k in merged
        }

    def _search(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        theta0: Mapping[str, Tensor],
        direction: Mapping[str, Tensor],
        finetuned: Sequence[Mapping[str, Tensor]],
    ) -> float:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "loader"):
            raise ValueError("α search needs a DenseDataModule (it evaluates on the val split).")
        device = trainer.strategy.root_device
        pl_module.to(device)
        net, tasks = pl_module.net, pl_module.task_specs
        loader = dm.loader(self.search_split)
        if not self.baseline:
            for task, weights in zip(tasks, finetuned, strict=True):
                net.encoder.load_state_dict(weights, strict=False)
                values = evaluate_net(net, loader, {task: tasks[task]}, device, self.search_batches)
                self.baseline.update(values)
        for alpha in self.search_grid:
            net.encoder.load_state_dict(_apply(theta0, direction, alpha), strict=False)
            values = evaluate_net(net, loader, tasks, device, self.search_batches)
            self.search_scores[alpha] = mean_normalized_performance(values, self.baseline, tasks)
        best = max(self.search_grid, key=lambda a: (self.search_scores[a], -a))
        # every rank searched the same data deterministically; rank 0's choice is authoritative
        best = float(trainer.strategy.broadcast(best, src=0))
        table = ", ".join(f"{a:g}: {s:.4f}" for a, s in self.search_scores.items())
        rank_zero_info(
            f"[merge] {self.method} α search on {self.search_split} -> {table}; best α = {best:g}"
        )
        return best

    @torch.no_grad()
    def _reestimate_bn(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        encoder = pl_module.net.encoder
        bns = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches seen
        device = trainer.strategy.root_device
        encoder.to(device).train()
        loader = trainer.datamodule.loader(trainer.datamodule.train_split)
        for i, batch in enumerate(loader):
            if i >= self.reestimate_batches:
                break
            encoder(batch["image"].to(device))
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        metrics: dict[str, float] = {"merge/trainable_params": float(trainable)}
        if self.alpha is not None:
            metrics["merge/alpha"] = self.alpha
        for i, (alpha, score) in enumerate(self.search_scores.items()):
            if trainer.logger is not None:
                trainer.logger.log_metrics(
                    {"merge/search_alpha": alpha, "merge/search_score": score}, step=i
                )
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=0)
        rank_zero_info(
            f"[merge] {self.method} of {len(self.sources)} task(s), α = {self.alpha}, "
            f"re-alignment '{self.realign}': {trainable:,} trainable parameters"
        )

    # ------------------------------------------------------------------ runtime
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.realign in ("heads", "adapters", "none"):
            # a frozen encoder must not update BatchNorm statistics or use dropout
            pl_module.net.encoder.eval()


def _apply(
    theta0: Mapping[str, Tensor], direction: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    out = {}
    for key, base in theta0.items():
        if key not in direction:
            out[key] = base
        elif base.is_floating_point():
            out[key] = (base.float() + alpha * direction[key]).to(base.dtype)
        else:
            out[key] = direction[key]
    return out
