"""Where ``test`` writes its metrics: the run folder, never the working directory by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cpu_trainer, tiny_datamodule, tiny_module
from lightning.pytorch.loggers import CSVLogger

TASKS = ("depth",)


def _test(trainer_root: Path | None, **trainer_options: object) -> None:
    module = tiny_module(TASKS)
    data = tiny_datamodule(TASKS, num_test=2, batch_size=2)
    cpu_trainer(trainer_root, **trainer_options).test(module, data, verbose=False)


def test_metrics_go_to_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _test(tmp_path / "run")
    payload = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert payload["tasks"] == ["depth"] and "depth/abs_err" in payload["metrics"]
    assert not (tmp_path / "test_metrics.json").exists()


def test_without_a_run_folder_nothing_lands_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _test(None)
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == []
    # with a logger, the logger's version folder is the run folder
    logger = CSVLogger(tmp_path / "logs", name="run")
    _test(None, logger=logger)
    assert (Path(logger.log_dir) / "test_metrics.json").is_file()
    assert not (tmp_path / "test_metrics.json").exists()
