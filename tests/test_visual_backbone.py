"""The visual backbone against an independent plain ResNet-50 written with torch.nn.functional,
with weights loaded from torchvision-layout and DETR-layout checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lads.errors import LadsError
from lads.models.backbone import VisualBackbone, load_visual_weights

BLOCKS = (3, 4, 6, 3)


def torchvision_state_dict(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights and BN statistics under torchvision's ``resnet50`` keys, fc included."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, cout, cin, k):
        state[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5

    def bn(name, c):
        state[name + ".weight"] = 0.3 + 0.4 * torch.rand(c, generator=g)
        state[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        state[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[name + ".running_var"] = 0.5 + torch.rand(c, generator=g)
        state[name + ".num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for s, n in enumerate(BLOCKS):
        p = width * 2**s
        for i in range(n):
            pre = f"layer{s + 1}.{i}"
            conv(pre + ".conv1", p, inplanes, 1)
            bn(pre + ".bn1", p)
            conv(pre + ".conv2", p, p, 3)
            bn(pre + ".bn2", p)
            conv(pre + ".conv3", 4 * p, p, 1)
            bn(pre + ".bn3", 4 * p)
            if i == 0:
                conv(pre + ".downsample.0", 4 * p, inplanes, 1)
                bn(pre + ".downsample.1", 4 * p)
            inplanes = 4 * p
    state["fc.weight"] = torch.randn(1000, inplanes, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


def reference_resnet50(state, x, dilate_layer4: bool = False):
    """Plain ResNet-50 v1.5 (stride on conv2) up to C5, inference-form batch norm. With
    ``dilate_layer4``, torchvision's ``replace_stride_with_dilation=[False, False, True]``:
    layer4 keeps stride 1, its first block keeps dilation 1, the others use dilation 2."""

    def bn(h, name):
        return F.batch_norm(h, state[name + ".running_mean"], state[name + ".running_var"],
                            state[name + ".weight"], state[name + ".bias"], training=False, eps=1e-5)

    h = F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1"))
    h = F.max_pool2d(h, 3, stride=2, padding=1)
    for s, n in enumerate(BLOCKS):
        for i in range(n):
            pre = f"layer{s + 1}.{i}"
            stride = 2 if (i == 0 and s > 0 and not (dilate_layer4 and s == 3)) else 1
            dilation = 2 if (dilate_layer4 and s == 3 and i > 0) else 1
            out = F.relu(bn(F.conv2d(h, state[pre + ".conv1.weight"]), pre + ".bn1"))
            out = F.conv2d(out, state[pre + ".conv2.weight"], stride=stride, padding=dilation, dilation=dilation)
            out = F.relu(bn(out, pre + ".bn2"))
            out = bn(F.conv2d(out, state[pre + ".conv3.weight"]), pre + ".bn3")
            if i == 0:
                h = bn(F.conv2d(h, state[pre + ".downsample.0.weight"], stride=stride), pre + ".downsample.1")
            h = F.relu(out + h)
    return h


@pytest.mark.parametrize(
    "width, norm, dilation, size",
    [(64, "frozen", False, 64), (16, "frozen", False, 96), (16, "batch", False, 64), (16, "batch", True, 64)],
)
def test_loaded_backbone_equals_plain_resnet50(tmp_path, width, norm, dilation, size):
    """All gates open, torchvision-layout weights: the same C5 as the functional reference."""
    state = torchvision_state_dict(width)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    backbone = VisualBackbone(width, norm, dilation).eval()
    load_visual_weights(backbone, str(path))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = backbone(x)
        want = reference_resnet50(state, x, dilate_layer4=dilation)
    stride = 16 if dilation else 32
    assert got.shape == (2, 32 * width, size // stride, size // stride)
    scale = want.abs().max()
    assert scale > 0
    torch.testing.assert_close(got / scale, want / scale, rtol=1e-4, atol=1e-5)


def test_folded_frozen_norm_trains_like_conv_then_norm(tmp_path):
    """Frozen batch norm is folded into the convolutions in training too: in float64, the same C5
    and the same gradient for the input and for every convolution weight as the reference's
    convolution followed by batch norm."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in torchvision_state_dict(16).items()}
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    backbone = VisualBackbone(16, "frozen", dilation=True, frozen_stages=0).double()
    load_visual_weights(backbone, str(path))
    backbone.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    weights = {k: v.requires_grad_(True) for k, v in state.items() if k.endswith("weight") and v.dim() == 4}
    upstream = torch.randn(2, 512, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = backbone(x)
    want = reference_resnet50(state, x_ref, dilate_layer4=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    params = dict(backbone.named_parameters())
    assert set(params) == set(weights)  # the convolutions train; frozen batch norm has no parameters
    for name, w in weights.items():
        torch.testing.assert_close(params[name].grad, w.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_detr_checkpoint_loads(tmp_path):
    """``{"model": {"backbone.0.body.<key>": ...}}`` (plus DETR's other weights) loads the body."""
    state = torchvision_state_dict(16, seed=2)
    body = {f"backbone.0.body.{k}": v for k, v in state.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    body["transformer.encoder.layers.0.linear1.weight"] = torch.zeros(4, 4)
    body["class_embed.weight"] = torch.zeros(92, 256)
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": body, "args": {"lr": 1e-4}}, path)
    backbone = VisualBackbone(16, "frozen")
    load_visual_weights(backbone, str(path))
    own = backbone.state_dict()
    for key in ("conv1.weight", "layer3.5.bn2.running_var", "layer4.0.downsample.0.weight"):
        assert torch.equal(own[key], state[key])


def test_pretrained_config_key_loads_weights(tmp_path, make_tiny):
    """``model.visual.pretrained=<file>`` loads the weights at build time."""
    state = torchvision_state_dict(16, seed=3)
    path = tmp_path / "r50-w16.pth"
    torch.save(state, path)
    model = make_tiny(f"model.visual.pretrained={path}")
    loaded = model.visual_backbone.state_dict()
    assert torch.equal(loaded["layer2.1.conv2.weight"], state["layer2.1.conv2.weight"])
    assert torch.equal(loaded["layer4.2.bn3.running_mean"], state["layer4.2.bn3.running_mean"])


def test_missing_and_unexpected_keys_are_refused_by_name(tmp_path):
    backbone = VisualBackbone(16, "frozen")
    state = torchvision_state_dict(16)
    del state["layer3.2.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(LadsError,
                       match=r"missing keys: layer3\.2\.conv2\.weight.*unexpected keys: layer5\.0\.conv1\.weight"):
        load_visual_weights(backbone, str(path))


def test_wrong_width_and_missing_file_are_refused(tmp_path):
    path = tmp_path / "w64.pth"
    torch.save(torchvision_state_dict(32), path)
    with pytest.raises(LadsError, match=r"shapes differ.*conv1\.weight"):
        load_visual_weights(VisualBackbone(16, "frozen"), str(path))
    with pytest.raises(LadsError, match="no file"):
        load_visual_weights(VisualBackbone(16, "frozen"), str(tmp_path / "absent.pth"))


def test_frozen_stages(tmp_path):
    """Default: stem and layer1 frozen, layer2 on trainable; frozen batch norm has no parameters."""
    backbone = VisualBackbone(16, "frozen", frozen_stages=1)
    trainable = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert not any("bn" in n for n, _ in backbone.named_parameters())
