"""The study: the whole comparison of the SIMO merging paper, end to end, in one command.

``lightning_simo study --config configs/synthetic/study.yaml`` runs foundation pretraining,
single-task fine-tuning, merging (α searched on val), re-alignment, joint MTL and the test of every
model. Each stage is an ordinary ``lightning_simo fit`` / ``test`` of the configs users run by hand
(called in-process, so there is no second code path); a stage whose outputs are complete is
skipped on a rerun (``--force`` redoes everything). The run folder ends with ``results.md``
(mean ± std and t-intervals over the seeds, then the paper's claims checked), ``results.csv``,
``stages.csv`` (every stage's stopping rule, epochs and wall time), figures and the TensorBoard
logs of every stage; :mod:`lightning_simo.study_report` writes them.

The plan is one builder per stage family (:data:`STAGE_FAMILIES`), each writing its commands
through :class:`Overrides`, so every ``--key=value`` is written once.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch.utilities import rank_zero_info

from lightning_simo.callbacks.costs import read_encoder_passes
from lightning_simo.checkpoints import read_checkpoint
from lightning_simo.interruption import (
    RunInterrupted,
    exit_status,
    interrupting_signal,
    signal_name,
    sigterm_stops_between_runs,
)
from lightning_simo.io import RunLock, atomic_write_text, ensure_writable_dir
from lightning_simo.study_report import summarise, table_columns, write_figures, write_tables

__all__ = [
    "Overrides",
    "Stage",
    "StageError",
    "StudySettings",
    "main",
    "plan_stages",
    "run_study",
]

DONE_FILE = "stage.json"


class StageError(RuntimeError):
    """A stage of the study exited with an error (its own message was printed already)."""


@dataclass
class StudySettings:
    """What the study runs; every field can be overridden on the command line.

    Args:
        out: the run folder (one sub-folder per seed and stage).
        tasks: the tasks to fine-tune, merge and compare.
        seeds: run everything with seeds 0..N-1; every number is reported as mean ± std with a
            t-interval (one seed: the values alone).
        confidence: level of the t-intervals.
        force: redo stages whose outputs are complete.
        configs: the stage configs (the same files users run by hand).
        data: datamodule overrides applied to every task stage (sizes of the synthetic splits).
        data_seed: seed of the scenes and of the labelled subsets, the same for every run seed
            (seeds then differ in initialisation, shuffling, augmentation and dropout, and the
            rendered scenes are shared); ``None``: each run seed draws its own data.
        shared_foundation: pretrain θ0 once for all seeds (the paper's single foundation model)
            instead of once per seed.
        foundation_images: number of synthetic scenes for foundation pretraining.
        foundation_epochs: the cap on foundation epochs (its config stops earlier on a plateau).
        single_task_epochs: the cap on single-task epochs (each stops on a plateau of its val
            loss first; the first epoch is a linear probe).
        merge_methods: merging methods evaluated without re-alignment.
        method_options: per-method options (``density``, ``drop_rate`` ...).
        search_grids: per-method α grids (default 0, 0.1, ..., 1).
        realign_modes: re-alignment modes of the first method of ``realign_methods``.
        realign_methods: merging methods that are re-aligned.
        secondary_realign_modes: modes for the other methods of ``realign_methods`` (``None``:
            ``realign_modes`` without tinting).
        realign_epochs: epochs of each re-alignment (a fixed schedule, as in the paper).
        budgets: fractions of the labelled re-alignment split for the sample-efficiency curve
            (head re-alignment of the first re-aligned method; 1.0 is the main run).
        mtl_weightings: joint-MTL weightings trained for comparison.
        mtl_epochs: the cap on joint-MTL epochs (same plateau rule as the single-task models).
        accelerator: Lightning accelerator for every stage.
        log_images: keep the configs' prediction panels in TensorBoard (off by default: a
            study is read from its tables, and the panels cost a few hundred milliseconds per
            task and epoch of every stage).
        extra_args: more overrides passed to every task stage (last, so they win).
    """

    out: str = "runs/synthetic/study"
    tasks: list[str] = field(default_factory=lambda: ["segmentation", "depth", "normals"])
    seeds: int = 3
    confidence: float = 0.95
    force: bool = False
    configs: dict[str, str] = field(
        default_factory=lambda: {
            "foundation": "configs/synthetic/foundation.yaml",
            "single_task": "configs/synthetic/single_task.yaml",
            "merge": "configs/synthetic/merge.yaml",
            "tinting": "configs/synthetic/merge_tinting.yaml",
            "mtl": "configs/synthetic/mtl.yaml",
        }
    )
    data: dict[str, Any] = field(
        default_factory=lambda: {"num_train": 1500, "num_val": 250, "num_test": 250}
    )
    data_seed: int | None = 0
    shared_foundation: bool = True
    foundation_images: int = 2000
    foundation_epochs: int = 3
    single_task_epochs: int = 30
    merge_methods: list[str] = field(
        default_factory=lambda: ["average", "task_arithmetic", "ties", "dare"]
    )
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"ties": {"density": 0.2}, "dare": {"drop_rate": 0.5}}
    )
    search_grids: dict[str, list[float]] = field(
        default_factory=lambda: {"ties": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]}
    )
    realign_modes: list[str] = field(default_factory=lambda: ["heads", "adapters", "tinting"])
    realign_methods: list[str] = field(default_factory=lambda: ["task_arithmetic", "ties"])
    secondary_realign_modes: list[str] | None = None
    realign_epochs: int = 10
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5])
    mtl_weightings: list[str] = field(default_factory=lambda: ["equal", "uncertainty", "gradnorm"])
    mtl_epochs: int = 30
    accelerator: str = "auto"
    log_images: bool = False
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """One ``fit`` and/or ``test`` of a config, with what its results row should say."""

    name: str
    folder: Path
    fit: list[str] | None
    test: list[str] | None
    row: dict[str, Any] = field(default_factory=dict)
    requires: str | None = None  # a config file that must exist, else the stage is skipped

    @property
    def done_file(self) -> Path:
        return self.folder / DONE_FILE


# ----------------------------------------------------------------------------- planning
def _cli_value(value: Any) -> str:
    """A value as the CLI reads it: strings and paths as written, everything else as JSON
    (which is YAML: lists, mappings, numbers, booleans, null)."""
    if isinstance(value, (str, Path)):
        return str(value)
    return json.dumps(value)


@dataclass(frozen=True)
class Overrides:
    """The arguments of one stage command: a config file and ``--key=value`` overrides.

    ``values`` maps dotted keys (``trainer.max_epochs``) to plain values; a later ``with_``
    replaces a key rather than repeating it, so no argument is written and then overridden.
    """

    config: str
    values: Mapping[str, Any] = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    def with_(self, values: Mapping[str, Any]) -> Overrides:
        return Overrides(self.config, {**self.values, **values}, self.extra)

    def args(self) -> list[str]:
        body = [f"--{key}={_cli_value(value)}" for key, value in self.values.items()]
        return ["--config", self.config, *body, *self.extra]


@dataclass(frozen=True)
class _Seed:
    """What every stage builder of one seed needs: settings, folders, shared overrides."""

    settings: StudySettings
    seed: int

    @property
    def root(self) -> Path:
        return Path(self.settings.out) / f"seed_{self.seed}"

    @property
    def foundation(self) -> Path:
        if self.settings.shared_foundation:
            return Path(self.settings.out) / "foundation"
        return self.root / "foundation"

    def single_task_folder(self, task: str) -> Path:
        return self.root / "single_task" / task

    def base(self, config: str, folder: Path) -> Overrides:
        values = {
            "seed_everything": self.seed,
            "trainer.accelerator": self.settings.accelerator,
            "trainer.default_root_dir": folder,
            "log_images": self.settings.log_images,
        }
        return Overrides(config, values, tuple(self.settings.extra_args))

    def task_stage(self, config: str, folder: Path, tasks: Sequence[str]) -> Overrides:
        """A stage on the task data, starting from the foundation encoder."""
        s = self.settings
        data = {f"data.{k}": v for k, v in s.data.items()}
        data["data.seed"] = self.seed if s.data_seed is None else s.data_seed
        data["data.tasks"] = list(tasks)
        data["model.encoder.checkpoint"] = self.foundation / "checkpoints" / "last.ckpt"
        return self.base(config, folder).with_(data)

    @property
    def references(self) -> list[str]:
        return [str(self.single_task_folder(t) / "test_metrics.json") for t in self.settings.tasks]

    def merge_stage(self, method: str, realign: str, folder: Path, config: str) -> Overrides:
        s = self.settings
        values: dict[str, Any] = {
            "merge.checkpoints": {
                t: str(self.single_task_folder(t) / "checkpoints" / "best.ckpt") for t in s.tasks
            },
            "model.reference_metrics": self.references,
            "merge.method": method,
            "merge.realign": realign,
            # one cache for the whole study: a search repeated by a re-alignment or budget stage
            # (same sources, method, options and val data) is a lookup
            "merge.search_cache": Path(s.out) / "alpha_search.json",
        }
        if method in s.method_options:
            values["merge.method_options"] = s.method_options[method]
        if method in s.search_grids:
            values["merge.search_grid"] = s.search_grids[method]
        return self.task_stage(config, folder, s.tasks).with_(values)


def _fit_test(
    name: str,
    folder: Path,
    overrides: Overrides,
    max_epochs: int,
    checkpoint: str,
    row: dict[str, Any],
    requires: str | None = None,
) -> Stage:
    """A stage that fits (at most ``max_epochs``) and then tests its ``checkpoint``."""
    fit = overrides.with_({"trainer.max_epochs": max_epochs}).args()
    test = overrides.with_({"ckpt_path": folder / "checkpoints" / checkpoint}).args()
    return Stage(name, folder, fit, test, row, requires=requires)


def foundation_stages(p: _Seed) -> list[Stage]:
    """θ0: once per study when shared (planned with seed 0), else once per seed."""
    s = p.settings
    if s.shared_foundation and p.seed != 0:
        return []
    data_seed = p.seed if s.data_seed is None or not s.shared_foundation else s.data_seed
    overrides = p.base(s.configs["foundation"], p.foundation).with_(
        {
            "seed_everything": 0 if s.shared_foundation else p.seed,
            "trainer.max_epochs": s.foundation_epochs,
            "data.num_train": s.foundation_images,
            "data.seed": 1000 + data_seed,  # other scenes than the task data
        }
    )
    return [Stage("foundation", p.foundation, overrides.args(), None)]


def single_task_stages(p: _Seed) -> list[Stage]:
    """One fine-tune per task, to a plateau of its val loss, tested on its best checkpoint."""
    s = p.settings
    return [
        _fit_test(
            f"single_task/{task}",
            p.single_task_folder(task),
            p.task_stage(s.configs["single_task"], p.single_task_folder(task), [task]),
            s.single_task_epochs,
            "best.ckpt",
            {"method": f"single-task ({task})", "group": "single-task", "task": task},
        )
        for task in s.tasks
    ]


def merge_stages(p: _Seed) -> list[Stage]:
    """θ0 with the fine-tuned heads (λ = 0), then each merging method, tested without training."""
    s = p.settings
    zero = p.root / "merge" / "theta0-heads"
    stages = [
        Stage(
            "merge/theta0-heads",
            zero,
            None,
            p.merge_stage("task_arithmetic", "none", zero, s.configs["merge"])
            .with_({"merge.scaling": 0})
            .args(),
            {"method": "θ0 + fine-tuned heads", "group": "reference"},
        )
    ]
    for method in s.merge_methods:
        folder = p.root / "merge" / f"{method}-none"
        overrides = p.merge_stage(method, "none", folder, s.configs["merge"])
        row = {"method": method, "group": "merge"}
        stages.append(Stage(f"merge/{method}", folder, None, overrides.args(), row))
    return stages


def _realign_pairs(s: StudySettings) -> list[tuple[str, str]]:
    secondary = s.secondary_realign_modes
    if secondary is None:
        secondary = [m for m in s.realign_modes if m != "tinting"]
    return [
        (method, mode)
        for i, method in enumerate(s.realign_methods)
        for mode in (s.realign_modes if i == 0 else secondary)
    ]


def realign_stages(p: _Seed) -> list[Stage]:
    """Each re-aligned (method, mode) pair on the val split, for ``realign_epochs``."""
    s = p.settings
    stages = []
    for method, mode in _realign_pairs(s):
        folder = p.root / "merge" / f"{method}-{mode}"
        config = s.configs["tinting"] if mode == "tinting" else s.configs["merge"]
        row = {
            "method": f"{method} + {mode} re-align",
            "group": f"realign-{mode}",
            "labelled": mode != "tinting",
        }
        overrides = p.merge_stage(method, mode, folder, config)
        stages.append(
            _fit_test(
                f"merge/{method}-{mode}",
                folder,
                overrides,
                s.realign_epochs,
                "last.ckpt",
                row,
                requires=config,
            )
        )
    return stages


def budget_stages(p: _Seed) -> list[Stage]:
    """Head re-alignment of the first re-aligned method on fractions of the labelled split."""
    s = p.settings
    if "heads" not in s.realign_modes or not s.realign_methods:
        return []
    method = s.realign_methods[0]
    stages = []
    for budget in s.budgets:
        folder = p.root / "budget" / f"{method}-heads-{budget:g}"
        overrides = p.merge_stage(method, "heads", folder, s.configs["merge"]).with_(
            {"data.train_budget": budget}
        )
        row = {
            "method": f"{method} + heads ({budget:.0%} labels)",
            "group": "budget",
            "budget": budget,
            "labelled": True,
        }
        stages.append(
            _fit_test(f"budget/{budget:g}", folder, overrides, s.realign_epochs, "last.ckpt", row)
        )
    return stages


def mtl_stages(p: _Seed) -> list[Stage]:
    """Joint MTL per weighting, with the single-task models' stopping rule."""
    s = p.settings
    stages = []
    for weighting in s.mtl_weightings:
        folder = p.root / "mtl" / weighting
        overrides = p.task_stage(s.configs["mtl"], folder, s.tasks).with_(
            {"model.weighting": weighting, "model.reference_metrics": p.references}
        )
        row = {"method": f"joint MTL ({weighting})", "group": "mtl", "labelled": True}
        stages.append(
            _fit_test(
                f"mtl/{weighting}",
                folder,
                overrides,
                s.mtl_epochs,
                "best.ckpt",
                row,
                requires=s.configs["mtl"],
            )
        )
    return stages


