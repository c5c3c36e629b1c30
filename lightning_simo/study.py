"""The study: the whole comparison of the SIMO merging paper, end to end, in one command.

``lightning_simo study --config configs/synthetic/study.yaml`` runs foundation pretraining,
single-task fine-tuning, merging (α searched on val), re-alignment, joint MTL and the test of every
model. Each stage is an ordinary ``lightning_simo fit`` / ``test`` of the configs users run by hand
(called in-process, so there is no second code path); a stage whose outputs are complete is
skipped on a rerun (``--force`` redoes everything). The run folder ends with ``results.md``,
``results.csv``, figures and the TensorBoard logs of every stage.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch.utilities import rank_zero_info

from lightning_simo.checkpoints import read_checkpoint
from lightning_simo.interruption import (
    RunInterrupted,
    exit_status,
    interrupting_signal,
    signal_name,
    sigterm_stops_between_runs,
)
from lightning_simo.io import RunLock, atomic_write, atomic_write_text, ensure_writable_dir

__all__ = ["Stage", "StageError", "StudySettings", "main", "plan_stages", "run_study"]

DONE_FILE = "stage.json"


class StageError(RuntimeError):
    """A stage of the study exited with an error (its own message was printed already)."""


@dataclass
class StudySettings:
    """What the study runs; every field can be overridden on the command line.

    Args:
        out: the run folder (one sub-folder per stage and seed).
        tasks: the tasks to fine-tune, merge and compare.
        seeds: run everything with seeds 0..N-1 and report mean ± std.
        force: redo stages whose outputs are complete.
        configs: the stage configs (the same files users run by hand).
        data: datamodule overrides applied to every task stage (sizes of the synthetic splits).
        foundation_images: number of synthetic scenes for foundation pretraining.
        foundation_epochs: epochs of foundation pretraining.
        single_task_epochs: epochs of each single-task fine-tune (the first is a linear probe).
        merge_methods: merging methods evaluated without re-alignment.
        method_options: per-method options (``density``, ``drop_rate`` ...).
        search_grids: per-method α grids (default 0, 0.1, ..., 1).
        realign_modes: re-alignment modes (heads, adapters, tinting).
        realign_methods: merging methods that are re-aligned.
        realign_epochs: epochs of each re-alignment.
        budgets: fractions of the labelled re-alignment split for the sample-efficiency curve
            (head re-alignment of task arithmetic; 1.0 is the main run).
        mtl_weightings: joint-MTL weightings trained for comparison.
        mtl_epochs: epochs of each joint-MTL run.
        accelerator: Lightning accelerator for every stage.
        extra_args: more overrides passed to every task stage.
    """

    out: str = "runs/synthetic/study"
    tasks: list[str] = field(default_factory=lambda: ["segmentation", "depth", "normals"])
    seeds: int = 1
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
    foundation_images: int = 2000
    foundation_epochs: int = 3
    single_task_epochs: int = 3
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
    realign_epochs: int = 10
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5])
    mtl_weightings: list[str] = field(default_factory=lambda: ["equal", "uncertainty", "gradnorm"])
    mtl_epochs: int = 4
    accelerator: str = "auto"
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


def _yaml(value: Any) -> str:
    return json.dumps(value)


def _trained(
    name: str,
    folder: Path,
    args: list[str],
    epochs: int,
    checkpoint: str,
    row: dict[str, Any],
    requires: str | None = None,
) -> Stage:
    """A stage that fits for ``epochs`` and then tests its ``checkpoint`` (best / last)."""
    return Stage(
        name,
        folder,
        [*args, f"--trainer.max_epochs={epochs}"],
        [*args, f"--ckpt_path={folder / 'checkpoints' / checkpoint}"],
        row,
        requires=requires,
    )


def plan_stages(s: StudySettings, seed: int) -> list[Stage]:
    """Every stage of one seed, in dependency order."""
    root = Path(s.out) / f"seed_{seed}"
    cfg = s.configs
    common = [f"--seed_everything={seed}", f"--trainer.accelerator={s.accelerator}", *s.extra_args]
    data = [f"--data.{k}={_yaml(v)}" for k, v in s.data.items()] + [f"--data.seed={seed}"]
    found = root / "foundation"
    encoder = [f"--model.encoder.checkpoint={found / 'checkpoints' / 'last.ckpt'}"]
    stages = [
        Stage(
            "foundation",
            found,
            [
                "--config",
                cfg["foundation"],
                *common,
                f"--trainer.default_root_dir={found}",
                f"--trainer.max_epochs={s.foundation_epochs}",
                f"--data.num_train={s.foundation_images}",
                f"--data.seed={1000 + seed}",
            ],
            None,
        )
    ]
    single = {t: root / "single_task" / t for t in s.tasks}
    for task, folder in single.items():
        args = [
            "--config",
            cfg["single_task"],
            *common,
            *data,
            *encoder,
            f"--data.tasks={_yaml([task])}",
            f"--trainer.default_root_dir={folder}",
        ]
        stages.append(
            _trained(
                f"single_task/{task}",
                folder,
                args,
                s.single_task_epochs,
                "best.ckpt",
                {"method": f"single-task ({task})", "group": "single-task", "task": task},
            )
        )
    checkpoints = {t: str(f / "checkpoints" / "best.ckpt") for t, f in single.items()}
    references = [str(f / "test_metrics.json") for f in single.values()]
    merge_common = [
        *common,
        *data,
        *encoder,
        f"--data.tasks={_yaml(s.tasks)}",
        f"--merge.checkpoints={_yaml(checkpoints)}",
        f"--model.reference_metrics={_yaml(references)}",
    ]

    def merge_args(method: str, realign: str, folder: Path, config: str) -> list[str]:
        args = [
            "--config",
            config,
            *merge_common,
            f"--merge.method={method}",
            f"--merge.realign={realign}",
            f"--trainer.default_root_dir={folder}",
        ]
        if method in s.method_options:
            args.append(f"--merge.method_options={_yaml(s.method_options[method])}")
        if method in s.search_grids:
            args.append(f"--merge.search_grid={_yaml(s.search_grids[method])}")
        return args

    zero = root / "merge" / "theta0-heads"
    stages.append(
        Stage(
            "merge/theta0-heads",
            zero,
            None,
            [*merge_args("task_arithmetic", "none", zero, cfg["merge"]), "--merge.scaling=0"],
            {"method": "θ0 + fine-tuned heads", "group": "reference"},
        )
    )
    for method in s.merge_methods:
        folder = root / "merge" / f"{method}-none"
        stages.append(
            Stage(
                f"merge/{method}",
                folder,
                None,
                merge_args(method, "none", folder, cfg["merge"]),
                {"method": method, "group": "merge"},
            )
        )
    for method in s.realign_methods:
        for mode in s.realign_modes:
            folder = root / "merge" / f"{method}-{mode}"
            config = cfg["tinting"] if mode == "tinting" else cfg["merge"]
            args = merge_args(method, mode, folder, config)
            if mode == "tinting" and method != s.realign_methods[0]:
                continue
            stages.append(
                _trained(
                    f"merge/{method}-{mode}",
                    folder,
                    args,
                    s.realign_epochs,
                    "last.ckpt",
                    {
                        "method": f"{method} + {mode} re-align",
                        "group": f"realign-{mode}",
                        "labelled": mode != "tinting",
                    },
                    requires=config,
                )
            )
    if "heads" in s.realign_modes and s.realign_methods:
        method = s.realign_methods[0]
        for budget in s.budgets:
            folder = root / "budget" / f"{method}-heads-{budget:g}"
            args = [
                *merge_args(method, "heads", folder, cfg["merge"]),
                f"--data.train_budget={budget}",
            ]
            stages.append(
                _trained(
                    f"budget/{budget:g}",
                    folder,
                    args,
                    s.realign_epochs,
                    "last.ckpt",
                    {
                        "method": f"{method} + heads ({budget:.0%} labels)",
                        "group": "budget",
                        "budget": budget,
                        "labelled": True,
                    },
                )
            )
    for weighting in s.mtl_weightings:
        folder = root / "mtl" / weighting
        args = [
            "--config",
            cfg["mtl"],
            *common,
            *data,
            *encoder,
            f"--data.tasks={_yaml(s.tasks)}",
            f"--model.weighting={weighting}",
            f"--model.reference_metrics={_yaml(references)}",
            f"--trainer.default_root_dir={folder}",
        ]
        stages.append(
            _trained(
                f"mtl/{weighting}",
                folder,
                args,
                s.mtl_epochs,
                "best.ckpt",
                {"method": f"joint MTL ({weighting})", "group": "mtl", "labelled": True},
                requires=cfg["mtl"],
            )
        )
    return stages


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
        if command == "test" and result is not None and not _complete_metrics(stage, began):
            save("failed", during=command)
            raise StageError(
                f"study stage {label}: test wrote no complete {stage.folder / 'test_metrics.json'}"
                "; rerun the study to redo it."
            )
    return save("done")


def _trainable(metrics: dict[str, Any]) -> float | None:
    value = metrics.get("trainable_params")
    return None if value is None else float(value)


def collect_row(stage: Stage, record: dict, settings: StudySettings) -> dict[str, Any] | None:
    """One results-table row from a stage's ``test_metrics.json`` and checkpoint."""
    if stage.test is None or record.get("status") == "skipped":
        return None
    payload = _read_json(stage.folder / "test_metrics.json")
    metrics = payload.get("metrics", {})
    row: dict[str, Any] = {k: v for k, v in stage.row.items() if k != "labelled"}
    row.update(metrics)
    row["trainable_params"] = payload.get("trainable_params")
    row["optimizer_steps"] = _checkpoint_step(stage.folder) if stage.fit else 0
    n_train = int(settings.data.get("num_train", 0))
    n_val = int(settings.data.get("num_val", 0))
    if stage.row.get("group") == "single-task" or stage.row.get("group") == "mtl":
        row["labelled_samples"] = n_train
    elif stage.row.get("labelled"):
        budget = stage.row.get("budget", 1.0)
        row["labelled_samples"] = max(1, round(budget * n_val))
    else:
        row["labelled_samples"] = 0
    row["wall_time_s"] = record.get("wall_time_s")
    return row


