"""What each re-alignment mode trains, decided once, before DDP wraps the model.

Freezing, adapter injection and feature caching live here so that the MergeCallback only
orchestrates; every function is deterministic, so all ranks end with the same parameter set.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_simo.models.adapters import BlockAdapter
from lightning_simo.models.encoders import Encoder, EncoderOutput
from lightning_simo.models.simo import SIMONet

__all__ = [
    "REALIGN_MODES",
    "FeatureCache",
    "add_adapters",
    "apply_realign_mode",
]

REALIGN_MODES = ("none", "heads", "adapters", "full", "tinting", "adamerging")
_FINGERPRINT_SAMPLES = 64
# the same image gives the same signature up to reduction order on the device
_FINGERPRINT_RTOL = 1e-5
_FINGERPRINT_ATOL = 1e-4


def add_adapters(encoder: Encoder, rank: int, form: str) -> list[RemovableHandle]:
    """Attach one adapter to the output of every encoder block (``encoder.adapters``)."""
    if hasattr(encoder, "adapters"):
        raise ValueError("The encoder already carries adapters.")
    blocks = encoder.block_modules()
    dims = [_block_width(encoder, i) for i in range(len(blocks))]
    encoder.adapters = nn.ModuleList(BlockAdapter(d, rank, form) for d in dims)
    handles = []
    for block, adapter in zip(blocks, encoder.adapters, strict=True):
        handles.append(block.register_forward_hook(_adapter_hook(adapter)))
    return handles


def _adapter_hook(adapter: BlockAdapter):  # noqa: ANN202 - a forward hook
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        return adapter(output)

    return hook


def _block_width(encoder: Encoder, index: int) -> int:
    backbone = encoder.backbone
    if hasattr(backbone, "blocks"):
        return int(backbone.embed_dim)
    return int(backbone.feature_info[index]["num_chs"])


def apply_realign_mode(
    net: SIMONet, mode: str, adapter_rank: int = 16, adapter_form: str = "lora"
) -> None:
    """Set ``requires_grad`` for ``mode`` (and inject adapters for ``adapters``).

    ``none``: nothing trains (evaluate the merged model). ``heads``: heads only. ``adapters``:
    block adapters and heads; encoder weights frozen. ``full``: everything. ``tinting`` and
    ``adamerging`` freeze the net here; their coefficients and tinted layers are set up by the
    tinting code.
    """
    if mode not in REALIGN_MODES:
        raise ValueError(f"Re-alignment mode must be one of {REALIGN_MODES}, got {mode!r}.")
    net.requires_grad_(mode == "full")
    for name in getattr(net.encoder, "unused_parameters", []):  # never reached by any head
        net.encoder.backbone.get_parameter(name).requires_grad_(False)
    if mode == "heads":
        net.heads.requires_grad_(True)
    elif mode == "adapters":
        add_adapters(net.encoder, adapter_rank, adapter_form)
        net.encoder.adapters.requires_grad_(True)
        net.heads.requires_grad_(True)


class FeatureCache:
    """Encoder features of the training samples, computed once per sample index.

    With a frozen encoder (head re-alignment) every epoch after the first costs only the heads.
    Only valid when the training data is not augmented: the same index must always be the same
    image. A cheap fingerprint of each cached image (its pixel sum and a strided sample of its
    pixels) is kept, and a later batch whose image differs for a cached index raises a
    ``RuntimeError`` instead of silently training the heads on features of another image.
    """

    def __init__(self, encoder: Encoder, device: torch.device | str | None = None) -> None:
        self.encoder = encoder
        self.device = device
        self._store: dict[int, tuple[list[Tensor], list[Tensor] | None]] = {}
        self._fingerprints: dict[int, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Tensor]) -> EncoderOutput | None:
        if "index" not in batch:
            return None
        indices = [int(i) for i in batch["index"].tolist()]
        images = batch["image"]
        prints = _fingerprints(images)
        missing = [j for j, i in enumerate(indices) if i not in self._store]
        cached = [j for j, i in enumerate(indices) if i in self._store]
        if cached:
            self._check_unchanged([indices[j] for j in cached], prints[cached])
        if missing:
            was_training = self.encoder.training
            self.encoder.eval()
            out = self.encoder(images[missing])
            self.encoder.train(was_training)
            for k, j in enumerate(missing):
                feats = [f[k].detach().clone() for f in out.features]
                tokens = (
                    None
                    if out.class_tokens is None
                    else [t[k].detach().clone() for t in out.class_tokens]
                )
                self._store[indices[j]] = (feats, tokens)
                self._fingerprints[indices[j]] = prints[j]
            self.misses += len(missing)
        self.hits += len(indices) - len(missing)
        entries = [self._store[i] for i in indices]
        features = [torch.stack([e[0][lvl] for e in entries]) for lvl in range(len(entries[0][0]))]
        tokens = None
        if entries[0][1] is not None:
            tokens = [
                torch.stack([e[1][lvl] for e in entries]) for lvl in range(len(entries[0][1]))
            ]
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return EncoderOutput(features, tokens, size)

    def _check_unchanged(self, indices: list[int], prints: Tensor) -> None:
        """Raise if an image differs from the one whose features were cached for its index.

        Compared in one batched operation so the check costs a single device synchronisation.
        """
        stored = [self._fingerprints[i] for i in indices]
        if all(s.shape == prints.shape[1:] for s in stored) and torch.allclose(
            torch.stack(stored), prints, rtol=_FINGERPRINT_RTOL, atol=_FINGERPRINT_ATOL
        ):
            return
        changed = next(
            i
            for i, s, p in zip(indices, stored, prints, strict=True)
            if s.shape != p.shape
            or not torch.allclose(s, p, rtol=_FINGERPRINT_RTOL, atol=_FINGERPRINT_ATOL)
        )
        raise RuntimeError(
            f"Cached encoder features are stale: training sample {changed} is not the image "
            "whose features were cached for it (is the training data augmented?). Feature "
            "caching needs the same image for the same index in every epoch: set `augment: "
            "false` on the datamodule, or `cache_features: false` on the MergeCallback."
        )


def _fingerprints(images: Tensor) -> Tensor:
    """Per-image signature ``B x (1 + n)``: the pixel sum and ``n`` evenly strided pixels.

    The sum catches crops, rescaling and colour changes; the strided sample catches flips, which
    leave the sum unchanged. Different image sizes give signatures of different lengths.
    """
    flat = images.detach().flatten(1).float()
    step = max(1, flat.shape[1] // _FINGERPRINT_SAMPLES)
    sample = flat[:, ::step][:, :_FINGERPRINT_SAMPLES]
    return torch.cat([flat.sum(dim=1, keepdim=True), sample], dim=1)
