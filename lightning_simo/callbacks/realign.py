"""Re-alignment modes as registered objects: what each freezes, what it adds, which module it needs.

``merge.realign: <name>`` selects a :class:`RealignMode` from :data:`REALIGN_MODES` (the one
registry helper); the MergeCallback asks the mode, never compares its name. Each mode decides in
the callback's ``setup`` (before DDP wraps the model, identically on every rank) which parameters
train (:meth:`RealignMode.prepare`, needs only the net, so a checkpoint's structure can be rebuilt
from it), and then wires what it needs into the module (:meth:`RealignMode.configure`: a feature
cache, the tinting coefficients, surgery modules...).

A new mode is one ``REALIGN_MODES.register(name, RealignMode(...))`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from lightning_simo.merging.cache import SampleCache
from lightning_simo.merging.sources import Sources
from lightning_simo.models.adapters import add_adapters
from lightning_simo.models.encoders import Encoder, EncoderOutput
from lightning_simo.models.simo import SIMONet
from lightning_simo.modules.surgery import SurgeryModule
from lightning_simo.modules.tinting import TintingModule
from lightning_simo.registry import Registry

__all__ = [
    "REALIGN_MODES",
    "EvalFeatureCaches",
    "FeatureCache",
    "RealignMode",
    "RealignSettings",
    "apply_realign_mode",
]


@dataclass(frozen=True)
class RealignSettings:
    """The MergeCallback's re-alignment options, handed to every mode."""

    adapter_rank: int = 16
    adapter_form: str = "lora"
    cache_features: bool = True


@dataclass(frozen=True)
class RealignMode:
    """One re-alignment mode.

    Args:
        summary: what trains, in a few words (messages, docs).
        trains_encoder: the encoder's own weights train (``full``); otherwise they are frozen and
            kept in eval mode every epoch (no BatchNorm updates, no dropout).
        heads: the task heads train.
        adapters: block adapters are injected after every encoder block and train.
        module_class: the LightningModule class the mode needs (``None``: any SIMOModule).
        configure: wires the mode into the module once the merged encoder is built
            (``configure(module, sources, settings)``).
        trains: anything trains at all (``none`` only evaluates the merged model).
    """

    summary: str
    trains_encoder: bool = False
    heads: bool = False
    adapters: bool = False
    module_class: type[L.LightningModule] | None = None
    configure: Callable[[L.LightningModule, Sources, RealignSettings], None] | None = None
    trains: bool = True

    def check_module(self, name: str, module: L.LightningModule) -> None:
        """Refuse a module of the wrong class before anything is merged."""
        needed = self.module_class
        if needed is not None and not isinstance(module, needed):
            raise ValueError(
                f"realign: {name} needs model class {needed.__module__}.{needed.__qualname__}"
            )

    def prepare(self, net: SIMONet, settings: RealignSettings = RealignSettings()) -> None:
        """Set ``requires_grad`` for this mode, injecting adapters when it has them."""
        net.requires_grad_(self.trains_encoder)
        for name in getattr(net.encoder, "unused_parameters", []):  # never reached by any head
            net.encoder.backbone.get_parameter(name).requires_grad_(False)
        if self.adapters:
            add_adapters(net.encoder, settings.adapter_rank, settings.adapter_form)
            net.encoder.adapters.requires_grad_(True)
        if self.heads:
            net.heads.requires_grad_(True)


REALIGN_MODES: Registry[RealignMode] = Registry(
    "re-alignment mode", "set merge.realign to one of them"
)


def apply_realign_mode(
    net: SIMONet, mode: str, adapter_rank: int = 16, adapter_form: str = "lora"
) -> None:
    """:meth:`RealignMode.prepare` of the mode named ``mode`` (rebuilds a run's structure)."""
    REALIGN_MODES.get(mode).prepare(net, RealignSettings(adapter_rank, adapter_form))


class FeatureCache:
    """Encoder features of the training samples, computed once per sample index (a
    :class:`~lightning_simo.merging.cache.SampleCache` of the frozen encoder's outputs).

    With a frozen encoder (head re-alignment) every epoch after the first costs only the heads.
    """

    def __init__(self, encoder: Encoder, device: torch.device | str | None = None) -> None:
        self.encoder = encoder
        self.cache = SampleCache(
            "encoder features", "`cache_features: false` on the MergeCallback", device
        )
        self._levels = 0
        self._tokens = False

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def misses(self) -> int:
        return self.cache.misses

    @torch.no_grad()
    def _compute(self, images: Tensor) -> list[Tensor]:
        was_training = self.encoder.training
        self.encoder.eval()
        out = self.encoder(images)
        self.encoder.train(was_training)
        self._levels = len(out.features)
        self._tokens = out.class_tokens is not None
        return [*out.features, *(out.class_tokens or [])]

    def __call__(self, batch: Mapping[str, Tensor]) -> EncoderOutput | None:
        if "index" not in batch:
            return None
        images = batch["image"]
        parts = self.cache.get(batch["index"], images, self._compute)
        features, tokens = parts[: self._levels], parts[self._levels :]
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return EncoderOutput(features, tokens if self._tokens else None, size)


class EvalFeatureCaches:
    """One :class:`FeatureCache` per evaluation loop (``validate``, ``sanity_check``, ``test``
    ...), so the frozen encoder runs once per evaluated image, not once per epoch; loops never
    share a cache, as their splits reuse sample indices."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.caches: dict[str, FeatureCache] = {}

    def __call__(self, batch: Mapping[str, Tensor], loop: str) -> EncoderOutput | None:
        if loop not in self.caches:
            self.caches[loop] = FeatureCache(self.encoder)
        return self.caches[loop](batch)


# ----------------------------------------------------------------------------- the modes
def _cache_features(module: L.LightningModule, sources: Sources, settings: RealignSettings) -> None:
    if settings.cache_features:
        module.feature_source = FeatureCache(module.net.encoder)
        module.eval_feature_source = EvalFeatureCaches(module.net.encoder)


def _tinting(module: L.LightningModule, sources: Sources, settings: RealignSettings) -> None:
    module.configure_tinting(sources.theta0, sources.finetuned, dict(sources.heads), True)


def _adamerging(module: L.LightningModule, sources: Sources, settings: RealignSettings) -> None:
    module.configure_tinting(sources.theta0, sources.finetuned, dict(sources.heads), False)


def _surgery(module: L.LightningModule, sources: Sources, settings: RealignSettings) -> None:
    module.configure_surgery(sources.finetuned)


REALIGN_MODES.register("none", RealignMode("nothing (evaluate the merged model)", trains=False))
REALIGN_MODES.register(
    "heads", RealignMode("the task heads", heads=True, configure=_cache_features)
)
REALIGN_MODES.register(
    "adapters", RealignMode("block adapters and the task heads", heads=True, adapters=True)
)
REALIGN_MODES.register(
    "full", RealignMode("everything: encoder and heads", trains_encoder=True, heads=True)
)
REALIGN_MODES.register(
    "tinting",
    RealignMode(
        "layer-wise merge coefficients and one layer of each head, label-free",
        module_class=TintingModule,
        configure=_tinting,
    ),
)
REALIGN_MODES.register(
    "adamerging",
    RealignMode(
        "layer-wise merge coefficients, label-free",
        module_class=TintingModule,
        configure=_adamerging,
    ),
)
REALIGN_MODES.register(
    "surgery",
    RealignMode(
        "per-task representation surgery after the merged encoder, label-free",
        module_class=SurgeryModule,
        configure=_surgery,
    ),
)
