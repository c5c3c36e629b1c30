"""Training loaders that resume mid-epoch: order, augmentation and generators.

The in-process fit at the end stops a run with Lightning's own stop request (what SIGTERM and a
first Ctrl+C make) inside an epoch, in the main process (``num_workers=0``) with augmentation on,
resumes it from the ``last.ckpt`` that ``InterruptionCheckpoint`` saved, and compares every
weight with an uninterrupted run.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import cpu_trainer, tiny_datamodule, tiny_module
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_simo.callbacks.resume import InterruptionCheckpoint, received_signal
from lightning_simo.callbacks.rng import RNGStateCheckpoint
from lightning_simo.data.sampling import (
    ResumableLoader,
    ResumableSampler,
    SeededSamples,
    resume_position,
    sample_seed,
)
from lightning_simo.data.transforms import augmentation_seed, build_transform


def test_order_depends_on_seed_and_epoch_only() -> None:
    data = list(range(10))
    first = [i for i, _ in ResumableSampler(data, seed=3, epoch=1)]
    torch.rand(5)  # the global generator plays no part
    assert [i for i, _ in ResumableSampler(data, seed=3, epoch=1)] == first
    assert sorted(first) == data
    assert [i for i, _ in ResumableSampler(data, seed=3, epoch=2)] != first
    assert [i for i, _ in ResumableSampler(data, seed=4, epoch=1)] != first


def test_skip_starts_only_the_first_pass_part_way() -> None:
    data = list(range(10))
    full = list(ResumableSampler(data, seed=0, epoch=2))
    sampler = ResumableSampler(data, seed=0, epoch=2, skip=4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the next pass of the same epoch is whole again
    assert len(sampler) == 10
    assert full[0][1] == sample_seed(0, 2, full[0][0])


def test_sample_seeds_differ_by_seed_epoch_and_index() -> None:
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in (0, 1) for i in (0, 1, 2)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)


def test_augmentation_of_a_sample_follows_its_seed_not_the_stream() -> None:
    pipeline = build_transform(train=True, crop=(16, 16), scales=(0.8, 1.2), seed=0)
    rng = np.random.default_rng(0)
    sample = {"image": rng.random((24, 24, 3), dtype=np.float32)}

    def augmented(seed: int) -> np.ndarray:
        with augmentation_seed(seed):
            return pipeline(sample)["image"]

    first = augmented(7)
    for other in range(5):  # other samples read in between, as another worker's order would
        augmented(100 + other)
        pipeline(sample)  # and unseeded reads
    assert np.array_equal(augmented(7), first)
    assert any(not np.array_equal(augmented(s), first) for s in range(8, 12))


def test_seeded_samples_pass_plain_indices_through() -> None:
    wrapped = SeededSamples(["a", "b"])
    assert len(wrapped) == 2 and wrapped[1] == "b" and wrapped[(0, 5)] == "a"


def test_making_loader_iterators_leaves_the_global_generator_alone() -> None:
    dm = tiny_datamodule(["depth"], num_workers=1)
    dm.setup("fit")
    state = torch.get_rng_state()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)
    train = dm.train_dataloader()
    assert isinstance(train, ResumableLoader) and isinstance(train.sampler, ResumableSampler)
    assert train.state_dict() == {"sampler": {"seed": train.sampler.seed, "epoch": 0}}


def test_resume_position_reads_the_restored_fit_loop() -> None:
    assert resume_position(None) == (0, 0)

    def trainer(restarting: bool) -> SimpleNamespace:
        batches = SimpleNamespace(current=SimpleNamespace(processed=3))
        epochs = SimpleNamespace(current=SimpleNamespace(processed=2))
        loop = SimpleNamespace(
            restarting=restarting,
            epoch_progress=epochs,
            epoch_loop=SimpleNamespace(batch_progress=batches),
        )
        return SimpleNamespace(fit_loop=loop)

    assert resume_position(trainer(True)) == (2, 3)
    assert resume_position(trainer(False)) == (2, 0)  # a finished epoch: the next starts whole


class StopAtStep(L.Callback):
    """Lightning's stop request after optimizer step ``step``, as SIGTERM's handler makes it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


def _fit(root: Path, stop: int | None = None, ckpt_path: str | None = None) -> L.Trainer:
    L.seed_everything(0, workers=True)
    dm = tiny_datamodule(["segmentation", "normals"], augment=True, num_workers=0, batch_size=4)
    module = tiny_module(["segmentation", "normals"], lr=1e-3, head_lr=1e-2)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0),
        RNGStateCheckpoint(),
        InterruptionCheckpoint(),
    ]
    if stop is not None:
        callbacks.append(StopAtStep(stop))
    trainer = cpu_trainer(
        root, max_epochs=2, enable_checkpointing=True, callbacks=callbacks, limit_val_batches=1
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("stop", [1, 6])  # inside the first epoch, inside the second (4 steps each)
def test_a_fit_stopped_mid_epoch_resumes_bit_for_bit(tmp_path: Path, stop: int) -> None:
    reference = _fit(tmp_path / "reference").lightning_module.state_dict()

    with pytest.raises(SIGTERMException):
        _fit(tmp_path / "stopped", stop=stop)
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == stop

    resumed = _fit(tmp_path / "stopped", ckpt_path=str(last))
    assert resumed.global_step == 8
    weights = resumed.lightning_module.state_dict()
    differ = [k for k, v in reference.items() if not torch.equal(v, weights[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_an_error_saves_nothing_and_the_stop_names_its_signal(tmp_path: Path) -> None:
    class Fail(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 1:
                raise RuntimeError("boom")

    callback = InterruptionCheckpoint()
    trainer = cpu_trainer(
        tmp_path,
        max_epochs=1,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), callback, Fail()],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(tiny_module(["depth"]), datamodule=tiny_datamodule(["depth"], batch_size=4))
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()  # a half-done step is never saved
    assert received_signal(trainer) is None
    assert signal.getsignal(signal.SIGINT) is not callback._on_sigint  # handler given back
