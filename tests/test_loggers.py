"""CSV and MLflow runs hold the per-task scalars and the α search, as TensorBoard does.

The tiny merge run of :mod:`tiny_runs` logs to TensorBoard, CSV and MLflow (a local file store) at
once; each must hold ``val/<task>/<metric>``, the α search as a series indexed by α
(``merge/search_score`` at step ``round(100 α)``) and the chosen ``merge/alpha``. The MLflow run is
read back with ``mlflow.search_runs`` from the local store; a ``test`` of the merged checkpoint
reports the α it was merged with, not a placeholder.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_runs import HAS_MLFLOW, SEARCH_GRID, TASKS, TinyRuns, tiny_runs  # noqa: E402

from lightning_simo.callbacks.search_report import ALPHA_STEPS  # noqa: E402

VAL_METRICS = {"segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    return tiny_runs(tmp_path_factory)


def _merge_state(runs: TinyRuns) -> dict:
    state = torch.load(runs.checkpoint(runs.merge), map_location="cpu", weights_only=True)
    return next(v for k, v in state["callbacks"].items() if k.startswith("MergeCallback"))


def _csv_rows(runs: TinyRuns) -> list[dict[str, str]]:
    files = sorted((runs.merge / "csv").glob("version_*/metrics.csv"))
    assert files, "the CSV logger wrote no metrics.csv"
    with open(files[0], newline="") as f:  # version_0: the fit run
        return list(csv.DictReader(f))


def test_csv_logger_holds_task_scalars_and_the_alpha_search(runs: TinyRuns) -> None:
    rows = _csv_rows(runs)
    columns = set(rows[0])
    for task, names in VAL_METRICS.items():
        for name in names:
            assert f"val/{task}/{name}" in columns
            assert any(r[f"val/{task}/{name}"] for r in rows)
    merge = _merge_state(runs)
    scores = {float(a): s for a, s in merge["search_scores"].items()}
    search = {
        int(r["step"]): float(r["merge/search_score"]) for r in rows if r["merge/search_score"]
    }
    assert search == pytest.approx({round(a * ALPHA_STEPS): scores[a] for a in SEARCH_GRID})
    alphas = [float(r["merge/alpha"]) for r in rows if r["merge/alpha"]]
    assert alphas == [merge["alpha"]] and merge["alpha"] in SEARCH_GRID
    assert (runs.merge / "csv" / "version_0" / "alpha_search.png").is_file()


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (optional extra)")
def test_mlflow_run_is_readable_from_the_local_store(
    runs: TinyRuns, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(runs.mlflow_uri)
    found = mlflow.search_runs(experiment_names=["tiny_merge"], output_format="list")
    assert len(found) == 2  # the fit and the test of the merged model
    client = MlflowClient(runs.mlflow_uri)
    fit = min(found, key=lambda r: r.info.start_time)
    keys = set(fit.data.metrics)
    for task, names in VAL_METRICS.items():
        assert {f"val/{task}/{n}" for n in names} <= keys
    merge = _merge_state(runs)
    history = client.get_metric_history(fit.info.run_id, "merge/search_score")
    scores = {float(a): s for a, s in merge["search_scores"].items()}
    assert {m.step: m.value for m in history} == pytest.approx(
        {round(a * ALPHA_STEPS): scores[a] for a in SEARCH_GRID}
    )
    assert fit.data.metrics["merge/alpha"] == merge["alpha"]
    test = max(found, key=lambda r: r.info.start_time)
    assert test.data.metrics["merge/alpha"] == merge["alpha"]  # restored, not a placeholder
    assert {f"test/{t}/loss" for t in TASKS} <= set(test.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(fit.info.run_id)]
    assert artifacts, "no image reached MLflow"


def test_tensorboard_gets_alpha_figure_and_panels(runs: TinyRuns) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(sorted((runs.merge / "tb").glob("version_*"))[0]), size_guidance={"images": 0}
    )
    events.Reload()
    assert {"merge/alpha_search", "val/segmentation", "val/depth"} <= set(events.Tags()["images"])
    steps = [e.step for e in events.Scalars("merge/search_score")]
    assert steps == [round(a * ALPHA_STEPS) for a in SEARCH_GRID]


@pytest.mark.parametrize(
    ("logger", "versioned"),
    [
        ({"class_path": "lightning.pytorch.loggers.CSVLogger"}, True),
        ({"class_path": "lightning.pytorch.loggers.MLFlowLogger"}, False),
        ([{"class_path": "lightning.pytorch.loggers.CSVLogger"}], False),
    ],
)
def test_slurm_launcher_passes_a_version_only_to_a_logger_that_has_one(
    tmp_path: Path, logger: object, versioned: bool
) -> None:
    import os
    import subprocess

    import yaml

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun_args.txt"
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "srun").chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"logger": logger}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_JOB_ID="77",
        RUN_ROOT=str(tmp_path / "runs"),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
    )
    result = subprocess.run(
        ["bash", str(Path(__file__).resolve().parents[1] / "slurm" / "launch.sh"), str(config)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    args = record.read_text().splitlines()
    assert ("--trainer.logger.init_args.version" in args) is versioned
    if versioned:
        assert args[args.index("--trainer.logger.init_args.version") + 1] == "77"


def test_joint_mtl_task_weights_reach_the_csv_logger(tmp_path: Path) -> None:
    import lightning as L
    from conftest import TINY_VIT
    from lightning.pytorch.loggers import CSVLogger

    from lightning_simo.data.synthetic import SyntheticDataModule
    from lightning_simo.modules.joint import JointMTLModule

    tasks = ["segmentation", "depth"]
    dm = SyntheticDataModule(
        tasks=tasks, num_train=8, num_val=4, num_test=4, height=32, width=40, batch_size=4
    )
    module = JointMTLModule(
        tasks=tasks,
        num_classes={"segmentation": 8},
        encoder=TINY_VIT,
        head={"kind": "linear"},
        weighting="uncertainty",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for task in tasks:
        weights = [float(r[f"weights/{task}"]) for r in rows if r.get(f"weights/{task}")]
        assert len(weights) == 2 and all(w > 0 for w in weights)  # one per optimiser step
