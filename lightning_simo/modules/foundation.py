"""FoundationModule: pretrain an encoder with masked-patch RGB reconstruction.

The embedded default has no hub weights to start from, so it makes its own foundation model θ0 on
synthetic scenes with a proxy objective unrelated to the downstream tasks (no labels are read).
Single-task fine-tunes then start from the saved encoder, as they would from DINOv2.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_simo.models.encoders import Encoder, EncoderConfig
from lightning_simo.modules.schedules import one_cycle, stepping_batches

__all__ = ["FoundationModule"]


class FoundationModule(L.LightningModule):
    """Masked-patch reconstruction of the input image from the encoder's last level.

    Args:
        encoder: the encoder to pretrain (saved under ``encoder.`` in the checkpoint, which the
            task configs load with ``encoder.checkpoint``).
        mask_ratio: fraction of patches replaced by grey before encoding.
        lr: peak learning rate (AdamW, one-cycle).
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the schedule spent warming up.
        tasks: accepted for config compatibility with the task datamodules; targets are unused.
        num_classes: accepted for config compatibility; unused.
    """

    def __init__(
        self,
        encoder: EncoderConfig | None = None,
        mask_ratio: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        tasks: list[str] | None = None,
        num_classes: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}.")
        cfg = EncoderConfig.coerce(encoder)
        self.save_hyperparameters(ignore=["tasks", "num_classes"])
        self.hparams["encoder"] = cfg.to_dict()
        self.encoder = Encoder(cfg)
        p = self.encoder.patch_size
        width = self.encoder.channels[-1]
        self.decoder = nn.Sequential(
            nn.Conv2d(width, width, 1),
            nn.GELU(),
            nn.Conv2d(width, 3 * p * p, 1),
            nn.PixelShuffle(p),
        )

    def _mask(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        p = self.encoder.patch_size
        grid = torch.rand(b, 1, -(-h // p), -(-w // p), device=images.device)
        mask = (grid < self.hparams.mask_ratio).to(images.dtype)
        return F.interpolate(mask, scale_factor=p, mode="nearest")[..., :h, :w]

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        masked = images * (1 - mask) + 0.5 * mask
        feats = self.encoder(masked).features[-1]
        recon = self.decoder(feats)
        return recon[..., : images.shape[-2], : images.shape[-1]]

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        images = batch["image"]
        mask = self._mask(images)
        err = (self.reconstruct(images, mask).float() - images.float()).abs()
        masked_err = (err * mask).sum() / (mask.sum() * 3).clamp_min(1)
        visible_err = (err * (1 - mask)).sum() / ((1 - mask).sum() * 3).clamp_min(1)
        loss = masked_err + 0.1 * visible_err
        n = images.shape[0]
        self.log(f"{split}/loss", loss, batch_size=n, prog_bar=True, sync_dist=split != "train")
        self.log(f"{split}/masked_l1", masked_err, batch_size=n, sync_dist=split != "train")
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = stepping_batches(self.trainer)
        return {
            "optimizer": opt,
            "lr_scheduler": one_cycle(opt, total, self.hparams.warmup_fraction),
        }
