"""Dense task heads reading the encoder's multi-level features.

Two shapes from the SIMO paper: the ~0.1M-parameter *linear* head (NYUv2) and a small *DPT*
head (Cityscapes, Taskonomy); and the *DeepLab* head (ASPP, DeepLabv3) that FusionBench puts on a
dilated ResNet-50 for its NYUv2 merging benchmark. All end in a plain 1x1 conv (``head.out``),
the layer that Model Tinting trains per task, and all produce maps that the caller resizes to
the label size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_simo.models.encoders import EncoderOutput
from lightning_simo.tasks import Task

__all__ = ["DPTHead", "DeepLabHead", "HEAD_KINDS", "HeadConfig", "LinearHead", "build_head"]

HEAD_KINDS = ("linear", "dpt", "deeplab")


@dataclass
class HeadConfig:
    """How to build each task's head.

    Args:
        kind: ``linear`` (BN + 1x1 conv over concatenated levels), ``dpt`` or ``deeplab`` (ASPP
            over the last level, FusionBench's NYUv2 head).
        upsample: pixel-shuffle factor of the linear head's output (1 = the paper's head; the
            synthetic default uses 4, since a 1x1 conv on an 8x10 map is too coarse for 64x80
            labels).
        min_depth: depth-like outputs are ``ReLU(x) + min_depth`` (strictly positive).
        dpt_channels: reassemble widths of the four DPT levels.
        dpt_features: DPT fusion width.
        aspp_rates: dilation rates of the DeepLab head's three atrous branches.
        aspp_channels: width of every DeepLab branch and of its output convolutions.
    """

    kind: str = "linear"
    upsample: int = 1
    min_depth: float = 1e-3
    dpt_channels: list[int] = field(default_factory=lambda: [24, 48, 96, 192])
    dpt_features: int = 128
    aspp_rates: list[int] = field(default_factory=lambda: [12, 24, 36])
    aspp_channels: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, value: HeadConfig | dict[str, Any] | None) -> HeadConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"Expected a HeadConfig or a dict, got {type(value).__name__}.")


class _OutputActivation(nn.Module):
    """ReLU + min_depth for depth-like tasks; identity otherwise."""

    def __init__(self, positive: bool, min_depth: float) -> None:
        super().__init__()
        self.positive = positive
        self.min_depth = min_depth

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x) + self.min_depth if self.positive else x


class LinearHead(nn.Module):
    """Per level: patch map concatenated with its class token; levels concatenated; BN; 1x1 conv."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        class_token: bool,
        positive: bool = False,
        upsample: int = 1,
        min_depth: float = 1e-3,
    ) -> None:
        super().__init__()
        if upsample < 1:
            raise ValueError(f"upsample must be >= 1, got {upsample}.")
        self.class_token = class_token
        self.upsample = upsample
        width = sum(in_channels) * (2 if class_token else 1)
        self.norm = nn.BatchNorm2d(width)
        self.out = nn.Conv2d(width, out_channels * upsample * upsample, kernel_size=1)
        self.shuffle = nn.PixelShuffle(upsample) if upsample > 1 else nn.Identity()
        self.activation = _OutputActivation(positive, min_depth)

    def forward(self, feats: EncoderOutput) -> Tensor:
        size = feats.features[0].shape[-2:]
        levels = []
        for i, f in enumerate(feats.features):
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            levels.append(f)
            if self.class_token:
                if feats.class_tokens is None:
                    raise ValueError("This head reads class tokens but the encoder gives none.")
                token = feats.class_tokens[i]
                levels.append(token[:, :, None, None].expand(-1, -1, *size))
        x = self.out(self.norm(torch.cat(levels, dim=1)))
        return self.activation(self.shuffle(x))


