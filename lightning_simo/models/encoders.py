"""A timm backbone seen as a list of multi-level dense feature maps (plus class tokens).

Every head reads the same representation: the outputs of chosen blocks (``forward_intermediates``,
without the final norm, as in the SIMO paper) as ``B x C x h x w`` maps, and for ViTs the class
token of each of those blocks. Keeping this in one wrapper means merging, adapters and caching
see one parameter naming (``backbone.<timm key>``) whatever the timm model is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Encoder", "EncoderConfig", "EncoderOutput", "INPUT_SCALINGS"]

INPUT_SCALINGS = ("symmetric", "imagenet", "none")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    """How to build the shared encoder.

    Args:
        name: any timm model name (``vit_base_patch14_dinov2.lvd142m`` for the paper,
            ``vit_small_patch16_224`` reshaped by ``model_kwargs`` for the synthetic default).
        model_kwargs: extra ``timm.create_model`` arguments (patch size, width, depth, ...).
        pretrained: download timm's pretrained weights (needs internet).
        checkpoint: a local checkpoint holding encoder weights (a checkpoint of this project,
            a plain timm state dict, or safetensors); loaded without executing pickled code.
        indices: blocks whose outputs the heads read (0-based; negative counts from the end).
        class_token: also return each level's class token (ViTs with a class token only).
        input_scaling: ``symmetric`` maps [0, 1] to [-1, 1] (DINOv2 in the paper), ``imagenet``
            standardises with ImageNet statistics, ``none`` leaves inputs as they are.
        pad_to_patch: zero-pad inputs to a multiple of the patch size (any image size works).
    """

    name: str = "vit_small_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    indices: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])
    class_token: bool = True
    input_scaling: str = "symmetric"
    pad_to_patch: bool = True

    def __post_init__(self) -> None:
        # a command-line `null` inside a nested dataclass can arrive as the string "None"
        if isinstance(self.checkpoint, str) and self.checkpoint.strip() in ("", "None", "null"):
            self.checkpoint = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, value: EncoderConfig | dict[str, Any] | None) -> EncoderConfig:
        """Accept the dataclass or its dict form (hyper-parameters are stored as plain dicts so
        checkpoints load with ``weights_only=True``)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"Expected an EncoderConfig or a dict, got {type(value).__name__}.")


@dataclass
class EncoderOutput:
    """Per-level feature maps ``B x C_i x h_i x w_i`` and, when enabled, class tokens ``B x C_i``."""

    features: list[Tensor]
    class_tokens: list[Tensor] | None
    image_size: tuple[int, int]