STAGE_FAMILIES = (
    foundation_stages,
    single_task_stages,
    merge_stages,
    realign_stages,
    budget_stages,
    mtl_stages,
)
"""The stage builders, in dependency order."""


def plan_stages(s: StudySettings, seed: int) -> list[Stage]:
    """Every stage of one seed, in dependency order (the shared foundation only in seed 0)."""
    plan = _Seed(s, seed)
    return [stage for family in STAGE_FAMILIES for stage in family(plan)]


class _StageFailed(Exception):
    """A stage's command failed with a user error (its one line is printed already)."""


def _run_cli(args: list[str]) -> Any:
    """One stage command, in-process; returns the CLI (the study asks it how fit stopped)."""
    from lightning_simo.cli import report_user_error, run

    try:
        return run(args)
    except RunInterrupted:
        raise
    except Exception as err:
        if report_user_error(err):
            raise _StageFailed() from None
        raise


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _checkpoint_step(folder: Path) -> int | None:
    for name in ("last.ckpt", "best.ckpt"):
        path = folder / "checkpoints" / name
        if path.is_file():
            return int(read_checkpoint(path).get("global_step", 0))
    return None


def _last_checkpoint(stage: Stage) -> Path:
    return stage.folder / "checkpoints" / "last.ckpt"


