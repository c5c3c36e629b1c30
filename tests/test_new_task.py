"""Adding a task is one registration: a new kind of target trains, tints and augments correctly.

The task registered here, ``flow``, is a two-channel image-plane displacement map: a kind no
built-in task has (zooming in by ``s`` multiplies it by ``s``, a horizontal mirror negates its x
component), so nothing outside :func:`lightning_simo.tasks.register_task` can know it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_VIT, cpu_trainer
from torch import Tensor
from torch.utils.data import Dataset

from lightning_simo import metrics as M
from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.data.base import DenseDataModule
from lightning_simo.data.transforms import (
    HorizontalFlipNormals,
    RandomRescale,
    build_transform,
    dense_keys,
    to_tensor_sample,
)
from lightning_simo.modules.simo import SIMOModule
from lightning_simo.modules.tinting import TintingModule, teacher_targets, tint_loss
from lightning_simo.tasks import (
    TargetGeometry,
    Targets,
    Task,
    build_task,
    register_task,
    unregister_task,
)

HEAD = {"kind": "linear", "upsample": 4}
H, W = 32, 40
FLOW = TargetGeometry(zoom_exponent=1, mirror_x=True)


def _unit_length_target(output: Tensor) -> Targets:
    return (output / output.norm(dim=1, keepdim=True).clamp_min(1e-6),)


def _squared_distill(student: Tensor, targets: Targets) -> tuple[Tensor, Tensor | None]:
    (target,) = targets
    return (student - target).pow(2).mean(), None


def _flow(num_classes: int | None = None, normal_loss: str = "cosine") -> Task:
    return Task(
        name="flow",
        kind="displacement",
        channels=2,
        loss_fn=lambda pred, target: (pred.float() - target.float()).abs().mean(),
        metrics_factory=M.RegressionMetrics,
        metrics={"abs_err": False},
        primary="abs_err",
        invalid="none (every pixel is valid)",
        visualize_fn=lambda x: x[:1].expand(3, -1, -1).clone(),
        pseudo_target_fn=_unit_length_target,
        distill_loss_fn=_squared_distill,
        positive=False,
    )


@pytest.fixture
def flow_task() -> Iterator[None]:
    register_task("flow", _flow, geometry=FLOW)
    try:
        yield
    finally:
        unregister_task("flow")


class _FlowScenes(Dataset):
    """Images whose flow target is a fixed function of the pixels (so it can be learnt)."""

    def __init__(self, n: int, train: bool) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.random((n, H, W, 3), dtype=np.float32)
        self.transform = build_transform(train, crop=(H, W) if train else None, scales=(1.0, 1.25))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.images[index]
        flow = np.stack([image[..., 0] - image[..., 1], image[..., 2]], axis=-1)
        sample = self.transform({"image": image, "flow": flow, "index": np.int64(index)})
        return to_tensor_sample(sample)


class _FlowDataModule(DenseDataModule):
    dataset_tasks = {"flow": None}

    def make_dataset(self, split: str, train: bool) -> Dataset:
        return _FlowScenes(8, train)


def test_registered_geometry_drives_every_transform(flow_task: None) -> None:
    assert "flow" in dense_keys()
    rng = np.random.default_rng(1)
    image = rng.random((4, 6, 3), dtype=np.float32)
    flow = rng.normal(size=(4, 6, 2)).astype(np.float32)
    masks = {"additional_targets": {"flow": "mask"}}
    zoomed = A.Compose([RandomRescale(scales=(2.0,))], **masks)(image=image, flow=flow)["flow"]
    np.testing.assert_allclose(zoomed[::2, ::2], flow * 2.0, rtol=1e-6)  # multiply, like disparity
    flipped = A.Compose([HorizontalFlipNormals(p=1.0)], **masks)(image=image, flow=flow)["flow"]
    np.testing.assert_array_equal(flipped[..., 0], -flow[:, ::-1, 0])  # x negated, like normals
    np.testing.assert_array_equal(flipped[..., 1], flow[:, ::-1, 1])
    tensors = to_tensor_sample({"image": image, "flow": flow})
    assert tensors["flow"].shape == (2, 4, 6) and tensors["flow"].dtype == torch.float32


def test_registered_task_trains_and_tints(flow_task: None, tmp_path: Path) -> None:
    dm = _FlowDataModule(batch_size=4)
    L.seed_everything(0)
    single = SIMOModule(tasks=["flow"], encoder=TINY_VIT, head=HEAD, lr=2e-3)
    theta0 = {k: v.clone() for k, v in single.net.encoder.state_dict().items()}
    assert single.net(torch.rand(1, 3, H, W))["flow"].shape == (1, 2, H, W)
    cpu_trainer(max_steps=4, limit_val_batches=1).fit(single, dm)
    tuned = single.net.encoder.state_dict()
    assert any(not torch.equal(tuned[k], theta0[k]) for k in theta0)
    assert torch.isfinite(single.task_losses(next(iter(dm.loader("val"))))[1]["flow"])

    # the distillation behaviour the task declared is the one tinting uses
    spec = build_task("flow")
    out = torch.tensor([[[[3.0]], [[4.0]]]])
    (target,) = teacher_targets(spec, out)
    torch.testing.assert_close(target, torch.tensor([[[[0.6]], [[0.8]]]]))
    loss, kept = tint_loss(spec, torch.zeros_like(out), (target,))
    assert loss.item() == pytest.approx(0.5) and kept is None

    pretrained, finetuned = tmp_path / "theta0.pt", tmp_path / "flow.pt"
    torch.save({"state_dict": {f"net.encoder.{k}": v for k, v in theta0.items()}}, pretrained)
    torch.save({"state_dict": single.state_dict()}, finetuned)
    merge = MergeCallback(
        checkpoints={"flow": str(finetuned)},
        scaling=0.3,
        realign="tinting",
        pretrained=str(pretrained),
    )
    tinted = TintingModule(
        tasks=["flow"], encoder=TINY_VIT, head=HEAD, lr_coefficients=0.05, cache_teachers=False
    )
    trainer = cpu_trainer(max_steps=3, callbacks=[merge], limit_val_batches=0)
    trainer.fit(tinted, dm)
    assert torch.isfinite(trainer.callback_metrics["train/flow/tint_loss"])
    assert not tinted.layer_merge.coefficients.eq(0.3).all()  # the coefficients moved