class _ResidualConvUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    def __init__(self, channels: int, has_skip: bool = True) -> None:
        super().__init__()
        # the coarsest block has no skip input: no unit for it (DDP forbids unused parameters)
        self.skip_unit = _ResidualConvUnit(channels) if has_skip else None
        self.unit = _ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Fuse ``skip`` (same size as ``x``) and upsample to ``size`` (default: twice)."""
        if skip is not None:
            if self.skip_unit is None:
                raise ValueError("This fusion block takes no skip input.")
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.project(x)


class DPTHead(nn.Module):
    """A small DPT decoder: reassemble four levels to 1/4..1/32-like scales, fuse coarse to fine.

    The class token is *added* to every patch token (SIMO paper, Cityscapes / Taskonomy).
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        class_token: bool,
        positive: bool = False,
        reassemble: list[int] | None = None,
        features: int = 128,
        min_depth: float = 1e-3,
        segmentation: bool = False,
    ) -> None:
        super().__init__()
        reassemble = reassemble or [24, 48, 96, 192]
        if len(in_channels) != 4 or len(reassemble) != 4:
            raise ValueError("The DPT head reads exactly four encoder levels.")
        self.class_token = class_token
        self.project = nn.ModuleList(
            nn.Conv2d(c, r, 1) for c, r in zip(in_channels, reassemble, strict=True)
        )
        # levels 0, 1 upsampled x4 / x2, level 2 kept, level 3 downsampled x2
        self.resample = nn.ModuleList(
            [
                nn.ConvTranspose2d(reassemble[0], reassemble[0], 4, stride=4),
                nn.ConvTranspose2d(reassemble[1], reassemble[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(reassemble[3], reassemble[3], 3, stride=2, padding=1),
            ]
        )
        self.to_features = nn.ModuleList(
            nn.Conv2d(r, features, 3, padding=1, bias=False) for r in reassemble
        )
        self.fusion = nn.ModuleList(_FusionBlock(features, has_skip=i < 3) for i in range(4))
        if segmentation:
            self.neck = nn.Sequential(
                nn.Conv2d(features, features, 3, padding=1, bias=False),
                nn.BatchNorm2d(features),
                nn.ReLU(inplace=True),
                nn.Dropout(0.1),
            )
            self.out = nn.Conv2d(features, out_channels, 1)
        else:
            self.neck = nn.Sequential(
                nn.Conv2d(features, features // 2, 3, padding=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(features // 2, 32, 3, padding=1),
                nn.ReLU(inplace=True),
            )
            self.out = nn.Conv2d(32, out_channels, 1)
        self.activation = _OutputActivation(positive, min_depth)

    def forward(self, feats: EncoderOutput) -> Tensor:
        levels = []
        for i, f in enumerate(feats.features):
            if self.class_token and feats.class_tokens is not None:
                f = f + feats.class_tokens[i][:, :, None, None]
            levels.append(self.to_features[i](self.resample[i](self.project[i](f))))
        x = self.fusion[3](levels[3], size=levels[2].shape[-2:])
        x = self.fusion[2](x, levels[2], size=levels[1].shape[-2:])
        x = self.fusion[1](x, levels[1], size=levels[0].shape[-2:])
        x = self.fusion[0](x, levels[0])
        return self.activation(self.out(self.neck(x)))


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1
) -> list[nn.Module]:
    pad = dilation * (kernel // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=pad, dilation=dilation, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class _ImagePooling(nn.Module):
    """The ASPP branch that sees the whole image: global average, 1x1 conv, back to the map size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = nn.Sequential(*_conv_bn_relu(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.project(x.mean(dim=(-2, -1), keepdim=True))
        return pooled.expand(-1, -1, *x.shape[-2:])


class DeepLabHead(nn.Module):
    """DeepLabv3's head (Chen et al., 2017) on the encoder's last level.

    Atrous spatial pyramid pooling: a 1x1 branch, three 3x3 branches dilated by ``rates`` and an
    image-pooling branch, each ``channels`` wide with BN + ReLU; their concatenation projected
    back to ``channels`` (BN, ReLU, dropout 0.5), a 3x3 conv-BN-ReLU, and the 1x1 output conv.
    This is the per-task decoder of FusionBench's NYUv2 benchmark (rates 12, 24, 36, width 256,
    on the 2048-channel output of a dilated ResNet-50); the earlier levels, if any, are unused.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        positive: bool = False,
        rates: list[int] | None = None,
        channels: int = 256,
        min_depth: float = 1e-3,
    ) -> None:
        super().__init__()
        rates = list(rates or [12, 24, 36])
        if not rates or any(r < 1 for r in rates):
            raise ValueError(f"aspp_rates must be dilation rates >= 1, got {rates}.")
        width = in_channels[-1]
        branches = [nn.Sequential(*_conv_bn_relu(width, channels))]
        branches += [nn.Sequential(*_conv_bn_relu(width, channels, 3, r)) for r in rates]
        self.branches = nn.ModuleList([*branches, _ImagePooling(width, channels)])
        self.project = nn.Sequential(
            *_conv_bn_relu(channels * len(self.branches), channels), nn.Dropout(0.5)
        )
        self.neck = nn.Sequential(*_conv_bn_relu(channels, channels, 3))
        self.out = nn.Conv2d(channels, out_channels, 1)
        self.activation = _OutputActivation(positive, min_depth)

    def forward(self, feats: EncoderOutput) -> Tensor:
        x = feats.features[-1]
        x = self.project(torch.cat([branch(x) for branch in self.branches], dim=1))
        return self.activation(self.out(self.neck(x)))


def _linear(config: HeadConfig, in_channels: list[int], class_token: bool, task: Task) -> nn.Module:
    return LinearHead(
        in_channels, task.channels, class_token, task.positive, config.upsample, config.min_depth
    )


def _dpt(config: HeadConfig, in_channels: list[int], class_token: bool, task: Task) -> nn.Module:
    return DPTHead(
        in_channels,
        task.channels,
        class_token,
        task.positive,
        config.dpt_channels,
        config.dpt_features,
        config.min_depth,
        segmentation=task.geometry.label,
    )


def _deeplab(
    config: HeadConfig, in_channels: list[int], class_token: bool, task: Task
) -> nn.Module:
    return DeepLabHead(
        in_channels,
        task.channels,
        task.positive,
        config.aspp_rates,
        config.aspp_channels,
        config.min_depth,
    )


_BUILDERS = {"linear": _linear, "dpt": _dpt, "deeplab": _deeplab}


def build_head(
    config: HeadConfig, in_channels: list[int], class_token: bool, task: Task
) -> nn.Module:
    """One head for one task: ``task.channels`` outputs, positive when ``task.positive``; the DPT
    head of a class-map task (``task.geometry.label``) ends in the segmentation neck."""
    if config.kind not in HEAD_KINDS:
        raise ValueError(f"Head kind must be one of {HEAD_KINDS}, got {config.kind!r}.")
    return _BUILDERS[config.kind](config, in_channels, class_token, task)
