"""FSDP: what can be checked without a GPU.

Lightning refuses ``strategy=fsdp`` with ``accelerator=cpu`` and torch's FSDP needs an
accelerator device, so two-process FSDP runs live in ``benchmarks/gpu_check.sh`` (see
docs/scale.md); here: GradNorm's refusal under FSDP, and the GPU check's CPU-safe parts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.modules.joint import JointMTLModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_VIT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ["segmentation", "depth"]


def _joint(weighting: str) -> JointMTLModule:
    return JointMTLModule(
        tasks=TASKS,
        num_classes=SyntheticDataModule(tasks=TASKS).num_classes,
        encoder=dict(TINY_VIT),
        head={"kind": "linear", "upsample": 4},
        weighting=weighting,
    )


def _setup(module: JointMTLModule, strategy: object) -> None:
    # setup() only reads these trainer attributes; no process group is needed to reach the check
    module._trainer = SimpleNamespace(strategy=strategy, gradient_clip_val=None, world_size=1)
    module.setup("fit")


def test_gradnorm_under_fsdp_is_refused_naming_the_ddp_strategy() -> None:
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true") as err:
        _setup(_joint("gradnorm"), FSDPStrategy())
    assert "FSDP" in str(err.value) and "'gradnorm'" in str(err.value)


@pytest.mark.parametrize("weighting", ["equal", "uncertainty"])
def test_other_weightings_pass_the_fsdp_check(weighting: str) -> None:
    _setup(_joint(weighting), FSDPStrategy())


def test_gradnorm_under_ddp_passes_the_check() -> None:
    _setup(_joint("gradnorm"), DDPStrategy())


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_parts_and_says_what_it_skips() -> None:
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={
            "PYTHONPATH": str(REPO),
            "PATH": "/usr/bin:/bin",
            "PYTHON": sys.executable,
            "CUDA_VISIBLE_DEVICES": "",
        },
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "task_arithmetic on cpu" in done.stdout and "ties on cpu" in done.stdout
    assert "SKIP: no CUDA device" in done.stdout