def _create_backbone(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """Create a timm model; ViTs get ``dynamic_img_size`` so any (padded) image size works."""
    if not timm.is_model(name) and not timm.list_models(name):
        raise ValueError(f"Unknown timm model {name!r}; see `timm.list_models()` for names.")
    if "dynamic_img_size" not in kwargs:
        try:
            return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
        except TypeError:
            pass  # not a ViT-like model: no such argument
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class Encoder(nn.Module):
    """A timm backbone returning multi-level dense features."""

    def __init__(self, config: EncoderConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = EncoderConfig.coerce(config)
        cfg = self.config
        if cfg.input_scaling not in INPUT_SCALINGS:
            raise ValueError(
                f"input_scaling must be one of {INPUT_SCALINGS}, got {cfg.input_scaling!r}."
            )
        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("num_classes", 0)
        self.backbone = _create_backbone(cfg.name, cfg.pretrained, kwargs)
        self._is_vit = hasattr(self.backbone, "blocks") and hasattr(self.backbone, "patch_embed")
        n_blocks = self.num_blocks
        self.indices = [i if i >= 0 else n_blocks + i for i in cfg.indices]
        for i in self.indices:
            if not 0 <= i < n_blocks:
                raise ValueError(
                    f"Encoder block index {i} is out of range for {cfg.name!r} ({n_blocks} blocks)."
                )
        if len(set(self.indices)) != len(self.indices):
            raise ValueError(f"Encoder block indices must be distinct, got {cfg.indices}.")
        self.use_class_token = bool(
            cfg.class_token
            and self._is_vit
            and getattr(self.backbone, "cls_token", None) is not None
        )
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if cfg.checkpoint:
            self.load_weights(cfg.checkpoint)
        self.unused_parameters = self._freeze_unused()

    # ------------------------------------------------------------------ facts about the model
    @property
    def num_blocks(self) -> int:
        if self._is_vit:
            return len(self.backbone.blocks)
        return len(self.backbone.feature_info)

    @property
    def patch_size(self) -> int:
        if self._is_vit:
            p = self.backbone.patch_embed.patch_size
            return int(p[0] if isinstance(p, (tuple, list)) else p)
        return int(self.backbone.feature_info[-1]["reduction"])

    @property
    def channels(self) -> list[int]:
        """Channels of each returned level (class tokens have the same width as their level)."""
        if self._is_vit:
            return [self.backbone.embed_dim for _ in self.indices]
        return [self.backbone.feature_info[i]["num_chs"] for i in self.indices]

    @property
    def reductions(self) -> list[int]:
        if self._is_vit:
            return [self.patch_size for _ in self.indices]
        return [self.backbone.feature_info[i]["reduction"] for i in self.indices]

    def block_modules(self) -> list[nn.Module]:
        """The blocks whose outputs can carry adapters (ViT blocks or CNN stages)."""
        if self._is_vit:
            return list(self.backbone.blocks)
        return [self.backbone.get_submodule(f["module"]) for f in self.backbone.feature_info]

    def _freeze_unused(self) -> list[str]:
        """Freeze backbone parameters the heads never read (final norm, classifier, blocks after
        the last index): they would get no gradient, which plain DDP refuses, and they would
        inflate trainable-parameter counts. Found by one tiny forward, so it holds for any timm
        model."""
        named = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        if not named:
            return []
        size = max(2 * self.patch_size, 32)
        was_training = self.training
        self.eval()
        with torch.enable_grad():
            out = self.forward(torch.zeros(1, 3, size, size))
            total = sum(f.float().sum() for f in out.features)
            if out.class_tokens is not None:
                total = total + sum(t.float().sum() for t in out.class_tokens)
            grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
        self.train(was_training)
        unused = [n for (n, p), g in zip(named, grads, strict=True) if g is None]
        for name, param in named:
            if name in unused:
                param.requires_grad_(False)
        return unused

    # ------------------------------------------------------------------ weights
    def load_weights(self, path: str) -> None:
        """Load encoder weights from a local checkpoint (data only, never pickled code)."""
        from lightning_simo.checkpoints import encoder_state_dict, load_state_dict

        state = encoder_state_dict(load_state_dict(path))
        own = self.state_dict()
        missing = [k for k in own if k.startswith("backbone.") and k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise ValueError(
                f"Checkpoint {path!r} does not hold weights of encoder {self.config.name!r} "
                f"({detail}). Use the checkpoint made with the same encoder settings."
            )
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"Checkpoint {path!r} is from another encoder: {key!r} has shape "
                    f"{tuple(value.shape)} there and {tuple(own[key].shape)} here. Use a "
                    "checkpoint made with the same encoder settings (name, model_kwargs)."
                )
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ forward
    def prepare(self, images: Tensor) -> Tensor:
        """Scale inputs as the backbone expects and pad to a multiple of the patch size."""
        cfg = self.config
        if cfg.input_scaling == "symmetric":
            images = images * 2.0 - 1.0
        elif cfg.input_scaling == "imagenet":
            images = (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)
        if cfg.pad_to_patch:
            p = self.patch_size
            h, w = images.shape[-2:]
            ph, pw = (-h) % p, (-w) % p
            if ph or pw:
                images = F.pad(images, (0, pw, 0, ph))
        return images

    def forward(self, images: Tensor) -> EncoderOutput:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        x = self.prepare(images)
        if self._is_vit:
            outs = self.backbone.forward_intermediates(
                x,
                indices=self.indices,
                norm=False,
                output_fmt="NCHW",
                intermediates_only=True,
                return_prefix_tokens=self.use_class_token,
            )
            if self.use_class_token:
                feats = [o[0] for o in outs]
                tokens = [o[1][:, 0] for o in outs]
                return EncoderOutput(feats, tokens, size)
            return EncoderOutput(list(outs), None, size)
        outs = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return EncoderOutput(list(outs), None, size)
