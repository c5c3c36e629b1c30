import pytest
import torch

from lightning_simo.models.adapters import BlockAdapter
from lightning_simo.models.encoders import Encoder, EncoderConfig
from lightning_simo.models.heads import DeepLabHead, DPTHead, HeadConfig, LinearHead
from lightning_simo.models.simo import SIMONet
from lightning_simo.tasks import build_tasks


def test_vit_encoder_levels_tokens_and_padding(tiny_vit):
    enc = Encoder(tiny_vit)
    out = enc(torch.rand(2, 3, 30, 37))  # not a multiple of the patch size: padded to 32 x 40
    assert out.image_size == (30, 37)
    assert [f.shape for f in out.features] == [torch.Size([2, 32, 4, 5])] * 4
    assert out.class_tokens is not None and out.class_tokens[0].shape == (2, 32)
    assert enc.channels == [32] * 4 and enc.patch_size == 8


def test_encoder_input_scaling_is_applied(tiny_vit):
    enc = Encoder({**tiny_vit, "input_scaling": "symmetric"})
    x = torch.full((1, 3, 32, 40), 0.5)
    assert torch.allclose(enc.prepare(x), torch.zeros_like(x))
    enc_in = Encoder({**tiny_vit, "input_scaling": "imagenet"})
    y = enc_in.prepare(torch.zeros(1, 3, 32, 40))
    assert torch.allclose(y[0, 0, 0, 0], torch.tensor(-0.485 / 0.229))


def test_cnn_encoder_has_no_tokens_and_multi_scale_levels():
    enc = Encoder(EncoderConfig(name="test_resnet", indices=[0, 1, 2, 3], class_token=True))
    out = enc(torch.rand(1, 3, 64, 64))
    assert out.class_tokens is None and not enc.use_class_token
    assert [f.shape[1] for f in out.features] == enc.channels
    assert out.features[0].shape[-1] > out.features[-1].shape[-1]


def test_unknown_timm_model_and_bad_index_are_clear_errors(tiny_vit):
    with pytest.raises(ValueError, match="Unknown timm model 'no_such_net'"):
        Encoder(EncoderConfig(name="no_such_net"))
    with pytest.raises(ValueError, match="out of range"):
        Encoder({**tiny_vit, "indices": [7]})


def test_linear_head_shapes_and_positive_depth(tiny_vit):
    enc = Encoder(tiny_vit)
    feats = enc(torch.rand(2, 3, 32, 40))
    head = LinearHead(enc.channels, 1, class_token=True, positive=True, upsample=4)
    out = head(feats)
    assert out.shape == (2, 1, 16, 20)
    assert (out > 0).all()
    n_params = sum(p.numel() for p in head.parameters())
    width = 4 * 32 * 2
    assert n_params == 2 * width + width * 16 + 16  # BN affine + 1x1 conv


def test_dpt_head_output_size(tiny_vit):
    enc = Encoder(tiny_vit)
    feats = enc(torch.rand(2, 3, 32, 40))
    seg = DPTHead(enc.channels, 5, class_token=True, segmentation=True)
    assert seg(feats).shape == (2, 5, 32, 40)  # 4x5 tokens -> 16x20 finest level -> x2
    depth = DPTHead(enc.channels, 1, class_token=True, positive=True)
    out = depth(feats)
    assert out.shape == (2, 1, 64, 80) and (out > 0).all()


def test_simonet_one_pass_all_heads_resized_to_input(tiny_vit):
    tasks = build_tasks(["segmentation", "depth", "normals"], {"segmentation": 6})
    net = SIMONet(tasks, tiny_vit, HeadConfig(upsample=2))
    out = net(torch.rand(2, 3, 30, 37))
    assert out["segmentation"].shape == (2, 6, 30, 37)
    assert out["depth"].shape == (2, 1, 30, 37)
    assert out["normals"].shape == (2, 3, 30, 37)
    assert set(net.state_dict()) >= {"encoder.backbone.cls_token", "heads.depth.out.weight"}


def test_parameters_no_head_reads_are_frozen(tiny_vit):
    vit = Encoder(tiny_vit)
    assert vit.unused_parameters == ["norm.weight", "norm.bias"]
    assert (
        not vit.backbone.norm.weight.requires_grad
        and vit.backbone.blocks[0].norm1.weight.requires_grad
    )
    cnn = Encoder(EncoderConfig(name="test_resnet", indices=[0, 1, 2], class_token=False))
    assert any(n.startswith("layer4.") for n in cnn.unused_parameters)
    out = cnn(torch.rand(1, 3, 64, 64))
    loss = sum(f.sum() for f in out.features)
    loss.backward()
    assert all(p.grad is not None for p in cnn.parameters() if p.requires_grad)


@pytest.mark.parametrize("form", ["lora", "residual"])
def test_adapters_have_the_authors_parameter_count_and_start_as_the_identity(form):
    adapter = BlockAdapter(128, rank=16, form=form)
    # the SIMO authors' adapter: down (128 -> 16) and up (16 -> 128) projections, no biases
    assert {n: tuple(p.shape) for n, p in adapter.named_parameters()} == {
        "down.weight": (16, 128),
        "up.weight": (128, 16),
    }
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 16 * 128 == 4096
    y = torch.randn(2, 128, 3, 4)  # a CNN stage output, channels first
    assert torch.equal(adapter(y), y)
    with torch.no_grad():
        adapter.up.weight.normal_()
    z = y.movedim(1, -1)
    down = z @ adapter.down.weight.T
    correction = (down if form == "lora" else down.relu()) @ adapter.up.weight.T
    expected = z + correction if form == "lora" else z - correction
    torch.testing.assert_close(adapter(y), expected.movedim(-1, 1))


def test_deeplab_head_on_a_dilated_resnet():
    # FusionBench's NYUv2 model in miniature: output stride 8, ASPP on the last stage
    config = {"name": "test_resnet", "model_kwargs": {"output_stride": 8}, "indices": [-1]}
    enc = Encoder(EncoderConfig(**config, class_token=False, input_scaling="none"))
    assert enc.reductions == [8]
    feats = enc(torch.rand(2, 3, 48, 64))
    assert feats.features[-1].shape[-2:] == (6, 8)
    c, w, rates = enc.channels[-1], 16, [1, 2, 3]
    seg = DeepLabHead(enc.channels, 5, rates=rates, channels=w)
    assert seg(feats).shape == (2, 5, 6, 8)
    conv_bn = 2 * w  # every branch conv is bias-free and followed by BN (weight + bias)
    expected = (
        (c * w + conv_bn)  # 1x1 branch
        + len(rates) * (9 * c * w + conv_bn)  # atrous branches
        + (c * w + conv_bn)  # image pooling
        + (5 * w * w + conv_bn)  # projection of the five branches
        + (9 * w * w + conv_bn)  # 3x3 neck
        + (w * 5 + 5)  # the output 1x1 conv, the layer Model Tinting trains
    )
    assert sum(p.numel() for p in seg.parameters()) == expected
    depth = DeepLabHead(enc.channels, 1, positive=True, rates=rates, channels=w).eval()
    assert (depth(feats) > 0).all()
    tasks = build_tasks(["segmentation", "depth"], {"segmentation": 5})
    head = {"kind": "deeplab", "aspp_rates": rates, "aspp_channels": w}
    net = SIMONet(tasks, {**config, "class_token": False}, HeadConfig(**head))
    out = net(torch.rand(2, 3, 48, 64))
    assert out["segmentation"].shape == (2, 5, 48, 64) and out["depth"].shape == (2, 1, 48, 64)
    assert isinstance(net.heads["depth"].out, torch.nn.Conv2d)
