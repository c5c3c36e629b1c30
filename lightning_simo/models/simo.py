"""SIMONet: one encoder pass, one head per task (single-input, multi-output).

``save_pretrained`` / ``from_pretrained`` keep a net in a folder (``model.safetensors`` and
``config.json``, the Hugging Face Hub layout) that rebuilds it with plain torch + timm: no
Lightning, no checkpoint of the foundation encoder, no pickled code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_simo.models.encoders import Encoder, EncoderConfig, EncoderOutput
from lightning_simo.models.heads import HeadConfig, build_head
from lightning_simo.tasks import Task, build_tasks

__all__ = ["CONFIG_NAME", "CONFIG_FORMAT", "WEIGHTS_NAME", "SIMONet"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_FORMAT = "lightning_simo.SIMONet/1"


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
        self.head_config = head_cfg
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

    # ------------------------------------------------------------------ pretrained folders
    def config_dict(self) -> dict[str, Any]:
        """Everything :meth:`from_pretrained` needs to rebuild this net (weights apart)."""
        encoder = {**self.encoder.config.to_dict(), "checkpoint": None, "pretrained": False}
        adapters = getattr(self.encoder, "adapters", None)
        normal_loss = next(
            (t.options["normal_loss"] for t in self.tasks.values() if "normal_loss" in t.options),
            "cosine",
        )
        return {
            "format": CONFIG_FORMAT,
            "tasks": list(self.tasks),
            "num_classes": {n: t.num_classes for n, t in self.tasks.items() if t.num_classes},
            "normal_loss": normal_loss,
            "encoder": encoder,
            "head": self.head_config.to_dict(),
            "adapters": None
            if adapters is None
            else {"rank": adapters[0].down.out_features, "form": adapters[0].form},
            "input": {
                "channels": 3,
                "value_range": [0.0, 1.0],
                "scaling": self.encoder.config.input_scaling,
                "pad_to_patch": self.encoder.config.pad_to_patch,
            },
            "outputs": {n: {"kind": t.kind, "channels": t.channels} for n, t in self.tasks.items()},
        }

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``folder`` (atomic files)."""
        from lightning_simo.checkpoints import save_state_dict_atomic
        from lightning_simo.io import atomic_write_text

        out = Path(folder)
        save_state_dict_atomic(self.state_dict(), out / WEIGHTS_NAME)
        atomic_write_text(out / CONFIG_NAME, json.dumps(self.config_dict(), indent=2) + "\n")
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SIMONet:
        """An untrained net of the shape ``config`` (a :meth:`config_dict`) describes."""
        if config.get("format") != CONFIG_FORMAT:
            raise ValueError(
                f"Not a lightning_simo SIMONet config (format {config.get('format')!r}, "
                f"expected {CONFIG_FORMAT!r}); export the checkpoint with `lightning_simo export`."
            )
        tasks = build_tasks(config["tasks"], config.get("num_classes"), config["normal_loss"])
        net = cls(tasks, config["encoder"], config["head"])
        adapters = config.get("adapters")
        if adapters:
            from lightning_simo.models.adapters import add_adapters

            add_adapters(net.encoder, int(adapters["rank"]), str(adapters["form"]))
        return net

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> SIMONet:
        """Rebuild a net written by :meth:`save_pretrained` / ``lightning_simo export``.

        The folder may also be a Hugging Face Hub download (``snapshot_download``): the layout
        is the same. The net is returned in eval mode.
        """
        from safetensors.torch import load_file

        root = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (root / name).is_file():
                raise FileNotFoundError(
                    f"{str(root / name)!r} not found: {str(root)!r} is not an exported model "
                    "folder (make one with `lightning_simo export CKPT --out FOLDER`)."
                )
        net = cls.from_config(json.loads((root / CONFIG_NAME).read_text()))
        net.load_state_dict(load_file(str(root / WEIGHTS_NAME)), strict=True)
        return net.eval()
