"""Kill a fit with SIGKILL, resume it from ``last.ckpt``, and get the uninterrupted run's weights.

Each case runs the command line three times on a tiny configuration (4 epochs): once
uninterrupted, once killed with SIGKILL at the start of epoch 2 (``resume_hold.HoldAtEpoch`` holds
it there once ``last.ckpt`` of epoch 1 is written, so the kill point does not depend on the
machine's load), and once resumed with ``--ckpt_path <run>/checkpoints/last.ckpt``. The killed run
is a real ``python -m lightning_simo`` process, as a SIGKILL needs; the uninterrupted and the
resumed runs go through ``cli.main`` in this process (the uninterrupted one while the killed one
starts), with the same number of threads. The final weights must be equal bit for bit.

What exactness takes (see ``lightning_simo.callbacks.rng`` and ``lightning_simo.data.sampling``):
the same ``seed_everything`` and ``RNGStateCheckpoint`` among the callbacks, so that the resumed
run draws dropout and masks from the generator states of the interrupted one; the training order
and augmentation depend on the seed, the epoch and the sample only. Checkpoints saved inside an
epoch (by a signal) are covered by ``tests/test_faults.py``.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SingleTasks, cli_overrides

from lightning_simo.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "synthetic"
TESTS = Path(__file__).resolve().parent
TASKS = ["segmentation", "depth"]
EPOCHS = 4
HOLD_EPOCH = 2


def tiny_config(
    root: Path, tasks: list[str], model: dict | None = None, extra: dict | None = None
) -> dict:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            # every argument the repo configs set, so that nothing of theirs is kept
            "init_args": {
                "dirpath": "{root}/checkpoints",
                "filename": None,
                "monitor": None,
                "save_top_k": -1,
                "save_last": True,
            },
        },
        {"class_path": "lightning_simo.callbacks.rng.RNGStateCheckpoint"},
    ]
    config = {
        "seed_everything": 0,
        **cli_overrides(root, {"max_epochs": EPOCHS, "callbacks": callbacks}, {"tasks": tasks}),
    }
    config["model"]["init_args"].update(model or {})
    config.update(extra or {})
    return config


def cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LIGHTNING_SIMO_DEBUG", None)
    # the in-process runs use this many threads too (bit-equal float reductions)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    # the held run imports tests/resume_hold.py by class path
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "lightning_simo", *args],
            cwd=cwd,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def kill_when_held(proc: subprocess.Popen, marker: Path, last: Path, log: Path) -> None:
    """SIGKILL ``proc`` once it holds at the start of ``HOLD_EPOCH`` with ``last`` written."""
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert last.exists()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def final_state(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def kill_and_resume(tmp_path: Path, config_name: str, config: dict) -> tuple[dict, dict, int]:
    """(uninterrupted final checkpoint, resumed final checkpoint, epoch of the resumed ckpt)."""
    marker = tmp_path / "held"

    def args(name: str, root: Path, hold: bool = False) -> list[str]:
        run = copy.deepcopy(config)
        run["trainer"]["default_root_dir"] = str(root)
        # the same callback list in all three runs (a resumed run needs the callbacks that made
        # its checkpoint), holding only in one
        run["trainer"]["callbacks"].append(
            {
                "class_path": "resume_hold.HoldAtEpoch",
                "init_args": {"epoch": HOLD_EPOCH if hold else -1, "marker": str(marker)},
            }
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run, sort_keys=False))
        return ["fit", "--config", str(CONFIGS / config_name), "--config", str(path)]

    # the uninterrupted run in this process while the killed one starts, then the resumed one
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    log = tmp_path / "killed.log"
    held = cli(args("killed", killed, hold=True), tmp_path, log)
    try:
        main(args("reference", reference))
        kill_when_held(held, marker, last, log)
    finally:
        if held.poll() is None:
            held.kill()
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    main([*args("resumed", killed), "--ckpt_path", str(last)])
    return final_state(reference), final_state(killed), resumed_from


def assert_same_run(reference: dict, resumed: dict, resumed_from: int) -> None:
    assert resumed_from == HOLD_EPOCH - 1  # killed after that epoch's checkpoint, before the next
    assert resumed["epoch"] == reference["epoch"] == EPOCHS - 1
    assert resumed["global_step"] == reference["global_step"]
    assert reference["state_dict"].keys() == resumed["state_dict"].keys()
    differ = [
        k
        for k, v in reference["state_dict"].items()
        if not torch.equal(v, resumed["state_dict"][k])
    ]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def single_task_checkpoints(single_tasks: SingleTasks) -> dict[str, str]:
    """The session's single-task checkpoints of ``TASKS`` (tests/conftest.py)."""
    return {task: single_tasks.checkpoints[task] for task in TASKS}


def test_resume_single_task(tmp_path: Path) -> None:
    # Augmented training data read by a loader worker, a linear probe epoch, then fine-tuning.
    config = tiny_config(tmp_path, ["segmentation"])
    config["data"]["init_args"]["num_workers"] = 1
    reference, resumed, start = kill_and_resume(tmp_path, "single_task.yaml", config)
    assert_same_run(reference, resumed, start)


@pytest.mark.parametrize("realign", ["heads", "adapters"])
def test_resume_merge_and_realign(
    realign: str, tmp_path: Path, single_task_checkpoints: dict[str, str]
) -> None:
    merge = {
        "checkpoints": single_task_checkpoints,
        "search_grid": [0.5, 1.0],
        "realign": realign,
        "adapter_rank": 4,
    }
    config = tiny_config(tmp_path, TASKS, extra={"merge": merge})
    reference, resumed, start = kill_and_resume(tmp_path, "merge.yaml", config)
    assert_same_run(reference, resumed, start)
    merged = resumed["callbacks"]["MergeCallback"]
    assert merged["alpha"] == reference["callbacks"]["MergeCallback"]["alpha"]
    assert any(".adapters." in k for k in resumed["state_dict"]) == (realign == "adapters")


def test_resume_joint_gradnorm(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TASKS, model={"weighting": "gradnorm"})
    config["data"]["init_args"]["num_workers"] = 1  # augmented, as in single-task
    reference, resumed, start = kill_and_resume(tmp_path, "mtl.yaml", config)
    assert_same_run(reference, resumed, start)
    assert any(k.startswith("weighting.") for k in resumed["state_dict"])
