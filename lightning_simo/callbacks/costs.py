"""EncoderPassCounter: how many images went through the encoder forward, and back, in a run.

Optimizer steps and labelled samples do not say what a run cost when the runs differ in what
they push through the encoder: head re-alignment with cached features trains for many steps
without running the encoder at all, a gradient aggregator runs one backward per task. This
callback counts, per run, the images of every encoder forward (training, validation, the α
search of the MergeCallback) and the image-rows of every backward that reaches the encoder's
output (a jacobian of T task rows counts T per image), and writes them to
``<default_root_dir>/encoder_passes.json`` under the trainer function (``fit`` / ``test``).

The test loop and the sanity check are not counted: every method is tested on the same images,
and a resumed fit checks again. A backward is seen through a hook on the deepest feature level, so features that are
detached (a linear probe epoch, head re-alignment on a frozen encoder) count no backward.
Counts are kept in checkpoints, so a resumed fit continues them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_simo.io import atomic_write_text

__all__ = ["ENCODER_PASSES_FILE", "EncoderPassCounter", "read_encoder_passes"]

ENCODER_PASSES_FILE = "encoder_passes.json"


def _encoder(pl_module: L.LightningModule) -> torch.nn.Module | None:
    net = getattr(pl_module, "net", None)
    encoder = getattr(net, "encoder", None) if net is not None else None
    return encoder if encoder is not None else getattr(pl_module, "encoder", None)


def _deepest(output: Any) -> Tensor | None:
    features = getattr(output, "features", None)
    if features:
        return features[-1]
    return output if isinstance(output, Tensor) else None


class EncoderPassCounter(L.Callback):
    """Counts encoder forward images and backward image-rows (see the module docstring)."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self._paused = False
        self._restored = (0, 0)
        self._handle: Any = None
        self._world = 1

    # ------------------------------------------------------------------ hooks on the encoder
    def _on_forward(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if self._paused or not inputs:
            return
        images = inputs[0]
        batch = int(images.shape[0]) if isinstance(images, Tensor) and images.dim() > 0 else 0
        self.forward += batch * self._world
        deepest = _deepest(output)
        if deepest is not None and deepest.requires_grad and torch.is_grad_enabled():
            size = max(1, deepest.numel())

            def on_grad(grad: Tensor) -> None:
                # a batched jacobian carries one row per task in front of the feature's shape
                self.backward += batch * self._world * max(1, grad.numel() // size)

            deepest.register_hook(on_grad)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._world = int(trainer.world_size)
        encoder = _encoder(pl_module)
        if encoder is not None and self._handle is None:
            self._handle = encoder.register_forward_hook(self._on_forward)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if trainer.is_global_zero:
            self._write(Path(trainer.default_root_dir), stage)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = True

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = True  # a resumed fit checks again: not counted, so resuming adds nothing

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = False

    # ------------------------------------------------------------------ records
    def _write(self, folder: Path, stage: str) -> None:
        path = folder / ENCODER_PASSES_FILE
        record = read_encoder_passes(folder, by_function=True)
        # a test restores the fit's counts from its checkpoint: they are the fit's, not its own
        forward, backward = self.forward, self.backward
        if stage != "fit":
            forward, backward = forward - self._restored[0], backward - self._restored[1]
        record[stage] = {"forward": forward, "backward": backward}
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = (int(state_dict.get("forward", 0)), int(state_dict.get("backward", 0)))
        self.forward += self._restored[0]
        self.backward += self._restored[1]


def read_encoder_passes(folder: str | Path, by_function: bool = False) -> dict[str, Any]:
    """The counts a run folder holds: summed over its ``fit`` and ``test`` records, or (with
    ``by_function``) the raw record; empty when the run had no counter."""
    path = Path(folder) / ENCODER_PASSES_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        record = {}
    if by_function:
        return record if isinstance(record, dict) else {}
    totals = {"forward": 0, "backward": 0}
    for counts in record.values():
        for key in totals:
            totals[key] += int(counts.get(key, 0))
    return totals if record else {}
