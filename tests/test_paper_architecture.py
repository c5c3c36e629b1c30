"""The paper-sized model: DINOv2 ViT-B/14 with the SIMO heads, checked by parameter counts and shapes.

The SIMO paper states the sizes (encoder 86.6M, linear head ~0.1M, DPT head ~3.5M) and the
feature layout (blocks 3, 6, 9, 12 with class tokens, inputs padded to the 14-pixel patch). A
wrong block index, a head that forgets the class tokens, or a timm change in the backbone shows up
here without running any training. Weights are random (``pretrained: false``): nothing is
downloaded.
"""

from __future__ import annotations

import pytest
import torch

from lightning_simo.models.encoders import Encoder, EncoderConfig
from lightning_simo.models.heads import DPTHead, HeadConfig, LinearHead, build_head
from lightning_simo.tasks import build_task

PAPER_ENCODER = EncoderConfig(
    name="vit_base_patch14_dinov2.lvd142m",
    pretrained=False,
    indices=[2, 5, 8, 11],
    class_token=True,
    input_scaling="symmetric",
    pad_to_patch=True,
)
WIDTH = 768
LEVELS = 4
HEAD_INPUT = LEVELS * 2 * WIDTH  # each level's patch map concatenated with its class token


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(PAPER_ENCODER).eval()


def test_encoder_is_dinov2_vit_b14(encoder: Encoder) -> None:
    assert round(count(encoder) / 1e6, 1) == 86.6
    assert encoder.num_blocks == 12
    assert encoder.patch_size == 14
    assert encoder.channels == [WIDTH] * LEVELS
    assert encoder.indices == [2, 5, 8, 11]
    assert encoder.use_class_token


@pytest.mark.parametrize(
    ("task_kind", "channels"), [("segmentation", 13), ("depth", 1), ("normals", 3)]
)
def test_nyuv2_linear_head_size(encoder: Encoder, task_kind: str, channels: int) -> None:
    head = build_head(
        HeadConfig(kind="linear", upsample=1),
        encoder.channels,
        encoder.use_class_token,
        build_task(task_kind, num_classes=channels),
    )
    assert isinstance(head, LinearHead)
    assert head.norm.num_features == HEAD_INPUT == 6144
    batch_norm = 2 * HEAD_INPUT  # weight and bias; running statistics are buffers
    conv = HEAD_INPUT * channels + channels
    assert count(head) == batch_norm + conv
    if task_kind == "segmentation":
        assert count(head) == 92_173  # "about 0.1M parameters"


@pytest.mark.parametrize(
    ("task_kind", "channels"),
    [("segmentation", 19), ("segmentation", 10), ("depth", 1), ("normals", 3)],
)
def test_dpt_head_size(encoder: Encoder, task_kind: str, channels: int) -> None:
    task = build_task(task_kind, num_classes=channels)
    head = build_head(HeadConfig(kind="dpt"), encoder.channels, encoder.use_class_token, task)
    assert isinstance(head, DPTHead)
    assert [conv.in_channels for conv in head.project] == [WIDTH] * LEVELS
    assert [conv.out_channels for conv in head.project] == [24, 48, 96, 192]
    assert [conv.out_channels for conv in head.to_features] == [128] * LEVELS
    assert head.out.out_channels == channels
    assert 2.5e6 <= count(head) <= 4.5e6  # "about 3.5M parameters per head"


def test_paper_crop_gives_20_by_27_tokens_per_level(encoder: Encoder) -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 280, 378)  # the NYUv2 training crop, 20 x 27 patches of 14
    with torch.inference_mode():
        out = encoder(image)
        seg = build_head(
            HeadConfig(kind="linear"), encoder.channels, True, build_task("segmentation", 13)
        )
        logits = seg.eval()(out)
    assert out.image_size == (280, 378)
    assert [tuple(f.shape) for f in out.features] == [(1, WIDTH, 20, 27)] * LEVELS
    assert out.class_tokens is not None
    assert [tuple(t.shape) for t in out.class_tokens] == [(1, WIDTH)] * LEVELS
    # class tokens are the first token of each block's output, not a copy of a patch token
    for feats, token in zip(out.features, out.class_tokens, strict=True):
        assert not torch.isclose(feats.flatten(2), token[..., None]).all(dim=1).any()
    # different blocks give different maps (the indices are really four levels)
    assert not torch.allclose(out.features[0], out.features[3])
    assert tuple(logits.shape) == (1, 13, 20, 27)


def test_uneven_size_is_padded_to_the_patch(encoder: Encoder) -> None:
    image = torch.rand(1, 3, 288, 384)  # NYUv2's stored size: pads to 294 x 392
    prepared = encoder.prepare(image)
    assert tuple(prepared.shape[-2:]) == (294, 392)
    # symmetric scaling maps [0, 1] to [-1, 1]; the padding stays exactly zero
    torch.testing.assert_close(prepared[..., :288, :384], image * 2 - 1)
    assert (prepared[..., 288:, :] == 0).all() and (prepared[..., :, 384:] == 0).all()
    with torch.inference_mode():
        out = encoder(image)
    assert [tuple(f.shape) for f in out.features] == [(1, WIDTH, 21, 28)] * LEVELS
    assert out.image_size == (288, 384)
