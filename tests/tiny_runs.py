"""Tiny real runs of the synthetic workflow, made once per test session and shared.

Two single-task models (segmentation, depth: fit + test, so each run folder holds its
``test_metrics.json``) and their task-arithmetic merge with head re-alignment (α searched on a
two-value grid, CSV + MLflow + TensorBoard loggers, then tested against the single-task
metrics). Everything goes through ``lightning_simo.cli.main`` with the shipped configs and
command-line overrides, as a user would run it; a random tiny ViT stands in for the foundation
encoder.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import TINY_VIT

from lightning_simo.cli import main

REPO = Path(__file__).resolve().parents[1]
TASKS = ("segmentation", "depth")
SEARCH_GRID = (0.3, 0.6)  # neither is the 1.0 a placeholder would show
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
SIZES = {"num_train": 8, "num_val": 8, "num_test": 6, "height": 32, "width": 40, "batch_size": 4}


@dataclass(frozen=True)
class TinyRuns:
    root: Path
    single: dict[str, Path]  # task -> run folder
    merge: Path  # the merge run folder
    mlflow_uri: str | None

    def checkpoint(self, run: Path) -> Path:
        return run / "checkpoints" / "last.ckpt"


def tiny_config(root: Path) -> Path:
    path = root / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {"encoder": {**TINY_VIT, "checkpoint": None}, "probe_epochs": 0}
                },
                "data": {"init_args": dict(SIZES)},
                "trainer": {
                    "max_epochs": 1,
                    "log_every_n_steps": 1,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "accelerator": "cpu",
                },
            }
        )
    )
    return path


def _loggers(root: Path, mlflow_uri: str | None) -> Path:
    loggers = [
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "{root}", "name": "tb"},
        },
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "{root}", "name": "csv"},
        },
    ]
    if mlflow_uri is not None:
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                "init_args": {"experiment_name": "tiny_merge", "tracking_uri": mlflow_uri},
            }
        )
    path = root / "loggers.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"logger": loggers}}))
    return path


def _make(root: Path, monkeypatch: pytest.MonkeyPatch) -> TinyRuns:
    monkeypatch.setattr(sys, "argv", ["lightning_simo"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.7 asks for the opt-in
    tiny = tiny_config(root)
    single = {}
    for task in TASKS:
        run = root / "single_task" / task
        args = [
            "--config",
            str(REPO / "configs/synthetic/single_task.yaml"),
            "--config",
            str(tiny),
            "--data.tasks",
            f"[{task}]",
            f"--trainer.default_root_dir={run}",
        ]
        main(["fit", *args])
        main(["test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
        single[task] = run
    mlflow_uri = (root / "mlruns").as_uri() if HAS_MLFLOW else None
    merge = root / "merge" / "task_arithmetic-heads"
    args = [
        "--config",
        str(REPO / "configs/synthetic/merge.yaml"),
        "--config",
        str(tiny),
        "--config",
        str(_loggers(root, mlflow_uri)),
        "--data.tasks",
        f"[{','.join(TASKS)}]",
        f"--trainer.default_root_dir={merge}",
        f"--merge.checkpoints={ {t: str(single[t] / 'checkpoints/last.ckpt') for t in TASKS} }",
        f"--merge.search_grid=[{','.join(str(a) for a in SEARCH_GRID)}]",
        "--model.reference_metrics="
        + str([str(single[t] / "test_metrics.json") for t in TASKS]).replace("'", '"'),
    ]
    main(["fit", *args])
    main(["test", *args, "--ckpt_path", str(merge / "checkpoints" / "last.ckpt")])
    return TinyRuns(root, single, merge, mlflow_uri)


_CACHE: dict[str, TinyRuns] = {}


def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    """The session's tiny runs (made on first use)."""
    if "runs" not in _CACHE:
        with pytest.MonkeyPatch.context() as monkeypatch:
            _CACHE["runs"] = _make(tmp_path_factory.mktemp("tiny_runs"), monkeypatch)
    return _CACHE["runs"]
