"""Dense Representation Surgery: label-free per-task correction of the merged representation.

Representation Surgery (Yang et al., 2024) puts a small module after the merged encoder for each
task, ``z_t = z - up(ReLU(down(z)))`` (rank ``r``, ``up`` zero-initialised so training starts at
the merged model), and trains it so that the corrected features match the task's own fine-tuned
encoder's features: ``L1(z_t, z^(t))``. Here it is dense: one such module per task and encoder
level (feature maps, and class tokens when the encoder returns them), applied in front of that
task's head by a forward pre-hook, so validation, test, predict and exported checkpoints all see
the corrected features. No label is read; the merged encoder and the fine-tuned heads stay frozen.

The MergeCallback (``merge.realign: surgery``) builds the merged encoder and calls
:meth:`SurgeryModule.configure_surgery`; the single-task encoders' features (the targets) and
the merged encoder's features are computed once per training sample
(:class:`~lightning_simo.merging.cache.SampleCache`) when the training data is not augmented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_simo.merging.cache import SampleCache
from lightning_simo.models.adapters import BlockAdapter
from lightning_simo.models.encoders import EncoderOutput
from lightning_simo.modules.simo import SIMOModule

__all__ = ["SurgeryModule", "TaskSurgery"]


class TaskSurgery(nn.Module):
    """One task's correction: a residual rank-``r`` module per encoder level (without biases,
    as the projections of Representation Surgery's code)."""

    def __init__(self, channels: Sequence[int], rank: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(BlockAdapter(c, rank, "residual") for c in channels)

    def forward(self, feats: EncoderOutput) -> EncoderOutput:
        features = [level(f) for level, f in zip(self.levels, feats.features, strict=True)]
        tokens = None
        if feats.class_tokens is not None:
            tokens = [level(t) for level, t in zip(self.levels, feats.class_tokens, strict=True)]
        return EncoderOutput(features, tokens, feats.image_size)


def _flat(feats: EncoderOutput) -> list[Tensor]:
    return [*feats.features, *(feats.class_tokens or [])]


def _unflat(parts: Sequence[Tensor], levels: int, size: tuple[int, int]) -> EncoderOutput:
    tokens = list(parts[levels:]) or None
    return EncoderOutput(list(parts[:levels]), tokens, size)


class SurgeryModule(SIMOModule):
    """A merged SIMO model re-aligned by dense Representation Surgery (``realign: surgery``).

    Args:
        tasks: the merged tasks (linked from the datamodule).
        surgery_rank: rank of every surgery module.
        lr_surgery: Adam learning rate of the surgery modules.
        cache_features: compute the merged and single-task encoders' features once per training
            sample (needs un-augmented training data; checked).
        **kwargs: the other :class:`SIMOModule` arguments; its optimiser settings are unused.
    """

    def __init__(
        self,
        tasks: list[str],
        surgery_rank: int = 16,
        lr_surgery: float = 1e-3,
        cache_features: bool = True,
        **kwargs: Any,
    ) -> None:
        if surgery_rank < 1:
            raise ValueError(f"surgery_rank must be >= 1, got {surgery_rank}.")
        if lr_surgery <= 0:
            raise ValueError(f"lr_surgery must be > 0, got {lr_surgery}.")
        super().__init__(tasks=tasks, **kwargs)
        self.surgery_rank = surgery_rank
        self.lr_surgery = lr_surgery
        self.surgery: nn.ModuleDict | None = None
        self._teachers: list[dict[str, Tensor]] = []
        self._levels = len(self.net.encoder.channels)
        self._caches: dict[str, SampleCache] | None = None
        if cache_features:
            fix = "`model.init_args.cache_features: false`"
            self._caches = {"merged": SampleCache("merged encoder features", fix)}
            self._caches.update({t: SampleCache(f"{t} encoder features", fix) for t in tasks})

    # ------------------------------------------------------------------ set-up (MergeCallback)
    def build_surgery(self) -> None:
        """Create the surgery modules and their pre-hooks (the structure a checkpoint restores)."""
        if self.surgery is not None:
            return
        channels = self.net.encoder.channels
        self.surgery = nn.ModuleDict(
            {t: TaskSurgery(channels, self.surgery_rank) for t in self.tasks}
        )
        for task in self.tasks:
            self.net.heads[task].register_forward_pre_hook(self._pre_hook(task))

    def _pre_hook(self, task: str):  # noqa: ANN202 - a forward pre-hook
        def hook(module: nn.Module, args: tuple) -> tuple:
            assert self.surgery is not None
            return (self.surgery[task](args[0]), *args[1:])

        return hook

    def configure_surgery(self, finetuned: Sequence[Mapping[str, Tensor]]) -> None:
        """Freeze the net, build the surgery modules, keep each task's encoder as its target."""
        if len(finetuned) != len(self.tasks):
            raise ValueError(
                f"Got {len(finetuned)} fine-tuned encoders for the {len(self.tasks)} tasks."
            )
        self.net.requires_grad_(False)
        self.build_surgery()
        assert self.surgery is not None
        self.surgery.requires_grad_(True)
        self._teachers = [{k: v.detach().clone() for k, v in ft.items()} for ft in finetuned]

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def _merged(self, images: Tensor) -> list[Tensor]:
        return _flat(self.net.encoder(images))

    def _teacher(self, k: int) -> Any:
        @torch.no_grad()
        def compute(images: Tensor) -> list[Tensor]:
            state = {n: v.to(images.device) for n, v in self._teachers[k].items()}
            return _flat(functional_call(self.net.encoder, state, (images,)))

        return compute

    def _features(self, name: str, batch: Mapping[str, Tensor], compute: Any) -> list[Tensor]:
        if self._caches is None or "index" not in batch:
            return compute(batch["image"])
        return self._caches[name].get(batch["index"], batch["image"], compute)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.surgery is None or not self._teachers:
            raise ValueError(_NOT_CONFIGURED)
        self.net.eval()  # frozen encoder and heads: no BatchNorm updates, no dropout
        images = batch["image"]
        size = (int(images.shape[-2]), int(images.shape[-1]))
        merged = _unflat(self._features("merged", batch, self._merged), self._levels, size)
        losses = {}
        for k, task in enumerate(self.tasks):
            target = self._features(task, batch, self._teacher(k))
            corrected = _flat(self.surgery[task](merged))
            losses[task] = torch.stack(
                [F.l1_loss(c.float(), t.float()) for c, t in zip(corrected, target, strict=True)]
            ).mean()
            self.log(f"train/{task}/surgery_l1", losses[task].detach(), batch_size=len(images))
        total = torch.stack(list(losses.values())).mean()
        self.log("train/loss", total.detach(), batch_size=len(images), prog_bar=True)
        self.samples_seen += images.shape[0]
        return total

    def configure_optimizers(self) -> Any:
        if self.surgery is None:
            raise ValueError(_NOT_CONFIGURED)
        return torch.optim.Adam(self.surgery.parameters(), lr=self.lr_surgery)


_NOT_CONFIGURED = (
    "SurgeryModule trains only what Representation Surgery sets up: add the MergeCallback with "
    "merge.realign: surgery to the config."
)
