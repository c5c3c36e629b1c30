"""SLURM without a cluster: rank discovery, requeue and resume, and the launch scripts.

- Lightning's ``SLURMEnvironment`` must read world size and ranks from the variables ``srun``
  sets, and refuse a Trainer whose ``devices`` / ``num_nodes`` disagree with the allocation.
- A requeue is replayed for real: with SLURM variables set, a callback sends the process
  ``SIGUSR1`` (what ``--signal=SIGUSR1@90`` delivers), Lightning's own handler writes
  ``hpc_ckpt_1.ckpt`` and calls ``scontrol requeue`` (a stand-in on ``PATH`` records the call),
  and the same command line plus ``--ckpt_path hpc`` continues from the saved step into the same
  TensorBoard version folder.
- ``slurm/launch.sh`` runs against a stand-in ``srun`` that records its arguments, and those
  arguments must parse with the real CLI.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_VIT
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities import rank_zero as fabric_rank_zero
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning_utilities.core import rank_zero as utils_rank_zero

from lightning_simo.cli import main

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
SCRIPTS = ("launch.sh", "single_node.sbatch", "multi_node.sbatch")
JOB_ID = "4242"


def _slurm_env(
    monkeypatch: pytest.MonkeyPatch,
    *,
    nodes: int,
    tasks_per_node: int,
    proc_id: int,
    job_name: str = "lightning_simo",
) -> None:
    """The variables ``srun`` sets for one task of a ``nodes x tasks_per_node`` job."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # resolved (and cached) by SLURMEnvironment
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", str(nodes * tasks_per_node))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(tasks_per_node))
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", f"{tasks_per_node}(x{nodes})")
    monkeypatch.setenv("SLURM_NNODES", str(nodes))
    monkeypatch.setenv("SLURM_PROCID", str(proc_id))
    monkeypatch.setenv("SLURM_LOCALID", str(proc_id % tasks_per_node))
    monkeypatch.setenv("SLURM_NODEID", str(proc_id // tasks_per_node))
    monkeypatch.setenv("SLURM_NODELIST", "gpu[07-08]" if nodes > 1 else "gpu07")
    monkeypatch.setenv("SLURM_JOB_ID", JOB_ID)
    monkeypatch.setenv("SLURM_JOB_NAME", job_name)
    # a Trainer under DDP sets the process-wide rank used by rank_zero_only; undo it afterwards
    monkeypatch.setattr(
        fabric_rank_zero.rank_zero_only, "rank", fabric_rank_zero.rank_zero_only.rank
    )
    monkeypatch.setattr(utils_rank_zero.rank_zero_only, "rank", utils_rank_zero.rank_zero_only.rank)


# ---------------------------------------------------------------------------- rank discovery
@pytest.mark.parametrize(
    ("nodes", "tasks_per_node", "proc_id", "local", "node"),
    [(1, 2, 0, 0, 0), (1, 2, 1, 1, 0), (2, 2, 3, 1, 1)],
)
def test_slurm_environment_resolves_world_size_and_ranks(
    monkeypatch: pytest.MonkeyPatch,
    nodes: int,
    tasks_per_node: int,
    proc_id: int,
    local: int,
    node: int,
) -> None:
    _slurm_env(monkeypatch, nodes=nodes, tasks_per_node=tasks_per_node, proc_id=proc_id)
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (
        nodes * tasks_per_node,
        proc_id,
        local,
        node,
    )
    assert env.main_address == "gpu07"
    assert env.main_port == 15000 + int(JOB_ID[-4:])

    trainer = L.Trainer(
        accelerator="cpu",
        devices=tasks_per_node,
        num_nodes=nodes,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
    )
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.world_size == nodes * tasks_per_node
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (proc_id, local, node)


def test_devices_must_match_the_tasks_per_node(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _slurm_env(monkeypatch, nodes=1, tasks_per_node=2, proc_id=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy="ddp", logger=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match="ntasks-per-node=2"):  # checked at launch
        trainer.fit(BoringModel())


def test_an_interactive_job_is_not_taken_for_a_slurm_launch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _slurm_env(monkeypatch, nodes=1, tasks_per_node=2, proc_id=0, job_name="bash")
    assert not SLURMEnvironment.detect()


# ---------------------------------------------------------------------------- requeue
class SignalAt(L.Callback):
    """Sends this process SIGUSR1 after ``step`` optimizer steps and stops, like a time limit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
            trainer.should_stop = True


class Snapshots(L.Callback):
    """Saves what each run starts from: weights before and after the checkpoint restore."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.run = 0

    def _save(self, name: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        opt_steps = (
            [int(s["step"]) for s in trainer.optimizers[0].state.values() if "step" in s]
            if trainer.optimizers
            else []
        )
        torch.save(
            {
                "global_step": trainer.global_step,
                "optimizer_steps": opt_steps,
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            },
            self.folder / f"{name}.pt",
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run = len(list(self.folder.glob("fresh_*.pt"))) + 1 if self.folder.exists() else 1
        self._save(f"fresh_{self.run}", trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(f"start_{self.run}", trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(f"end_{self.run}", trainer, pl_module)


def _requeue_config(path: Path, snapshots: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(path.parent / "elsewhere"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "{root}", "name": "tb"},
            },
            "callbacks": [
                {"class_path": f"{__name__}.SignalAt", "init_args": {"step": 2}},
                {"class_path": f"{__name__}.Snapshots", "init_args": {"folder": str(snapshots)}},
            ],
        },
        "model": {
            "class_path": "lightning_simo.modules.simo.SIMOModule",
            "init_args": {
                "encoder": TINY_VIT,
                "head": {"kind": "linear", "upsample": 4},
                "lr": 1e-3,
                "schedule": "constant",
            },
        },
        "data": {
            "class_path": "lightning_simo.data.synthetic.SyntheticDataModule",
            "init_args": {
                "tasks": ["depth"],
                "num_train": 16,
                "num_val": 4,
                "num_test": 4,
                "height": 32,
                "width": 40,
                "batch_size": 4,
                "augment": False,
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _stand_in(folder: Path, name: str, record: Path) -> None:
    """An executable ``name`` on PATH that writes its arguments, one per line, to ``record``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > '{record}'\n")
    script.chmod(0o755)


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_requeued_job_resumes_from_the_hpc_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _slurm_env(monkeypatch, nodes=1, tasks_per_node=1, proc_id=0)
    monkeypatch.setattr(sys, "argv", ["lightning_simo"])
    bin_dir, requeue_call = tmp_path / "bin", tmp_path / "scontrol_args.txt"
    _stand_in(bin_dir, "scontrol", requeue_call)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    snapshots, root = tmp_path / "snapshots", tmp_path / "runs" / "requeue"
    config = _requeue_config(tmp_path / "config.yaml", snapshots)
    # what launch.sh passes: a stable run folder and TensorBoard version
    command = [
        "fit",
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.version",
        JOB_ID,
    ]

    main(command)  # the time limit arrives after step 2
    assert requeue_call.read_text().split() == ["requeue", JOB_ID]
    hpc = root / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    first_end = torch.load(snapshots / "end_1.pt", weights_only=True)
    assert first_end["global_step"] == 2

    main([*command, "--ckpt_path", "hpc"])  # the requeued job: same command, resume added
    fresh = torch.load(snapshots / "fresh_2.pt", weights_only=True)
    start = torch.load(snapshots / "start_2.pt", weights_only=True)
    end = torch.load(snapshots / "end_2.pt", weights_only=True)
    assert start["global_step"] == 2 and end["global_step"] == 4
    assert start["optimizer_steps"] and set(start["optimizer_steps"]) == {2}
    trained = [k for k, v in saved["state_dict"].items() if v.is_floating_point()]
    for key in trained:
        assert torch.equal(start["state_dict"][key], saved["state_dict"][key]), key
    assert any(not torch.equal(fresh["state_dict"][k], saved["state_dict"][k]) for k in trained)
    assert any(not torch.equal(end["state_dict"][k], start["state_dict"][k]) for k in trained)

    versions = sorted(p.name for p in (root / "tb").iterdir())
    assert versions == [f"version_{JOB_ID}"]
    # both jobs wrote there (the requeue handler closes the first job's writer early)
    assert len(list((root / "tb" / versions[0]).glob("events.out.tfevents.*"))) >= 2


# ---------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script: str) -> None:
    result = subprocess.run(
        ["bash", "-n", str(SLURM_DIR / script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def _sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in (SLURM_DIR / script).read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            options[match.group(1)] = match.group(2) or ""
    return options


@pytest.mark.parametrize(
    ("script", "multi"), [("single_node.sbatch", False), ("multi_node.sbatch", True)]
)
def test_sbatch_requests_one_task_per_gpu_and_a_requeue_signal(script: str, multi: bool) -> None:
    options = _sbatch_options(script)
    assert (int(options["nodes"]) > 1) is multi
    assert options["gres"] == f"gpu:{options['ntasks-per-node']}"
    assert options["mem"] == "0"
    assert options["signal"] == "SIGUSR1@90"
    assert "requeue" in options
    assert options["job-name"] not in ("bash", "interactive")  # else Lightning ignores SLURM
    assert "slurm/launch.sh" in (SLURM_DIR / script).read_text()


def _launch(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str, list[str]]:
    record = tmp_path / "srun_args.txt"
    record.unlink(missing_ok=True)
    _stand_in(tmp_path / "bin", "srun", record)
    full_env = {**env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "launch.sh"), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    recorded = record.read_text().splitlines() if record.exists() else []
    return result.returncode, result.stderr, recorded


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_launch_matches_the_allocation_and_resumes_only_after_a_requeue(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_simo"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        {
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_NNODES": "2",
            "SLURM_NTASKS_PER_NODE": "4",
            "RUN_ROOT": str(tmp_path / "runs"),
        }
    )
    config = "configs/synthetic/single_task.yaml"
    code, err, args = _launch(tmp_path, env, config, "--trainer.max_epochs", "1")
    assert code == 0, err
    root = tmp_path / "runs" / "synthetic" / "single_task"
    assert args[:4] == ["lightning_simo", "fit", "--config", config]
    assert _value(args, "--trainer.default_root_dir") == str(root)
    assert _value(args, "--trainer.logger.init_args.version") == JOB_ID
    assert (_value(args, "--trainer.devices"), _value(args, "--trainer.num_nodes")) == ("4", "2")
    assert _value(args, "--trainer.strategy") == "ddp_find_unused_parameters_true"
    assert _value(args, "--trainer.sync_batchnorm") == "true"
    assert "--ckpt_path" not in args
    assert args[-2:] == ["--trainer.max_epochs", "1"]  # extra arguments come last and win

    (root / "hpc_ckpt_3.ckpt").write_bytes(b"")
    code, err, resumed = _launch(tmp_path, env, config)
    assert code == 0, err
    assert _value(resumed, "--ckpt_path") == "hpc"

    # the generated command is one the CLI accepts
    with pytest.raises(SystemExit) as exit_info:
        main([*resumed[1:], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["default_root_dir"] == str(root)
    assert str(printed["trainer"]["logger"]["init_args"]["version"]) == JOB_ID
    assert printed["trainer"]["devices"] in (4, "4") and printed["trainer"]["num_nodes"] == 2
    assert printed["trainer"]["sync_batchnorm"] is True
    assert printed["ckpt_path"] == "hpc"


def test_one_gpu_jobs_keep_the_configured_strategy(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        {
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_NNODES": "1",
            "SLURM_TASKS_PER_NODE": "1",
            "RUN_NAME": "one_gpu",
            "RUN_ROOT": str(tmp_path / "runs"),
        }
    )
    code, err, args = _launch(tmp_path, env, "configs/synthetic/merge.yaml")
    assert code == 0, err
    assert _value(args, "--trainer.default_root_dir") == str(tmp_path / "runs" / "one_gpu")
    assert _value(args, "--trainer.devices") == "1"
    assert "--trainer.strategy" not in args and "--trainer.sync_batchnorm" not in args


@pytest.mark.parametrize(
    ("args", "slurm", "message"),
    [
        ((), True, "usage"),
        (("configs/missing.yaml",), True, "config not found"),
        (("configs/synthetic/merge.yaml",), False, "not inside a SLURM job"),
    ],
)
def test_launch_refuses_what_it_cannot_run(
    tmp_path: Path, args: tuple[str, ...], slurm: bool, message: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if slurm:
        env["SLURM_JOB_ID"] = JOB_ID
    code, err, recorded = _launch(tmp_path, env, *args)
    assert code == 2 and message in err
    assert recorded == []  # srun never started