RESUMABLE = ("interrupted", "running")
"""Statuses of a stage stopped from outside: ``running`` is left by a killed study (SIGKILL)."""


def _complete_metrics(stage: Stage, since: float) -> bool:
    """Whether the stage's test wrote ``test_metrics.json`` now, with a value for every task."""
    path = stage.folder / "test_metrics.json"
    if not path.is_file() or path.stat().st_mtime < since - 1:
        return False
    payload = _read_json(path)
    metrics = payload.get("metrics", {})
    tasks = payload.get("tasks") or []
    return bool(tasks) and all(
        any(k.startswith(f"{t}/") and v is not None for k, v in metrics.items()) for t in tasks
    )


def _stage_commands(stage: Stage, previous: dict[str, Any], force: bool) -> list[tuple[str, list]]:
    """The stage's commands: a fit resumed from its last checkpoint when it was interrupted,
    otherwise a fresh one that replaces whatever an earlier, unfinished attempt left."""
    commands: list[tuple[str, list[str]]] = []
    if stage.fit is not None:
        last = _last_checkpoint(stage)
        if not force and previous.get("status") in RESUMABLE and last.is_file():
            commands.append(("fit", [*stage.fit, f"--ckpt_path={last}"]))
        else:
            commands.append(("fit", [*stage.fit, "--overwrite=true"]))
    if stage.test is not None:
        commands.append(("test", stage.test))
    return commands


