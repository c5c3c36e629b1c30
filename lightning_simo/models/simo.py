"""SIMONet: one encoder pass, one head per task (single-input, multi-output)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_simo.models.encoders import Encoder, EncoderConfig, EncoderOutput
from lightning_simo.models.heads import HeadConfig, build_head
from lightning_simo.tasks import Task

__all__ = ["SIMONet"]


class SIMONet(nn.Module):
    """A shared encoder and a ``ModuleDict`` of task heads.

    Parameters are named ``encoder.backbone.*`` and ``heads.<task>.*`` so merging and checkpoint
    loading find encoder and heads by prefix, whichever LightningModule holds the net.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        encoder: EncoderConfig | dict | None = None,
        head: HeadConfig | dict | None = None,
    ) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.encoder = Encoder(encoder)
        head_cfg = HeadConfig.coerce(head)
        self.heads = nn.ModuleDict(
            {
                name: build_head(
                    head_cfg, self.encoder.channels, self.encoder.use_class_token, task
                )
                for name, task in self.tasks.items()
            }
        )

    def forward_heads(
        self, feats: EncoderOutput, tasks: Iterable[str] | None = None
    ) -> dict[str, Tensor]:
        """Every requested head on the same features, resized to the input image size."""
        size = feats.image_size
        out = {}
        for name in tasks or self.heads.keys():
            pred = self.heads[name](feats)
            if pred.shape[-2:] != size:
                pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            out[name] = pred
        return out

    def forward(self, images: Tensor, tasks: Iterable[str] | None = None) -> dict[str, Tensor]:
        return self.forward_heads(self.encoder(images), tasks)
