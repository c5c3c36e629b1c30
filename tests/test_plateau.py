"""Training to a plateau: a relative stopping threshold and a learning rate that decays with it.

``PlateauStopping`` must stop a run whose val loss still creeps down by less than its threshold
(Lightning's ``EarlyStopping`` with ``min_delta=0`` never does), and the ``plateau`` schedule must
decay once per epoch without progress, in automatic and in manual optimisation (GradNorm).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import cpu_trainer, tiny_datamodule, tiny_module
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, TensorDataset

from lightning_simo.callbacks.plateau import PlateauStopping
from lightning_simo.modules.joint import JointMTLModule
from lightning_simo.modules.schedules import on_plateau

CREEPING = [1.0, 0.9, 0.896, 0.893, 0.892, 0.891, 0.890, 0.889]  # < 1% per epoch after epoch 1
RECOVERING = [1.0, 0.9, 0.896, 0.85, 0.849, 0.848, 0.847, 0.846]  # epoch 3 gains 5.6%


class ScriptedValLoss(L.LightningModule):
    """A tiny regression whose val loss follows ``losses`` (one value per epoch); its optimiser
    uses the ``plateau`` schedule, so the learning rates it saw can be checked."""

    def __init__(self, losses: list[float], factor: float = 0.5, threshold: float = 0.01) -> None:
        super().__init__()
        self.losses = losses
        self.factor, self.threshold = factor, threshold
        self.layer = torch.nn.Linear(2, 1)
        self.lrs: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.lrs.append(self.optimizers().param_groups[0]["lr"])
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", torch.tensor(self.losses[self.current_epoch]))

    def configure_optimizers(self) -> dict:
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        return {"optimizer": opt, "lr_scheduler": on_plateau(opt, self.factor, self.threshold)}


def _fit(losses: list[float], stopper: L.Callback) -> tuple[L.Trainer, ScriptedValLoss]:
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    module = ScriptedValLoss(losses)
    trainer = cpu_trainer(max_epochs=len(losses), callbacks=[stopper])
    trainer.fit(module, loader, loader)
    return trainer, module


def test_plateau_stopping_stops_where_gains_fall_below_the_threshold() -> None:
    trainer, module = _fit(CREEPING, PlateauStopping(monitor="val/loss", patience=3))
    # best 0.9 at epoch 1; epochs 2, 3, 4 beat it by < 1% of 0.9 -> stop after epoch 4
    assert trainer.current_epoch == 5 and trainer.early_stopping_callback.stopped_epoch == 4
    assert float(trainer.early_stopping_callback.best_score) == pytest.approx(0.9)
    # the schedule decays after each epoch without progress (from epoch 2 on), and only then
    assert module.lrs == [1.0, 1.0, 1.0, 0.5, 0.25]


def test_lightning_early_stopping_never_stops_a_creeping_loss() -> None:
    trainer, _ = _fit(CREEPING, EarlyStopping(monitor="val/loss", patience=3))
    assert trainer.current_epoch == len(CREEPING)  # ran to the cap: every epoch is a new minimum


def test_a_gain_above_the_threshold_restarts_the_patience() -> None:
    trainer, module = _fit(RECOVERING, PlateauStopping(monitor="val/loss", patience=3))
    assert trainer.early_stopping_callback.stopped_epoch == 6
    assert float(trainer.early_stopping_callback.best_score) == pytest.approx(0.85)
    assert module.lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_plateau_stopping_rejects_an_absolute_threshold() -> None:
    with pytest.raises(ValueError, match="min_rel_delta"):
        PlateauStopping(monitor="val/loss", min_delta=0.1)
    with pytest.raises(ValueError, match="min_rel_delta"):
        PlateauStopping(monitor="val/loss", min_rel_delta=1.5)


@pytest.mark.parametrize("weighting", ["equal", "gradnorm"])
def test_plateau_schedule_decays_once_per_epoch_in_automatic_and_manual_mode(
    tmp_path: Path, weighting: str
) -> None:
    # a threshold no epoch can meet: every epoch is one without progress, so one decay each
    module = tiny_module(
        ["segmentation", "depth"],
        JointMTLModule,
        weighting=weighting,
        lr=1e-3,
        schedule="plateau",
        plateau_factor=0.5,
        plateau_threshold=0.999,
    )
    trainer = cpu_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=tiny_datamodule(["segmentation", "depth"]))
    assert module.automatic_optimization == (weighting == "equal")
    lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
    # the first epoch sets the best (no decay), the next two decay: 1e-3 * 0.5^2
    assert lrs[0] == pytest.approx(2.5e-4)


def test_plateau_schedule_rejects_bad_settings() -> None:
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    with pytest.raises(ValueError, match="plateau_factor"):
        on_plateau(opt, 1.0, 0.01)
    with pytest.raises(ValueError, match="plateau_threshold"):
        on_plateau(opt, 0.5, -0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        tiny_module(["depth"], schedule="cosine")