def run_stage(
    stage: Stage,
    force: bool,
    runner: Callable[[list[str]], Any] = _run_cli,
    label: str | None = None,
) -> dict:
    """Run one stage unless it is done; returns its record (status, wall time, stopping rule).

    ``stage.json`` says ``running`` while the stage runs, ``interrupted`` when a signal stopped
    it (the next study resumes it from its last checkpoint), ``failed`` on an error, and ``done``
    only when its fit ended by its own stopping rule and its test wrote complete metrics.
    """
    label = label or stage.name
    if stage.requires and not Path(stage.requires).is_file():
        rank_zero_info(f"{label}: skipped, {stage.requires} does not exist yet")
        return {"status": "skipped", "reason": f"missing {stage.requires}"}
    previous = _read_json(stage.done_file)
    if previous.get("status") == "done" and not force:
        rank_zero_info(f"{label}: complete, skipped (use --force to redo)")
        return previous
    ensure_writable_dir(stage.folder)
    commands = _stage_commands(stage, previous, force)
    resumed = any(a[-1].startswith("--ckpt_path=") for c, a in commands if c == "fit")
    spent = float(previous.get("wall_time_s") or 0.0) if resumed else 0.0
    start = time.perf_counter()
    record: dict[str, Any] = {"status": "running", "resumed": resumed}

    def save(status: str, **extra: Any) -> dict[str, Any]:
        record.update(status=status, wall_time_s=spent + time.perf_counter() - start, **extra)
        atomic_write_text(stage.done_file, json.dumps(record, indent=2))
        return record

    save("running")
    for command, args in commands:
        began = time.time()
        try:
            result = runner([command, *args])
        except BaseException as err:
            signum = interrupting_signal(err)
            if signum is not None:
                save("interrupted", during=command, signal=signal_name(signum))
                raise RunInterrupted(
                    signum,
                    f"study stage {label} stopped by {signal_name(signum)} during `{command}` "
                    "(rerun the same `lightning_simo study` command: it resumes this stage from "
                    "its last checkpoint and skips the complete ones)",
                ) from None
            save("failed", during=command)
            if isinstance(err, _StageFailed) or (
                isinstance(err, SystemExit) and err.code not in (0, None)
            ):
                raise StageError(
                    f"study stage {label} failed during `{command}` (the error is printed "
                    "above); fix it and rerun: complete stages are skipped."
                ) from None
            raise
        if command == "fit":
            rule = getattr(result, "stopping_rule", None) if result is not None else "unreported"
            if rule is None:
                save("failed", during=command)
                raise StageError(
                    f"study stage {label}: fit returned before its stopping rule (no max_epochs,"
                    " max_steps or early stopping reached); rerun the study to redo it."
                )
            record["stopped_by"] = rule
            trainer = getattr(result, "trainer", None)
            if trainer is not None:
                record["epochs"] = int(trainer.current_epoch)
                # from the trainer: a record needs no checkpoint to be read back
                record["optimizer_steps"] = int(trainer.global_step)
        if command == "test" and result is not None and not _complete_metrics(stage, began):
            save("failed", during=command)
            raise StageError(
                f"study stage {label}: test wrote no complete {stage.folder / 'test_metrics.json'}"
                "; rerun the study to redo it."
            )
    return save("done")


