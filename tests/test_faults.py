"""Fault matrix: interrupted, killed and crowded runs, for every kind of training run.

For single-task fit, merge + heads fit and joint-MTL fit (tiny configs from ``test_resume``, 3
epochs of 2 steps), each case checks what a user sees and what is left on disk:

* SIGTERM / SIGINT at a random step (the process signals itself from ``fault_signal``, so the
  step is exact whatever the load): exit status 143 / 130, one ``interrupted`` line, the lock
  released, ``last.ckpt`` saved at that very step (mid-epoch too); the rerun with
  ``--ckpt_path last`` ends with weights ``torch.equal`` to an uninterrupted run.
* SIGKILL while held at a random step in a subprocess: meanwhile a second ``fit`` on the same
  folder is refused naming the holder's PID; after the kill, a plain rerun is refused (the folder
  holds checkpoints), ``--ckpt_path last`` takes the dead run's lock over with a warning and
  ends equal to the uninterrupted run.
* The study: SIGTERM during a single-task stage exits 143 and leaves that stage ``interrupted``
  with a checkpoint of the interrupted step; the rerun resumes it from there and its results
  table equals an uninterrupted study's.

Runs are in-process (``main([...])``) except the one that must be killed from outside.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from test_resume import cli, single_task_checkpoints, tiny_config  # noqa: F401 (fixture)
from test_study import tiny_settings

from lightning_simo.cli import main
from lightning_simo.io import LOCK_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "synthetic"
TESTS = Path(__file__).resolve().parent
EPOCHS = 3
STEPS = 2 * EPOCHS  # single-task and joint: 8 training scenes, batches of 4 (merge: 1 per epoch)
SEED = int(os.environ.get("FAULT_SEED", random.SystemRandom().randrange(1000)))
"""The random steps come from this seed (set FAULT_SEED to repeat a run); it is in every
failure message."""

KINDS = ("single_task", "merge_heads", "joint_gradnorm")


def kind_config(kind: str, root: Path, checkpoints: dict[str, str]) -> tuple[str, dict]:
    tasks = ["segmentation", "depth"]
    if kind == "single_task":
        config = tiny_config(root, ["segmentation"])
        config["data"]["init_args"]["num_workers"] = 1  # augmentation resumes exactly in workers
        return "single_task.yaml", config
    if kind == "merge_heads":
        merge = {"checkpoints": checkpoints, "search_grid": [0.5, 1.0], "realign": "heads"}
        return "merge.yaml", tiny_config(root, tasks, extra={"merge": merge})
    config = tiny_config(root, tasks, model={"weighting": "gradnorm"})
    config["data"]["init_args"]["num_workers"] = 1
    return "mtl.yaml", config


class Runs:
    """Command lines of one kind of run, all with the same callback list (a resumed run needs
    the callbacks that made its checkpoint); only the signal callback's arguments differ."""

    def __init__(self, kind: str, tmp: Path, checkpoints: dict[str, str]) -> None:
        self.kind, self.tmp, self.checkpoints = kind, tmp, checkpoints

    def args(self, root: Path, signal_name: str = "none", step: int = -1) -> list[str]:
        name, config = kind_config(self.kind, root, self.checkpoints)
        config = copy.deepcopy(config)
        config["trainer"]["max_epochs"] = EPOCHS
        config["trainer"]["callbacks"].append(
            {
                "class_path": "fault_signal.SignalAtStep",
                "init_args": {"signal": signal_name, "step": step, "marker": str(root) + ".fired"},
            }
        )
        path = self.tmp / f"{root.name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return ["fit", "--config", str(CONFIGS / name), "--config", str(path)]


def run_main(args: list[str]) -> int:
    """``main(args)`` in-process; its exit status (0 when it returns)."""
    sigint = signal.getsignal(signal.SIGINT)
    # Python's Ctrl+C handler, whatever the suite was started with: a shell starting it in the
    # background (``cmd &``) leaves SIGINT ignored, and Python then keeps it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main(args)
    except SystemExit as exit_info:
        return 0 if exit_info.code is None else int(exit_info.code)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl+C after a graceful stop
    return 0