def _single_task_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"method": "single-task models", "group": "single-task"}
    for row in rows:
        for key, value in row.items():
            if "/" in key:
                merged[key] = value
    merged["delta_mtl_ratio"] = 0.0
    merged["delta_mtl_difference"] = 0.0
    merged["trainable_params"] = sum(r.get("trainable_params") or 0 for r in rows)
    merged["optimizer_steps"] = sum(r.get("optimizer_steps") or 0 for r in rows)
    merged["labelled_samples"] = max((r.get("labelled_samples") or 0) for r in rows)
    merged["wall_time_s"] = sum(r.get("wall_time_s") or 0 for r in rows)
    return merged


SUMMARY_COLUMNS = ("method", "delta_mtl_ratio", "delta_mtl_difference")
COST_COLUMNS = ("trainable_params", "optimizer_steps", "labelled_samples", "wall_time_s")


def summarise(per_seed: list[list[dict[str, Any]]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Mean (and ± std over seeds) of every numeric column, one row per method."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []
    for rows in per_seed:
        for row in rows:
            if row["method"] not in by_method:
                order.append(row["method"])
            by_method.setdefault(row["method"], []).append(row)
    out = []
    for method in order:
        rows = by_method[method]
        agg: dict[str, Any] = {"method": method, "group": rows[0].get("group")}
        keys = [k for k in rows[0] if k not in ("method", "group", "task")]
        for key in keys:
            values = [r.get(key) for r in rows if isinstance(r.get(key), (int, float))]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            if not values:
                continue
            agg[key] = statistics.fmean(values)
            if len(values) > 1:
                agg[f"{key}_std"] = statistics.stdev(values)
        out.append(agg)
    return out


def table_columns(rows: list[dict[str, Any]], tasks: Sequence[str]) -> list[str]:
    metric_cols = sorted(
        {k for r in rows for k in r if "/" in k and not k.endswith("_std")},
        key=lambda k: (tasks.index(k.split("/")[0]) if k.split("/")[0] in tasks else 99, k),
    )
    normalized = [c for c in metric_cols if c.endswith("/normalized")]
    primary = [c for c in metric_cols if c not in normalized]
    cols = ["method", *SUMMARY_COLUMNS[1:], *primary, *normalized, *COST_COLUMNS]
    stds = [f"{c}_std" for c in SUMMARY_COLUMNS[1:] if any(f"{c}_std" in r for r in rows)]
    return cols + stds


def write_figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Δ_MTL per method and the sample-efficiency curve, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    shown = [r for r in rows if r.get("delta_mtl_ratio") is not None and r["group"] != "budget"]
    if shown:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(shown) + 1.5))
        names = [r["method"] for r in shown]
        values = [r["delta_mtl_ratio"] for r in shown]
        colors = ["tab:gray" if v >= 0 else "tab:red" for v in values]
        ax.barh(names, values, color=colors, xerr=[r.get("delta_mtl_ratio_std", 0) for r in shown])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("Δ_MTL vs single-task models (ratio form, %)")
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "delta_mtl.png"))
        plt.close(fig)
    budget = sorted((r for r in rows if r["group"] == "budget"), key=lambda r: r["budget"])
    full = next((r for r in rows if r["group"] == "realign-heads"), None)
    if budget:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [100 * r["budget"] for r in budget] + ([100.0] if full else [])
        ys = [r.get("delta_mtl_ratio") for r in budget] + (
            [full.get("delta_mtl_ratio")] if full else []
        )
        ax.plot(xs, ys, marker="o", label="merge + head re-alignment")
        mtl = [r for r in rows if r["group"] == "mtl" and r.get("delta_mtl_ratio") is not None]
        for i, r in enumerate(mtl):
            ax.axhline(
                r["delta_mtl_ratio"],
                linestyle="--",
                linewidth=1,
                color=f"C{i + 1}",
                label=r["method"],
            )
        ax.set_xscale("log")
        ax.set_xlabel("labelled re-alignment samples (% of the val split)")
        ax.set_ylabel("Δ_MTL (ratio form, %)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save_figure(fig, out / "sample_efficiency.png"))
        plt.close(fig)
    return paths


def _save_figure(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


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
    from lightning_simo.evaluation import write_results

    per_seed = []
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
            row = collect_row(stage, record, settings)
            if row is not None:
                (single if row.get("group") == "single-task" else rows).append(row)
        if single:
            rows.insert(0, _single_task_row(single))
        per_seed.append(rows)
    summary = summarise(per_seed, settings.tasks)
    columns = table_columns(summary, settings.tasks)
    table_rows = [{c: r.get(c) for c in columns} for r in summary]
    write_results(table_rows, out)
    write_figures(summary, out)
    atomic_write_text(out / "study.json", json.dumps(asdict(settings), indent=2))
    rank_zero_info(f"[study] results: {out / 'results.md'} ({_duration(progress.elapsed())})")
    return summary


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
