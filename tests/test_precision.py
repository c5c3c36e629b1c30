"""bf16 mixed precision on CPU, one smoke run per LightningModule.

Real runs use ``bf16-mixed`` (or ``16-mixed``, which Lightning turns into bf16 on CPU), and every
module is built to survive it: heads compute in bf16 under autocast while task losses, metric
sums and the weighting strategies' statistics stay in fp32. Each test trains a few steps of a
tiny model and checks that autocast was really on (a head's output is bf16), that the losses are
fp32 and finite, and that the validation metrics are finite. bf16 matmuls are slow on CPU, so
everything else is tested in fp32.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import LossRecorder, cpu_trainer, tiny_datamodule, tiny_module
from torch import Tensor, nn

from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.modules.foundation import FoundationModule
from lightning_simo.modules.joint import JointMTLModule
from lightning_simo.modules.simo import SIMOModule

TASKS = ("segmentation", "depth", "normals")
STEPS = 3


def _datamodule(tasks: tuple[str, ...]) -> SyntheticDataModule:
    return tiny_datamodule(tasks, num_train=8, num_val=4, num_test=4, batch_size=4, augment=False)


class _Recorder(LossRecorder):
    """Training losses of every step, and the dtype of what one watched module returns."""

    def __init__(self, watched: nn.Module) -> None:
        super().__init__()
        self.output_dtypes: set[torch.dtype] = set()
        watched.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training:
            self.output_dtypes.add(output.dtype)


def _fit_bf16(
    module: L.LightningModule,
    tasks: tuple[str, ...],
    watched: nn.Module,
    root: Path,
    callbacks: list[L.Callback] | None = None,
) -> _Recorder:
    recorder = _Recorder(watched)
    trainer = cpu_trainer(
        root,
        precision="bf16-mixed",
        max_steps=STEPS,
        limit_val_batches=1,
        callbacks=[*(callbacks or []), recorder],
    )
    dm = _datamodule(tasks)
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert trainer.global_step == STEPS
    assert len(recorder.losses) == STEPS
    assert recorder.output_dtypes == {torch.bfloat16}, "autocast was not active"
    for loss in recorder.losses:
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert "val/loss" in logged
    assert all(math.isfinite(v) for v in logged.values()), logged
    return recorder


def _simo(tasks: tuple[str, ...], encoder: dict[str, Any], **kwargs: Any) -> SIMOModule:
    return tiny_module(tasks, encoder=encoder, schedule="constant", **kwargs)


def _assert_finite_metrics(module: SIMOModule, tasks: tuple[str, ...]) -> None:
    values = module.last_metrics["val"]
    for task in tasks:
        primary = f"{task}/{module.task_specs[task].primary}"
        assert primary in values
    assert values and all(math.isfinite(v) for v in values.values()), values


def test_single_task_simo_in_bf16(tiny_vit: dict, tmp_path: Path) -> None:
    module = _simo(("segmentation",), tiny_vit, lr=1e-3)
    before = module.net.encoder.backbone.blocks[0].attn.qkv.weight.detach().clone()
    _fit_bf16(module, ("segmentation",), module.net.heads["segmentation"], tmp_path)
    _assert_finite_metrics(module, ("segmentation",))
    after = module.net.encoder.backbone.blocks[0].attn.qkv.weight
    assert after.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(before, after)


def test_merged_simo_with_head_realignment_in_bf16(tiny_vit: dict, tmp_path: Path) -> None:
    paths = {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(i + 1)
        source = _simo((task,), tiny_vit)
        with torch.no_grad():
            for p in source.net.encoder.parameters():
                p.add_(0.02 * torch.randn_like(p))
        paths[task] = str(tmp_path / f"{task}.ckpt")
        torch.save({"state_dict": source.state_dict()}, paths[task])
    module = _simo(TASKS, tiny_vit, head_lr=1e-2)
    merge = MergeCallback(checkpoints=paths, scaling=0.5, realign="heads", cache_features=True)
    _fit_bf16(module, TASKS, module.net.heads["depth"], tmp_path, callbacks=[merge])
    _assert_finite_metrics(module, TASKS)
    cache = module.feature_source
    assert len(cache) == 8 and cache.hits == STEPS * 4 - 8  # epoch 2 served from the cache
    for index in cache.cache.indices():
        assert all(torch.isfinite(f).all() for f in cache.cache.entry(index))


@pytest.mark.parametrize("weighting", ["gradnorm", "uncertainty"])
def test_joint_mtl_in_bf16(tiny_vit: dict, tmp_path: Path, weighting: str) -> None:
    module = tiny_module(
        TASKS, JointMTLModule, encoder=tiny_vit, schedule="constant", lr=1e-3, weighting=weighting
    )
    _fit_bf16(module, TASKS, module.net.heads["normals"], tmp_path)
    _assert_finite_metrics(module, TASKS)
    weights = module.weighting.weights()
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    if weighting == "gradnorm":
        assert module.weighting.task_weights.dtype == torch.float32
        assert sum(weights.values()) == pytest.approx(len(TASKS), rel=1e-5)
        assert weights != dict.fromkeys(TASKS, 1.0)  # updated after the first step
    else:
        log_var = module.weighting.log_var
        assert log_var.dtype == torch.float32 and torch.isfinite(log_var).all()
        assert not torch.equal(log_var, torch.zeros_like(log_var))


def test_foundation_pretraining_in_bf16(tiny_vit: dict, tmp_path: Path) -> None:
    module = FoundationModule(encoder=tiny_vit, lr=1e-3)
    recorder = _fit_bf16(module, TASKS, module.decoder, tmp_path)
    assert len(set(float(x) for x in recorder.losses)) > 1
