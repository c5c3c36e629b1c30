"""The command line: help, subcommands, and a single-task fit that leaves what users look for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VIT
from lightning.pytorch.callbacks import LearningRateMonitor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_simo.callbacks.resume import InterruptionCheckpoint
from lightning_simo.callbacks.visualize import ImageLogger
from lightning_simo.cli import build_cli, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_simo"])


def test_help_lists_lightning_and_extra_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "study", "analyze"):
        assert command in out


def test_single_task_fit_writes_checkpoints_named_by_task_and_tensorboard_events(
    tmp_path: Path,
) -> None:
    tiny = tmp_path / "tiny.yaml"
    encoder = {**TINY_VIT, "checkpoint": None}
    tiny.write_text(
        yaml.safe_dump(
            {
                "model": {"init_args": {"encoder": encoder, "head": {"upsample": 2}}},
                "data": {
                    "init_args": {
                        "num_train": 8,
                        "num_val": 4,
                        "num_test": 4,
                        "height": 32,
                        "width": 40,
                        "batch_size": 4,
                    }
                },
                "trainer": {
                    "max_epochs": 2,
                    "log_every_n_steps": 1,
                    "enable_progress_bar": False,
                    "accelerator": "cpu",
                },
            }
        )
    )
    root = tmp_path / "runs" / "{tasks}"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/synthetic/single_task.yaml"),
            "--config",
            str(tiny),
            "--data.tasks",
            "[depth]",
            f"--trainer.default_root_dir={root}",
        ]
    )

    run = tmp_path / "runs" / "depth"  # {tasks} became the task name
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "net.heads.depth.out.weight" in ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["tasks"] == ["depth"]
    assert (run / "checkpoints" / "best.ckpt").is_file()

    events = EventAccumulator(
        str(next((run / "tb").glob("version_*"))), size_guidance={"images": 0, "scalars": 0}
    )
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/depth/loss_step",
        "val/depth/loss",
        "val/depth/abs_err",
        "val/depth/rel_err",
    } <= scalars
    assert "val/depth" in events.Tags()["images"]
    abs_err = [e.value for e in events.Scalars("val/depth/abs_err")]
    assert len(abs_err) == 2 and all(v > 0 for v in abs_err)
    assert [e.value for e in events.Scalars("train/samples_seen")] == [8.0, 16.0]


@pytest.mark.parametrize("log_images", [None, "false"])
def test_log_images_false_drops_the_image_logger_and_a_single_callback_is_kept(
    tmp_path: Path, log_images: str | None
) -> None:
    args = [
        "--config",
        str(REPO / "configs/synthetic/single_task.yaml"),
        f"--model.encoder={yaml.safe_dump({**TINY_VIT, 'checkpoint': None}, default_flow_style=True)}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
    ]
    cli = build_cli(args + ([f"--log_images={log_images}"] if log_images else []), run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert (ImageLogger in kinds) == (log_images is None)
    assert InterruptionCheckpoint in kinds
    # one callback given as a mapping, not a list, is a list of one
    single = "{class_path: lightning.pytorch.callbacks.LearningRateMonitor}"
    cli = build_cli([*args, f"--trainer.callbacks={single}"], run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert LearningRateMonitor in kinds and InterruptionCheckpoint in kinds