def collect_row(stage: Stage, record: dict, settings: StudySettings) -> dict[str, Any] | None:
    """One results-table row from a stage's ``test_metrics.json``, checkpoint and records.

    Costs: ``epochs`` trained, ``optimizer_steps`` (the trainer's step at the end of the fit;
    the last checkpoint's for records written before it was kept),
    ``labelled_samples`` (distinct labelled images the stage trained on), encoder
    ``encoder_forward`` / ``encoder_backward`` images (fit and α search, not the test loop;
    :mod:`lightning_simo.callbacks.costs`) and the stage's wall time.
    """
    if stage.test is None or record.get("status") == "skipped":
        return None
    payload = _read_json(stage.folder / "test_metrics.json")
    row: dict[str, Any] = {k: v for k, v in stage.row.items() if k != "labelled"}
    row.update(payload.get("metrics", {}))
    row["trainable_params"] = payload.get("trainable_params")
    for key, from_checkpoint in (
        ("epochs", _checkpoint_epochs),
        ("optimizer_steps", _checkpoint_step),
    ):
        if not stage.fit:
            row[key] = 0
        elif record.get(key) is not None:
            row[key] = record[key]
        else:  # a record written before the fit's counts were kept
            row[key] = from_checkpoint(stage.folder)
    group = stage.row.get("group")
    if group in ("single-task", "mtl"):
        row["labelled_samples"] = int(settings.data.get("num_train", 0))
    elif stage.row.get("labelled"):
        budget = stage.row.get("budget", 1.0)
        row["labelled_samples"] = max(1, round(budget * int(settings.data.get("num_val", 0))))
    else:
        row["labelled_samples"] = 0
    passes = read_encoder_passes(stage.folder)
    row["encoder_forward"] = passes.get("forward")
    row["encoder_backward"] = passes.get("backward")
    row["wall_time_s"] = record.get("wall_time_s")
    return row


