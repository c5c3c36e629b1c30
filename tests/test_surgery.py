"""Dense Representation Surgery: starts at the merged model, trains label-free towards each
task's own encoder features, freezes everything else, and restores from checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_VIT

from lightning_simo.callbacks.merge import MergeCallback
from lightning_simo.data.synthetic import SyntheticDataModule
from lightning_simo.models.encoders import Encoder
from lightning_simo.modules.simo import SIMOModule
from lightning_simo.modules.surgery import SurgeryModule

TASKS = ("segmentation", "depth")
HEAD = {"kind": "linear", "upsample": 4}


SIZES = {"num_train": 16, "num_val": 8, "num_test": 8, "height": 32, "width": 40}


def _data() -> SyntheticDataModule:
    return SyntheticDataModule(tasks=list(TASKS), batch_size=8, augment=False, **SIZES)


QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


def _trainer(root: Path, **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer without validation (surgery trains on its own targets)."""
    options: dict[str, Any] = {"accelerator": "cpu", "devices": 1, **QUIET}
    options.update(enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(default_root_dir=root, **{**options, **kwargs})


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("surgery")
    torch.manual_seed(0)
    theta0 = Encoder(copy.deepcopy(TINY_VIT)).state_dict()
    foundation = root / "foundation.ckpt"
    torch.save({"state_dict": {"encoder." + k: v for k, v in theta0.items()}}, foundation)
    encoder = {**copy.deepcopy(TINY_VIT), "checkpoint": str(foundation)}
    paths = {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(10 + i)
        module = SIMOModule(
            tasks=[task], num_classes=_data().num_classes, encoder=encoder, head=HEAD
        )
        with torch.no_grad():
            for p in module.net.encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
        paths[task] = str(root / f"{task}.ckpt")
        torch.save({"state_dict": module.state_dict()}, paths[task])
    return {"encoder": encoder, "paths": paths}


def _module(sources: dict[str, Any], **kwargs: Any) -> SurgeryModule:
    return SurgeryModule(
        tasks=list(TASKS),
        num_classes=_data().num_classes,
        encoder=sources["encoder"],
        head=HEAD,
        **kwargs,
    )


def _distance(module: SurgeryModule, images: torch.Tensor) -> float:
    """Mean L1 between the corrected merged features and each task's own encoder's features."""
    with torch.no_grad():
        merged = module.net.encoder(images)
        total = []
        for k, task in enumerate(TASKS):
            corrected = module.surgery[task](merged)
            target = module._teacher(k)(images)
            total += [(c - t).abs().mean() for c, t in zip(corrected.features, target)]
    return float(torch.stack(total).mean())


def test_surgery_starts_at_the_merged_model_and_trains_only_itself(sources, tmp_path) -> None:  # noqa: ANN001
    module = _module(sources)
    callback = MergeCallback(
        checkpoints=sources["paths"], scaling=0.5, realign="surgery", search_cache=False
    )
    callback.setup(_trainer(tmp_path), module, "fit")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("surgery.") for n in trainable)
    plain = SIMOModule(
        tasks=list(TASKS), num_classes=_data().num_classes, encoder=sources["encoder"], head=HEAD
    )
    MergeCallback(
        checkpoints=sources["paths"], scaling=0.5, realign="none", search_cache=False
    ).setup(_trainer(tmp_path), plain, "fit")
    images = torch.rand(2, 3, 32, 40)
    module.eval(), plain.eval()
    with torch.no_grad():
        for task, pred in module(images).items():  # zero-initialised: the identity at the start
            torch.testing.assert_close(pred, plain(images)[task])


def test_surgery_brings_merged_features_towards_each_tasks_own(sources, tmp_path) -> None:  # noqa: ANN001
    L.seed_everything(0)
    module = _module(sources, lr_surgery=1e-2)
    callback = MergeCallback(
        checkpoints=sources["paths"], scaling=0.5, realign="surgery", search_cache=False
    )
    trainer = _trainer(tmp_path, max_epochs=15, callbacks=[callback])
    data = _data()
    trainer.fit(module, datamodule=data)
    held_out = next(iter(data.loader("val")))["image"]  # scenes the surgery never saw
    before = copy.deepcopy(module)
    for adapter in before.surgery.modules():
        if hasattr(adapter, "up"):
            torch.nn.init.zeros_(adapter.up.weight)  # back to the identity (no biases)
    after_distance, before_distance = _distance(module, held_out), _distance(before, held_out)
    assert after_distance < 0.9 * before_distance, (before_distance, after_distance)
    cache = module._caches["merged"]
    assert (cache.misses, len(cache)) == (16, 16) and cache.hits == 16 * 14  # computed once
    heads = {k: v for k, v in module.state_dict().items() if k.startswith("net.heads.")}
    fresh = torch.load(sources["paths"]["depth"], weights_only=True)["state_dict"]
    for key, value in fresh.items():
        if key.startswith("net.heads.depth."):
            assert torch.equal(heads[key], value), key  # heads stay frozen


def test_surgery_needs_its_module_and_restores_from_a_checkpoint(sources, tmp_path) -> None:  # noqa: ANN001
    plain = SIMOModule(
        tasks=list(TASKS), num_classes=_data().num_classes, encoder=sources["encoder"], head=HEAD
    )
    with pytest.raises(ValueError, match=r"realign: surgery needs model class .*SurgeryModule"):
        MergeCallback(checkpoints=sources["paths"], scaling=0.5, realign="surgery").setup(
            _trainer(tmp_path), plain, "fit"
        )
    module = _module(sources)
    MergeCallback(
        checkpoints=sources["paths"], scaling=0.5, realign="surgery", search_cache=False
    ).setup(_trainer(tmp_path), module, "fit")
    with torch.no_grad():
        for p in module.surgery.parameters():
            p.add_(0.1)
    state = module.state_dict()
    assert any(k.startswith("surgery.segmentation.levels.0.") for k in state)
    again = _module(sources)
    MergeCallback(
        checkpoints=sources["paths"], scaling=0.5, realign="surgery", search_cache=False
    ).setup(_trainer(tmp_path), again, "fit")
    again.load_state_dict(state)
    images = torch.rand(2, 3, 32, 40)
    module.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images)["depth"], module(images)["depth"])
