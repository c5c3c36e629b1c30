"""Same seed, same results: every stage run twice on the CPU gives identical weights and scores.

Each stage (foundation pretraining, single-task fine-tuning with augmentation, merging with an α
search followed by head re-alignment, joint MTL with GradNorm) trains for two steps twice in this
process after ``seed_everything(0)``; the state dicts (and the α search scores) must be equal bit
for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_VIT
from torch import Tensor

from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.data.synthetic import NUM_CLASSES, SyntheticDataModule
from lightning_simo.modules.foundation import FoundationModule
from lightning_simo.modules.joint import JointMTLModule
from lightning_simo.modules.simo import SIMOModule

TASKS = ["segmentation", "depth"]
HEAD = {"kind": "linear", "upsample": 4}
NUM = {"segmentation": NUM_CLASSES}


def encoder() -> dict:
    return {**TINY_VIT, "model_kwargs": dict(TINY_VIT["model_kwargs"])}


def data(tasks: list[str], **kwargs: object) -> SyntheticDataModule:
    return SyntheticDataModule(
        tasks=tasks, num_train=8, num_val=4, num_test=4, height=32, width=40, batch_size=4, **kwargs
    )


def fit(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    root: Path,
    callbacks: list[L.Callback] | None = None,
) -> dict[str, Tensor]:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=callbacks or [],
    )
    trainer.fit(module, datamodule)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def twice(run: Callable[[], tuple]) -> tuple[tuple, tuple]:
    results = []
    for _ in range(2):
        L.seed_everything(0, verbose=False)
        results.append(run())
    return results[0], results[1]


def assert_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_foundation_step_is_deterministic(tmp_path: Path) -> None:
    def run() -> tuple:
        module = FoundationModule(encoder=encoder(), mask_ratio=0.5)
        return (fit(module, data(["depth"]), tmp_path),)

    (first,), (second,) = twice(run)
    assert_identical(first, second)


def test_single_task_fit_with_augmentation_is_deterministic(tmp_path: Path) -> None:
    def run() -> tuple:
        module = SIMOModule(
            tasks=["segmentation"], num_classes=NUM, encoder=encoder(), head=HEAD, probe_epochs=0
        )
        return (fit(module, data(["segmentation"], augment=True, scales=(1.0, 1.2)), tmp_path),)

    (first,), (second,) = twice(run)
    assert_identical(first, second)


@pytest.fixture(scope="module")
def task_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tasks")
    paths = {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(10 + i)
        module = SIMOModule(
            tasks=[task],
            num_classes=NUM if task == "segmentation" else None,
            encoder=encoder(),
            head=HEAD,
        )
        with torch.no_grad():
            for param in module.net.encoder.parameters():
                param.add_(0.02 * torch.randn_like(param))
        paths[task] = str(folder / f"{task}.ckpt")
        torch.save({"state_dict": module.state_dict()}, paths[task])
    return paths


@pytest.mark.parametrize("method", ["task_arithmetic", "dare"])
def test_merge_alpha_search_and_realignment_are_deterministic(
    method: str, tmp_path: Path, task_checkpoints: dict[str, str]
) -> None:
    def run() -> tuple:
        module = SIMOModule(tasks=TASKS, num_classes=NUM, encoder=encoder(), head=HEAD)
        merge = MergeCallback(
            checkpoints=task_checkpoints,
            method=method,
            search_grid=[0.0, 0.5, 1.0],
            realign="heads",
            method_options={"drop_rate": 0.5} if method == "dare" else None,
        )
        state = fit(module, data(TASKS, augment=False, train_split="val"), tmp_path, [merge])
        return state, dict(merge.search_scores), merge.alpha

    (state_a, scores_a, alpha_a), (state_b, scores_b, alpha_b) = twice(run)
    assert sorted(scores_a) == [0.0, 0.5, 1.0]
    assert scores_a == scores_b
    assert alpha_a == alpha_b
    assert_identical(state_a, state_b)


def test_joint_mtl_gradnorm_is_deterministic(tmp_path: Path) -> None:
    def run() -> tuple:
        module = JointMTLModule(
            tasks=TASKS, num_classes=NUM, encoder=encoder(), head=HEAD, weighting="gradnorm"
        )
        return (fit(module, data(TASKS), tmp_path),)

    (first,), (second,) = twice(run)
    assert_identical(first, second)
    assert any(k.startswith("weighting.") for k in first)