def _checkpoint_epochs(folder: Path) -> int | None:
    path = folder / "checkpoints" / "last.ckpt"
    return int(read_checkpoint(path).get("epoch", 0)) + 1 if path.is_file() else None


ADDITIVE = (
    "trainable_params",
    "epochs",
    "optimizer_steps",
    "encoder_forward",
    "encoder_backward",
    "wall_time_s",
)


def _single_task_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The single-task models as one method: every task's metrics, the costs of all of them
    (labelled samples: the one shared training split)."""
    merged: dict[str, Any] = {"method": "single-task models", "group": "single-task"}
    for row in rows:
        merged.update({k: v for k, v in row.items() if "/" in k})
    merged["delta_mtl_ratio"] = 0.0
    merged["delta_mtl_difference"] = 0.0
    for key in ADDITIVE:
        values = [r.get(key) for r in rows]
        merged[key] = None if any(v is None for v in values) else sum(values)
    merged["labelled_samples"] = max((r.get("labelled_samples") or 0) for r in rows)
    return merged


def _stage_line(seed: int, stage: Stage, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed": seed,
        "stage": stage.name,
        "status": record.get("status"),
        "stopped_by": record.get("stopped_by"),
        "epochs": record.get("epochs"),
        "wall_time_s": record.get("wall_time_s"),
    }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _Progress:
    """``[stage k/n] name ...`` lines with elapsed and estimated remaining time.

    Plain lines (no carriage returns), so a log file or a CI console reads like a terminal. The
    estimate is the mean wall time of the stages run so far times the stages left, so it
    improves as the study goes; stages that are skipped as complete count for nothing.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.start = time.perf_counter()
        self.durations: list[float] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def begin(self, name: str) -> str:
        self.index += 1
        label = f"[stage {self.index}/{self.total}] {name}"
        elapsed = time.perf_counter() - self.start
        if self.durations:
            left = statistics.fmean(self.durations) * (self.total - self.index + 1)
            eta = f"about {_duration(left)} left"
        else:
            eta = "remaining time known after the first stage"
        rank_zero_info(f"{label} ... (elapsed {_duration(elapsed)}, {eta})")
        return label

    def end(self, label: str, record: dict[str, Any], seconds: float) -> None:
        if record.get("status") == "done" and seconds > 0.5:
            self.durations.append(seconds)
            rule = f", stopped by {record['stopped_by']}" if record.get("stopped_by") else ""
            if record.get("epochs") is not None:
                rule += f" after {record['epochs']} epoch(s)"
            rank_zero_info(f"{label} done in {_duration(seconds)}{rule}")


