"""``last.ckpt`` holds the fit's final step even when the monitored loss rose at the end.

Lightning's ``ModelCheckpoint`` alone leaves ``last.ckpt`` at the best epoch in that case; the
study then tests (and the merge reads as θ0) an older model than the fit ended with.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_simo.callbacks.resume import InterruptionCheckpoint

VAL_LOSSES = [1.0, 0.5, 0.7, 0.9]  # best at epoch 1, then worse twice


class ScriptedValLoss(L.LightningModule):
    """A tiny regression whose validation loss follows ``VAL_LOSSES``, one value per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        loss = VAL_LOSSES[self.current_epoch] if not self.trainer.sanity_checking else 2.0
        self.log("val/loss", torch.tensor(loss))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _fit(
    folder: Path, *, on_train_epoch_end: bool | None, every_n_val: int, ours: bool
) -> L.Trainer:
    checkpoint = ModelCheckpoint(
        dirpath=folder,
        filename="best",
        monitor="val/loss",
        save_last=True,
        save_on_train_epoch_end=on_train_epoch_end,
    )
    callbacks = [checkpoint, InterruptionCheckpoint()] if ours else [checkpoint]
    trainer = L.Trainer(
        max_epochs=len(VAL_LOSSES),
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=every_n_val,
        num_sanity_val_steps=0,
    )
    trainer.fit(ScriptedValLoss(), _loader(), _loader())
    return trainer


def _saved_at(path: Path) -> tuple[int, int]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["epoch"], state["global_step"]


@pytest.mark.parametrize(
    ("on_train_epoch_end", "every_n_val"),
    [(None, 1), (False, 1), (True, 1), (True, 3)],
    ids=["lightning-default", "after-validation", "at-train-epoch-end", "validation-every-3"],
)
def test_last_checkpoint_is_the_final_step_and_best_stays_the_best(
    tmp_path: Path, on_train_epoch_end: bool | None, every_n_val: int
) -> None:
    trainer = _fit(
        tmp_path / "ckpt", on_train_epoch_end=on_train_epoch_end, every_n_val=every_n_val, ours=True
    )
    final_step = trainer.global_step
    assert final_step == 2 * len(VAL_LOSSES)
    epoch, step = _saved_at(tmp_path / "ckpt" / "last.ckpt")
    assert step == final_step
    assert epoch == len(VAL_LOSSES) - 1  # saved at the last epoch's end, not after the fit
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    final_weight = trainer.lightning_module.layer.weight.detach()
    assert torch.equal(last["state_dict"]["layer.weight"], final_weight)
    # the top-k checkpoint is untouched: still the best validated epoch
    best_epoch, _ = _saved_at(tmp_path / "ckpt" / "best.ckpt")
    assert best_epoch == (1 if every_n_val == 1 else 2)


def test_lightning_alone_leaves_last_checkpoint_at_the_best_epoch(tmp_path: Path) -> None:
    """The behaviour the callback corrects: if Lightning changes it, this test says so."""
    _fit(tmp_path / "ckpt", on_train_epoch_end=False, every_n_val=1, ours=False)
    epoch, step = _saved_at(tmp_path / "ckpt" / "last.ckpt")
    assert (epoch, step) == (1, 4)