def final(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def weights(root: Path, steps: int) -> dict[str, torch.Tensor]:
    ckpt = final(root)
    assert ckpt["global_step"] == steps and ckpt["epoch"] == EPOCHS - 1
    return ckpt["state_dict"]


def assert_equal_weights(reference: dict, resumed: dict, context: str) -> None:
    assert reference.keys() == resumed.keys(), context
    differ = [k for k, v in reference.items() if not torch.equal(v, resumed[k])]
    assert differ == [], f"{context}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def resume_args(args: list[str], root: Path) -> list[str]:
    last = root / "checkpoints" / "last.ckpt"
    return [*args, "--ckpt_path", "last"] if last.is_file() else args


@pytest.fixture(scope="module", params=KINDS)
def reference(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    single_task_checkpoints: dict[str, str],  # noqa: F811
) -> tuple[Runs, dict[str, torch.Tensor], int]:
    """One uninterrupted run per kind, shared by that kind's cases (and its step count)."""
    runs = Runs(request.param, tmp_path_factory.mktemp(request.param), single_task_checkpoints)
    root = runs.tmp / "reference"
    assert run_main(runs.args(root)) == 0
    steps = final(root)["global_step"]
    return runs, weights(root, steps), steps


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_at_a_random_step_then_rerun(
    signame: str, status: int, reference: tuple[Runs, dict, int], capsys: pytest.CaptureFixture
) -> None:
    runs, expected, steps = reference
    step = random.Random(f"{SEED}-{runs.kind}-{signame}").randrange(1, steps)
    context = f"{runs.kind}, {signame} after step {step} (FAULT_SEED={SEED})"
    root = runs.tmp / f"{signame.lower()}"
    args = runs.args(root, signame, step)

    assert run_main(args) == status, context
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lightning_simo: ")]
    assert lines == [lines[0]] and lines[0].startswith("lightning_simo: interrupted:"), err
    assert f"stopped by {signame} at step {step}" in lines[0], lines[0]
    assert not (root / LOCK_FILE).exists()
    assert "Traceback" not in err
    # the stop saved where it stopped, mid-epoch included: nothing is trained twice
    assert final(root)["global_step"] == step, context

    assert run_main(resume_args(args, root)) == 0, context
    assert_equal_weights(expected, weights(root, steps), context)


def _wait_for(done: Callable[[], bool], proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while not done():
        assert proc.poll() is None, "the run ended before it was held:\n" + log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigkill_and_a_second_process_then_rerun(
    reference: tuple[Runs, dict, int], capsys: pytest.CaptureFixture
) -> None:
    runs, expected, steps = reference
    step = random.Random(f"{SEED}-{runs.kind}-SIGKILL").randrange(1, steps)
    context = f"{runs.kind}, SIGKILL after step {step} (FAULT_SEED={SEED})"
    root = runs.tmp / "sigkill"
    held_args = runs.args(root, "hold", step)
    log = runs.tmp / "sigkill.log"
    held = cli(held_args, runs.tmp, log)
    _wait_for(Path(str(root) + ".fired").exists, held, log)

    # a second process on the same folder while the first lives: refused, nothing touched
    before = sorted(p.name for p in (root / "checkpoints").glob("*")) if step > 1 else None
    assert run_main(held_args) == 2
    err = capsys.readouterr().err
    assert f"{root}: in use by another run (PID {held.pid}" in err, err
    if before is not None:
        assert sorted(p.name for p in (root / "checkpoints").glob("*")) == before

    held.send_signal(signal.SIGKILL)
    assert held.wait(timeout=60) == -signal.SIGKILL
    assert (root / LOCK_FILE).exists()  # a killed run cannot clean up: the lock is stale

    rerun = resume_args(held_args, root)
    if rerun != held_args:
        # a plain rerun does not silently start over, nor write best-v1.ckpt beside best.ckpt
        with pytest.warns(UserWarning, match=f"taking over the lock of PID {held.pid}"):
            assert run_main(held_args) == 2
        err = capsys.readouterr().err
        assert "holds checkpoints of an earlier run" in err and "--ckpt_path last" in err, err
        assert run_main(rerun) == 0, context
    else:
        with pytest.warns(UserWarning, match=f"taking over the lock of PID {held.pid}"):
            assert run_main(rerun) == 0, context
    assert_equal_weights(expected, weights(root, steps), context)
    assert not list((root / "checkpoints").glob("*-v1.ckpt"))
    assert not (root / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- the study
def study_settings(out: Path, extra: list[str]):
    settings = tiny_settings(
        out,
        tasks=["segmentation", "depth"],
        merge_methods=["task_arithmetic"],
        realign_modes=[],
        realign_methods=[],
        budgets=[],
        mtl_weightings=[],
        single_task_epochs=2,
    )
    settings.data = {**settings.data, "num_workers": 1}
    settings.extra_args = [*settings.extra_args, *extra]
    return settings


def study_main(settings, tmp: Path) -> int:
    from dataclasses import asdict

    from lightning_simo.study import main as study

    config = tmp / f"{Path(settings.out).name}.yaml"
    config.write_text(yaml.safe_dump(asdict(settings), sort_keys=False))
    try:
        study(["--config", str(config)])
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def results_without_times(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as handle:
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(handle)]


def test_study_sigterm_in_a_single_task_stage_then_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    step = random.Random(f"{SEED}-study").randrange(1, 4)  # 2 epochs of 2 steps
    context = f"study, SIGTERM after step {step} of single_task/depth (FAULT_SEED={SEED})"

    def signal_args(name: str, marker: Path) -> list[str]:
        return [
            "--trainer.callbacks+=fault_signal.SignalAtStep",
            f"--trainer.callbacks.signal={name}",
            f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.marker={marker}",
            "--trainer.callbacks.where=single_task/depth",
        ]

    reference = study_settings(tmp_path / "reference", signal_args("none", tmp_path / "unused"))
    assert study_main(reference, tmp_path) == 0
    expected = results_without_times(tmp_path / "reference")

    interrupted = study_settings(tmp_path / "study", signal_args("SIGTERM", tmp_path / "fired"))
    assert study_main(interrupted, tmp_path) == 143, context
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lightning_simo: ")]
    assert len(lines) == 1 and "single_task/depth stopped by SIGTERM" in lines[0], err
    stage = json.loads((tmp_path / "study/seed_0/single_task/depth/stage.json").read_text())
    assert stage["status"] == "interrupted" and stage["during"] == "fit", stage
    assert not (tmp_path / "study" / "results.csv").exists()
    assert not (tmp_path / "study" / LOCK_FILE).exists()
    last = tmp_path / "study/seed_0/single_task/depth/checkpoints/last.ckpt"
    # saved at the interrupted step, even inside the first epoch: the rerun resumes, never restarts
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step, context

    assert study_main(interrupted, tmp_path) == 0, context
    stage = json.loads((tmp_path / "study/seed_0/single_task/depth/stage.json").read_text())
    assert stage["status"] == "done" and stage["stopped_by"] == "max_epochs", stage
    assert stage["resumed"] is True, stage
    assert results_without_times(tmp_path / "study") == expected, context