def run_study(
    settings: StudySettings, runner: Callable[[list[str]], Any] = _run_cli
) -> list[dict[str, Any]]:
    """Run (or resume) the study and write its tables and figures; returns the summary rows.

    The study holds its folder (a second study there is refused) and SIGTERM stops it between
    stages as well as inside them (Lightning's handler) with the stage recorded as interrupted.
    """
    out = ensure_writable_dir(settings.out)
    with RunLock(out), sigterm_stops_between_runs():
        return _run_study(settings, runner, out)


def _run_study(
    settings: StudySettings, runner: Callable[[list[str]], Any], out: Path
) -> list[dict[str, Any]]:
    per_seed, stage_lines = [], []
    plans = {seed: plan_stages(settings, seed) for seed in range(settings.seeds)}
    progress = _Progress(sum(len(p) for p in plans.values()))
    for seed, stages in plans.items():
        rows, single = [], []
        for stage in stages:
            name = stage.name if settings.seeds == 1 else f"seed {seed}: {stage.name}"
            label = progress.begin(name)
            began = time.perf_counter()
            record = run_stage(stage, settings.force, runner, label)
            progress.end(label, record, time.perf_counter() - began)
            stage_lines.append(_stage_line(seed, stage, record))
            row = collect_row(stage, record, settings)
            if row is not None:
                (single if row.get("group") == "single-task" else rows).append(row)
        if single:
            rows[:0] = [_single_task_row(single), *single]
        per_seed.append(rows)
    summary = summarise(per_seed, settings.confidence)
    for row in summary:
        if row["method"].startswith("single-task ("):
            row["group"] = "single-task run"
    columns = table_columns(summary, settings.tasks)
    write_tables(summary, columns, out, settings.confidence)
    write_figures(summary, out)
    _write_stage_times(stage_lines, out, progress.elapsed())
    atomic_write_text(out / "study.json", json.dumps(asdict(settings), indent=2))
    rank_zero_info(f"[study] results: {out / 'results.md'} ({_duration(progress.elapsed())})")
    return summary


def _write_stage_times(lines: list[dict[str, Any]], out: Path, elapsed: float) -> None:
    """``stages.csv``: every stage's status, stopping rule, epochs and wall time, and the
    study's own wall time (what a rerun that skips complete stages spent is its own)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_stage_line(0, Stage("", Path(), None, None), {})))
    writer.writeheader()
    writer.writerows(lines)
    writer.writerow({"seed": "", "stage": "study (this invocation)", "wall_time_s": elapsed})
    atomic_write_text(out / "stages.csv", buf.getvalue())


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning_simo study",
        description="Run the whole SIMO merging comparison and write results.md / results.csv.",
        default_config_files=[],
    )
    parser.add_argument("-c", "--config", action="config", help="A study YAML.")
    parser.add_class_arguments(StudySettings, nested_key=None, as_group=False)
    return parser


def _flags_as_switches(args: list[str]) -> list[str]:
    """``--force`` alone means ``--force=true`` (jsonargparse wants a value for booleans)."""
    out = []
    for i, arg in enumerate(args):
        nxt = args[i + 1].lower() if i + 1 < len(args) else ""
        if arg == "--force" and nxt not in ("true", "false"):
            arg = "--force=true"
        out.append(arg)
    return out


def main(args: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if args is None else list(args)
    cfg = parser.parse_args(_flags_as_switches(argv))
    init = parser.instantiate_classes(cfg)
    fields = {f for f in StudySettings.__dataclass_fields__}
    settings = StudySettings(**{k: v for k, v in vars(init).items() if k in fields})
    if settings.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {settings.seeds}.")
    try:
        run_study(settings)
    except StageError as err:
        print(f"lightning_simo: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (RunInterrupted, KeyboardInterrupt, SystemExit) as err:
        signum = interrupting_signal(err)
        if signum is None:
            raise
        print(
            f"lightning_simo: interrupted: {err if isinstance(err, RunInterrupted) else signal_name(signum)}",
            file=sys.stderr,
        )
        raise SystemExit(exit_status(signum)) from None
