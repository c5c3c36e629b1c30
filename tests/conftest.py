"""Shared fixtures: tiny encoders, tiny synthetic data, a quiet CPU trainer and single-task
checkpoints made once per test session, so every test runs in seconds on CPU.

Test files import the factories directly (``from conftest import tiny_module``); the expensive
artefacts (``single_tasks``) are session-scoped fixtures, built the first time a test asks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network

from lightning_simo.data.synthetic import SyntheticDataModule  # noqa: E402
from lightning_simo.evaluation import evaluate_net  # noqa: E402
from lightning_simo.modules.simo import SIMOModule  # noqa: E402
from lightning_simo.testing import QUIET_TRAINER, TINY_VIT, quiet_trainer, tiny_vit  # noqa: E402, F401

TINY_HEAD = {"kind": "linear", "upsample": 4}
TINY_SCENES = {
    "num_train": 16,
    "num_val": 8,
    "num_test": 8,
    "height": 32,
    "width": 40,
    "batch_size": 8,
}
"""Synthetic split sizes and image size every tiny datamodule starts from."""
TASKS = ("segmentation", "depth", "normals")


def tiny_encoder(**model_kwargs: Any) -> dict[str, Any]:
    """A fresh copy of the tiny ViT config (``model_kwargs`` overrides, no checkpoint)."""
    return {**tiny_vit(**model_kwargs), "checkpoint": None}


def class_counts(tasks: Sequence[str]) -> dict[str, int]:
    """The synthetic dataset's class count of each classification task in ``tasks``."""
    carried = SyntheticDataModule.dataset_tasks
    return {t: n for t in tasks if (n := carried.get(t)) is not None}


def tiny_datamodule(tasks: Sequence[str] = TASKS, **overrides: Any) -> SyntheticDataModule:
    """Tiny synthetic scenes (``TINY_SCENES``) of ``tasks``; ``overrides`` win."""
    return SyntheticDataModule(**{**TINY_SCENES, "tasks": list(tasks), **overrides})


def tiny_module(
    tasks: Sequence[str] = TASKS, cls: type[SIMOModule] = SIMOModule, **overrides: Any
) -> Any:
    """A ``cls`` (SIMOModule or a subclass) on the tiny ViT and linear heads for ``tasks``."""
    options = {
        "tasks": list(tasks),
        "num_classes": class_counts(tasks),
        "encoder": tiny_encoder(),
        "head": dict(TINY_HEAD),
        **overrides,
    }
    return cls(**options)


def cpu_trainer(root: Path | str | None = None, **overrides: Any) -> L.Trainer:
    """A one-device CPU trainer without logger, checkpoints, progress bar, summary or sanity
    check (``overrides`` win); ``root`` becomes ``default_root_dir``."""
    options: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    if root is not None:
        options["default_root_dir"] = root
    return quiet_trainer(**{**options, **overrides})


CLI_SCENES = {**TINY_SCENES, "num_train": 8, "num_val": 4, "num_test": 4, "batch_size": 4}
"""Synthetic data settings of the tiny command-line configs."""


def cli_overrides(
    root: Path, trainer: dict[str, Any] | None = None, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A config layered over the repo's synthetic configs: tiny model and data, and a trainer
    writing to ``root`` with the quiet settings (checkpointing stays the config's) and without
    prediction panels (test_cli.py and test_loggers.py check those)."""
    quiet = {k: v for k, v in QUIET_TRAINER.items() if k != "enable_checkpointing"}
    return {
        "log_images": False,
        "trainer": {"default_root_dir": str(root), **quiet, **(trainer or {})},
        "model": {"init_args": {"encoder": tiny_encoder()}},
        "data": {"init_args": {**CLI_SCENES, **(data or {})}},
    }


class LossRecorder(L.Callback):
    """The training loss of every step, detached."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *_: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())


@dataclass
class SingleTasks:
    """θ0 and the fine-tuned single-task checkpoints (paths), plus their test metrics."""

    theta0: Path
    checkpoints: dict[str, str]
    references: list[str]


def _fine_tune(
    task: str, theta0: dict[str, torch.Tensor], dm: SyntheticDataModule, steps: int
) -> SIMOModule:
    module = tiny_module([task])
    module.net.encoder.load_state_dict(theta0)
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    module.train()
    done = 0
    while done < steps:
        for batch in dm.train_dataloader():
            _, losses = module.task_losses(batch)
            optimizer.zero_grad()
            losses[task].backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return module.eval()


def make_single_tasks(
    root: Path, dm: SyntheticDataModule, steps: int, tasks: Sequence[str] = TASKS
) -> SingleTasks:
    """θ0 (a random tiny ViT) and one model per task fine-tuned from it for ``steps`` steps."""
    torch.manual_seed(0)
    dm.setup("fit")
    theta0 = tiny_module(tasks).net.encoder.state_dict()
    theta0_path = root / "theta0.pt"
    torch.save({"state_dict": {f"net.encoder.{k}": v for k, v in theta0.items()}}, theta0_path)
    checkpoints, references = {}, []
    test_loader = dm.loader("test")
    for task in tasks:
        module = _fine_tune(task, theta0, dm, steps)
        path = root / f"{task}.pt"
        torch.save({"state_dict": module.state_dict()}, path)
        checkpoints[task] = str(path)
        metrics = evaluate_net(module.net, test_loader, module.task_specs)
        ref = root / f"{task}_test_metrics.json"
        ref.write_text(json.dumps({"metrics": metrics}))
        references.append(str(ref))
    return SingleTasks(theta0_path, checkpoints, references)


@pytest.fixture(scope="session")
def single_tasks(tmp_path_factory: pytest.TempPathFactory) -> SingleTasks:
    """θ0 and 20-step single-task models of ``TASKS``, made once per test session."""
    dm = tiny_datamodule(augment=False, train_split="train")
    return make_single_tasks(tmp_path_factory.mktemp("single_tasks"), dm, steps=20)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(name="tiny_vit")
def _tiny_vit() -> dict:
    return tiny_vit()
