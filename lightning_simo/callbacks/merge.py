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

from lightning_simo.callbacks.realign import REALIGN_MODES, RealignSettings
from lightning_simo.callbacks.search_report import (
    log_alpha_search,
    log_merge_facts,
    report_restored_alpha,
)
from lightning_simo.evaluation import evaluate_net
from lightning_simo.merging import (
    BN_STATS_POLICIES,
    MERGE_METHODS,
    apply_task_vector,
    merge,
    task_vector,
)
from lightning_simo.merging.search import (
    SearchCache,
    check_search_metric,
    default_cache_path,
    search_key,
    search_scaling,
    search_score,
)
from lightning_simo.merging.sources import Sources, load_sources
from lightning_simo.merging.statistics import gather_statistics, statistics_of

__all__ = ["DEFAULT_ALPHA_GRID", "MergeCallback"]

DEFAULT_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class MergeCallback(L.Callback):
    """Merge single-task encoders into the module's encoder and choose what re-alignment trains.

    Args:
        checkpoints: one checkpoint per task (the CLI leaves the callback out when empty) (``{task: path}``): Lightning checkpoints of
            single-task SIMOModules, or state dicts / safetensors holding ``net.encoder.*`` and
            ``net.heads.<task>.*``. Loaded as data only.
        method: ``average``, ``task_arithmetic``, ``ties``, ``dare`` (or any registered method).
        scaling: α, a number, or ``"search"``: each α of ``search_grid`` is evaluated on the
            ``search_split`` against the single-task models by ``search_metric``, and the best
            is kept.
        search_metric: the search criterion, a form of Δ_MTL over the tasks' primary metrics:
            ``ratio`` (mean normalised performance, the SIMO paper's tables) or ``difference``
            (mean signed relative difference, what the SIMO authors' code maximises).
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
        search_cache: keep the search's scores in ``<default_root_dir>/alpha_search.json``
            (``true``), in this file (a path), or nowhere (``false``). Entries are keyed by the
            sources' content hashes, the method and its options, the grid point and what the
            score was measured on (and the ``search_metric``), so a repeated search is a lookup.
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
        search_cache: bool | str = True,
        search_metric: str = "ratio",
    ) -> None:
        if isinstance(scaling, str) and scaling != "search":
            raise ValueError(f"scaling must be a number or 'search', got {scaling!r}.")
        if not isinstance(scaling, str) and not (math.isfinite(scaling) and scaling >= 0):
            raise ValueError(f"scaling (α) must be a finite number >= 0, got {scaling}.")
        grid = tuple(float(a) for a in (search_grid or DEFAULT_ALPHA_GRID))
        if any(not math.isfinite(a) or a < 0 for a in grid):
            raise ValueError(f"Every α in search_grid must be a finite number >= 0, got {grid}.")
        if bn_stats not in BN_STATS_POLICIES:
            raise ValueError(f"bn_stats must be one of {BN_STATS_POLICIES}, got {bn_stats!r}.")
        self.mode = REALIGN_MODES.get(realign)
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
        self.search_cache = search_cache
        self.search_metric = check_search_metric(search_metric)
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
        self.mode.check_module(self.realign, pl_module)
        encoder = net.encoder
        own = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        sources = load_sources(self.checkpoints, list(tasks), self.pretrained or own)
        sources.attach_heads(net)
        self.sources = {
            t: {"path": sources.paths[t], "sha256": sources.hashes[t]} for t in sources.tasks
        }

        # weights (and α) will come from a checkpoint: skip the search. The CLI sets
        # `restoring` when --ckpt_path is given, since Lightning knows the path only after setup.
        resuming = self.restoring or getattr(trainer, "ckpt_path", None) is not None
        spec = MERGE_METHODS.get(self.method)
        options = spec.normalise(self.method_options)
        scaled = "scaling" in options
        wanted = statistics_of(self.method)
        statistics = (
            self._statistics(trainer, pl_module, sources, wanted, options) if wanted else {}
        )
        direction = self._merge_direction(sources.theta0, sources.finetuned, scaled, statistics)
        if not scaled:
            alpha = None
        elif self.scaling == "search" and not resuming:
            alpha = self._search(trainer, pl_module, sources, direction)
        elif self.scaling == "search":  # weights come from the checkpoint
            alpha = self.alpha if self.alpha is not None else 1.0
        else:
            alpha = float(self.scaling)
        self.alpha = alpha
        merged = apply_task_vector(sources.theta0, direction, 1.0 if alpha is None else alpha)
        encoder.load_state_dict(merged, strict=False)
        if self.bn_stats == "reestimate":
            self._reestimate_bn(trainer, pl_module)
        settings = RealignSettings(self.adapter_rank, self.adapter_form, self.cache_features)
        self.mode.prepare(net, settings)
        if self.mode.configure is not None:
            self.mode.configure(pl_module, sources, settings)
        self._merged = True
        self._report(trainer, pl_module)

    def _merge_direction(
        self,
        theta0: Mapping[str, Tensor],
        finetuned: Sequence[Mapping[str, Tensor]],
        scaled: bool,
        statistics: Mapping[str, Any],
    ) -> dict[str, Tensor]:
        """θ(1) - θ0 of the method. A method with a ``scaling`` option is linear in it (θ0 +
        α·τ_merged), so one merge at α = 1 serves the whole search."""
        options = {**self.method_options, **statistics}
        if scaled:
            options["scaling"] = 1.0
        bn = "pretrained" if self.bn_stats == "reestimate" else self.bn_stats
        merged = merge(theta0, finetuned, self.method, bn_stats=bn, progress=True, **options)
        return task_vector(theta0, merged)

    def _statistics(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        sources: Sources,
        wanted: Sequence[str],
        options: Mapping[str, Any],
    ) -> dict[str, Any]:
        """What a data-based method asks for (its options named in ``STATISTICS``), gathered on
        training images through each task's own fine-tuned model."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "loader"):
            raise ValueError(
                f"merge method {self.method!r} gathers statistics on training images: it needs a "
                "DenseDataModule."
            )
        device = trainer.strategy.root_device
        pl_module.to(device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return gather_statistics(
                wanted,
                pl_module.net,
                pl_module.task_specs,
                sources.finetuned,
                lambda: dm.loader(dm.train_split),
                int(options.get("samples", 256)),
                device,
            )

    def _search(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        sources: Sources,
        direction: Mapping[str, Tensor],
    ) -> float:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "loader"):
            raise ValueError("α search needs a DenseDataModule (it evaluates on the val split).")
        device = trainer.strategy.root_device
        pl_module.to(device)
        net, tasks = pl_module.net, pl_module.task_specs
        loader = dm.loader(self.search_split)
        context = {
            "sources": sources.identity,
            "method": self.method,
            "method_options": self.method_options,
            "bn_stats": self.bn_stats,
            "search_metric": self.search_metric,
            "split": self.search_split,
            "batches": self.search_batches,
            "data": _describe(dm, searched_split_is_trained=self.search_split == "train"),
        }
        cache = None
        if self.search_cache:
            path = (
                default_cache_path(trainer.default_root_dir)
                if self.search_cache is True
                else self.search_cache
            )
            cache = SearchCache(path) if trainer.is_global_zero else SearchCache()
        key = search_key(**context)

        def score(alpha: float) -> float:
            if not self.baseline:
                for task, weights in zip(tasks, sources.finetuned, strict=True):
                    net.encoder.load_state_dict(weights, strict=False)
                    one = {task: tasks[task]}
                    self.baseline.update(
                        evaluate_net(net, loader, one, device, self.search_batches)
                    )
            merged = apply_task_vector(sources.theta0, direction, alpha)
            net.encoder.load_state_dict(merged, strict=False)
            values = evaluate_net(net, loader, tasks, device, self.search_batches)
            return search_score(values, self.baseline, tasks, self.search_metric)

        # evaluation draws from the global RNG (data loader seeds): fork it, so that training
        # afterwards is the same whether the scores were evaluated or read from the cache
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = search_scaling(score, self.search_grid, cache=cache, key=key, context=context)
        self.search_scores = dict(result.scores)
        # every rank searched the same data deterministically; rank 0's choice is authoritative
        best = float(trainer.strategy.broadcast(result.best, src=0))
        table = ", ".join(f"{a:g}: {s:.4f}" for a, s in self.search_scores.items())
        reused = f" ({len(result.cached)} from the cache)" if result.cached else ""
        rank_zero_info(
            f"[merge] {self.method} α search on {self.search_split} ({self.search_metric}) -> "
            f"{table}{reused}; "
            f"best α = {best:g}"
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
        if self.search_scores and not self.restoring:
            log_alpha_search(
                trainer, self.search_scores, self.alpha, self.method, self.search_split
            )
        log_merge_facts(
            trainer, metrics if not self.restoring else {"merge/trainable_params": trainable}
        )
        shown = "from the checkpoint" if self.restoring else self.alpha
        rank_zero_info(
            f"[merge] {self.method} of {len(self.sources)} task(s), α = {shown}, "
            f"re-alignment '{self.realign}': {trainable:,} trainable parameters"
        )

    # ------------------------------------------------------------------ runtime
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restoring:  # Lightning has restored this callback's state (α) by now
            report_restored_alpha(trainer, self.method, self.alpha)
            self.restoring = False

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.mode.trains_encoder:
            # a frozen encoder must not update BatchNorm statistics or use dropout
            pl_module.net.encoder.eval()


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


_TRAIN_ONLY = ("train_budget",)


def _describe(datamodule: Any, searched_split_is_trained: bool = False) -> dict[str, Any]:
    """The datamodule's class and plain public settings (sizes, seeds, roots, tasks): what the
    search cache keys the data by. Files that change on disk under the same settings are not
    seen; pass ``search_cache: false`` when editing a dataset in place. The labelled budget
    only subsets the ``train`` split's dataset, so unless that is the searched split it is left
    out: re-alignments on fractions of the labels share one search."""
    skip = () if searched_split_is_trained else _TRAIN_ONLY
    settings = {
        k: v
        for k, v in vars(datamodule).items()
        if not k.startswith("_") and k not in skip and _plain(v)
    }
    return {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", **settings}
