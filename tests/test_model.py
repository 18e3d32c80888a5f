"""The LADS supernet: both presets, parameter counts by hand, gated blocks, forced gates,
and a short optimisation that must drive the loss down."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch

from lads.cli import main as lads_main
from lads.models import Gates, build_model
from lads.models.fusion import attn_block, ffn_block, input_sequence

# ----------------------------------------------------------------------------- hand counts


def resnet50_counts(w: int) -> tuple[int, int]:
    """(conv parameters, batch-norm affine parameters) of ResNet-50 at stem width ``w``."""
    conv, bn = 3 * w * 7 * 7, 2 * w
    inplanes = w
    for stage, blocks in enumerate((3, 4, 6, 3)):
        p = w * 2**stage
        for i in range(blocks):
            conv += inplanes * p + 9 * p * p + p * 4 * p
            bn += 2 * (p + p + 4 * p)
            if i == 0:  # projection shortcut
                conv += inplanes * 4 * p
                bn += 2 * 4 * p
            inplanes = 4 * p
    return conv, bn


def bert_count(h: int, layers: int, inter: int, vocab: int, positions: int = 512, types: int = 2) -> int:
    """BERT without pooler: embeddings + LayerNorm, and per layer attention, FFN, 2 LayerNorms."""
    embeddings = (vocab + positions + types) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
    return embeddings + layers * layer


def fusion_count(c: int, d_l: int, d: int, m: int, ffn: int) -> int:
    layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d)
    return (c * d + d) + (d_l * d + d) + m * layer + 2 * d


def head_count(d: int) -> int:
    return 2 * (d * d + d) + d * 4 + 4


def token_head_count(d: int) -> int:
    """Score (d -> 1) and the 2-layer box MLP (d -> d -> 4)."""
    return (d + 1) + (d * d + d) + (d * 4 + 4)


def gating_count(k: int, d_l: int, d_h: int, n_layer: int, n_filter: int) -> int:
    return k * d_l + k * (d_l * d_h + d_h) + n_layer * (d_h + 1) + n_filter * (d_h + 1)


def test_resnet50_hand_count_matches_torchvision_figure():
    """The formula itself: torchvision's ResNet-50 without fc has 23,508,032 parameters."""
    conv, bn = resnet50_counts(64)
    assert conv + bn == 23_508_032


def parse_info(text: str) -> dict[str, int]:
    rows = re.findall(r"^(\w+)\s+([\d,]+)\s+([\d,]+)$", text, re.M)
    return {name: int(n.replace(",", "")) for name, n, _ in rows}


@pytest.fixture(scope="module")
def paper_overrides():
    return ["model.text.pretrained=false"]  # bert-base-uncased's shapes, no file needed


def test_paper_scale_preset_counts(paper_overrides, capsys):
    """lads-r50 builds; its 24 layer gates, 3,776 filter gates, a 0.45-0.75 M gating network,
    and every component's count (``parameter_counts`` and ``lads info``) equal the hand count."""
    model = build_model("lads-r50", paper_overrides)
    layout = model.layout
    assert (layout.num_layer_gates, layout.num_filter_gates, len(layout.candidates)) == (24, 3776, 28)

    conv, bn = resnet50_counts(64)
    counts = model.parameter_counts()
    # frozen batch norm: its affine terms are buffers, not parameters
    assert counts["visual_backbone"] == conv
    bn_buffers = sum(v.numel() for k, v in model.visual_backbone.state_dict().items()
                     if k.endswith((".weight", ".bias")) and "conv" not in k and "downsample.0" not in k)
    assert counts["visual_backbone"] + bn_buffers == 23_508_032
    expected = {
        "visual_backbone": conv,
        "text_backbone": bert_count(768, 6, 3072, 30522),
        "fusion": fusion_count(2048, 768, 256, 6, 2048),
        "head": head_count(256),
        "gating": gating_count(28, 768, 24, 24, 3776),
    }
    assert counts == expected
    assert 450_000 <= counts["gating"] <= 750_000
    # stem and layer1 frozen (DETR's default): the rest of the backbone trains
    trainable = sum(p.numel() for p in model.visual_backbone.parameters() if p.requires_grad)
    w = 64
    stem_layer1 = 3 * w * 49 + (w * w + 9 * w * w + 4 * w * w + w * 4 * w) + 2 * (4 * w * w + 9 * w * w + 4 * w * w)
    assert trainable == conv - stem_layer1
    del model

    assert lads_main(["info", "--config", "lads-r50", *sum((["--set", o] for o in paper_overrides), [])]) == 0
    out = capsys.readouterr().out
    assert "24 layer gates, 3776 filter gates, 28 candidate layers" in out
    info = parse_info(out)
    assert info == {**expected, "total": sum(expected.values())}


def test_tiny_preset_counts(make_tiny, capsys, tiny_bert_dir):
    """tiny builds; its counts (width 16, batch norm, 4 fusion layers, d_h 32, the token head)
    equal the hand count, in ``parameter_counts`` and in ``lads info``."""
    model = make_tiny()
    conv, bn = resnet50_counts(16)
    expected = {
        "visual_backbone": conv + bn,  # trainable batch norm in the tiny preset
        "text_backbone": bert_count(32, 4, 64, 1000, positions=64),
        "fusion": fusion_count(512, 32, 128, 4, 256),
        "head": head_count(128),
        "gating": gating_count(16 + 8, 32, 32, 12 + 8, 3776 // 4),
        "token_head": token_head_count(128),
    }
    assert model.parameter_counts() == expected
    assert lads_main(["info", "--config", "tiny", "--set", f"model.text.name={tiny_bert_dir}"]) == 0
    assert parse_info(capsys.readouterr().out) == {**expected, "total": sum(expected.values())}


# ----------------------------------------------------------------------------- gated blocks


def test_closed_layer_gate_makes_bottleneck_exact_identity(tiny_model):
    """relu(x + 0 · branch) is x itself, bit for bit; an open gate changes x."""
    block = tiny_model.visual_backbone.layer3[2]
    assert block.has_layer_gate
    x = torch.relu(torch.randn(2, block.conv1.in_channels, 5, 5))
    with torch.no_grad():
        out = block(x, gate_layer=torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], x[0])
    assert not torch.allclose(out[1], x[1])


def test_projection_blocks_have_no_layer_gate(tiny_model):
    """The first block of every stage (projection shortcut, layer1.0 included) always runs."""
    names = [n for n, b in tiny_model.visual_backbone.blocks() if not b.has_layer_gate]
    assert names == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]


def test_closed_fusion_sublayer_is_exact_identity(tiny_model):
    """x + 0 · F(LN(x)) is x; closing one sublayer leaves exactly the other's residual."""
    layer = tiny_model.fusion.layers[1]
    x, pos = torch.randn(2, 9, 128), torch.randn(2, 9, 128)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, -2:] = True
    zero, one = torch.zeros(2), torch.ones(2)
    with torch.no_grad():
        assert torch.equal(layer(x, pos, mask, zero, zero), x)
        assert torch.equal(layer(x, pos, mask, zero, one), x + ffn_block(layer, x))
        after_attn = x + attn_block(layer, x, pos, mask)
        assert torch.equal(layer(x, pos, mask, one, zero), after_attn)
        assert not torch.allclose(layer(x, pos, mask, one, one), x)


def all_open(model, batch: int) -> Gates:
    return Gates(torch.ones(batch, model.layout.num_layer_gates), torch.ones(batch, model.layout.num_filter_gates))


def test_closed_filter_gate_removes_that_filter(make_tiny):
    """With filter j of layer2.1 closed, its conv2 weights and its conv3 input column no longer
    matter; with it open they do."""
    model = make_tiny().eval()
    images, pixel_mask, ids, mask = make_batch()
    names = [n for n, _ in model.visual_backbone.blocks()]
    start = sum(b.conv2.out_channels for _, b in model.visual_backbone.blocks()[: names.index("layer2.1")])
    block, j = model.visual_backbone.layer2[1], 5
    closed = all_open(model, 2)
    closed.filter[:, start + j] = 0

    def boxes(gates):
        with torch.no_grad():
            return model(images, pixel_mask, ids, mask, gates=gates)["boxes"]

    before_closed, before_open = boxes(closed), boxes(all_open(model, 2))
    with torch.no_grad():
        block.conv2.weight[j] += torch.randn_like(block.conv2.weight[j])
        block.conv3.weight[:, j] += torch.randn_like(block.conv3.weight[:, j])
    assert torch.equal(boxes(closed), before_closed)
    assert not torch.allclose(boxes(all_open(model, 2)), before_open)


def masked_reference(model, images, pixel_mask, ids, mask, gates: Gates):
    """The supernet written out with explicit masks, gate bookkeeping done independently:
    layer gates go to the bottlenecks after the first of each stage, then to (attn, ffn) of
    each fusion layer; filter gates are consecutive runs of each bottleneck's width."""
    vb = model.visual_backbone
    x = vb.maxpool(torch.relu(vb.bn1(vb.conv1(images))))
    lg, fg = 0, 0
    for stage in range(1, 5):
        for i, b in enumerate(getattr(vb, f"layer{stage}")):
            h = torch.relu(b.bn1(b.conv1(x)))
            h = torch.relu(b.bn2(b.conv2(h)))
            h = h * gates.filter[:, fg: fg + h.shape[1], None, None]
            fg += h.shape[1]
            h = b.bn3(b.conv3(h))
            if i == 0:
                x = torch.relu(h + b.downsample(x))
            else:
                x = torch.relu(x + gates.layer[:, lg, None, None, None] * h)
                lg += 1
    text, text_mask = model.text_backbone(ids, mask)
    fusion = model.fusion
    vmask = F.interpolate(pixel_mask[:, None].float(), size=x.shape[-2:]).bool()[:, 0]
    t, pos, kpm = input_sequence(fusion, x, vmask, text, text_mask)
    for layer in fusion.layers:
        t = t + gates.layer[:, lg, None, None] * attn_block(layer, t, pos, kpm)
        t = t + gates.layer[:, lg + 1, None, None] * ffn_block(layer, t)
        lg += 2
    assert (lg, fg) == (gates.layer.shape[1], gates.filter.shape[1])
    t = fusion.norm(t)
    heads = {"cls": model.head(t[:, 0])}
    if model.token_head is not None:  # the token head: the box of the best-scoring visual cell
        visual = t[:, text.shape[1]:]
        scores = model.token_head.score(visual)[..., 0].masked_fill(vmask.flatten(1), float("-inf"))
        best = scores.argmax(1)
        l1, l2 = model.token_head.box.layers
        raw = torch.sigmoid(l2(torch.relu(l1(visual[torch.arange(len(best)), best]))))
        w = x.shape[-1]
        col, row = (best % w).float(), (best // w).float()
        heads["token"] = torch.stack([(col + raw[:, 0]) / w, (row + raw[:, 1]) / x.shape[-2], raw[:, 2], raw[:, 3]], 1)
    return heads


def test_forced_gates_match_explicit_masked_computation(tiny_model):
    """``model(..., gates=G)`` equals the explicit masked supernet for random 0/1 gates."""
    images, pixel_mask, ids, mask = make_batch(batch=3)
    g = torch.Generator().manual_seed(3)
    gates = Gates(
        (torch.rand(3, tiny_model.layout.num_layer_gates, generator=g) < 0.6).float(),
        (torch.rand(3, tiny_model.layout.num_filter_gates, generator=g) < 0.6).float(),
    )
    with torch.no_grad():
        got = tiny_model(images, pixel_mask, ids, mask, gates=gates)["heads"]
        want = masked_reference(tiny_model, images, pixel_mask, ids, mask, gates)
        dense = tiny_model(images, pixel_mask, ids, mask, gates=all_open(tiny_model, 3))["heads"]
    assert set(got) == {"cls", "token"}  # tiny has the paper's head and the token head
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got["cls"], dense["cls"])  # the gates did something


def test_eval_gates_reproduce_the_output(tiny_model):
    """In eval, the gating network's own hard gates, forced back in, give the same boxes."""
    images, pixel_mask, ids, mask = make_batch(batch=3, seed=1)
    with torch.no_grad():
        out = tiny_model(images, pixel_mask, ids, mask)
        again = tiny_model(images, pixel_mask, ids, mask, gates=out["gates"])
    assert torch.equal(out["boxes"], again["boxes"])
    assert out["boxes"].shape == (3, 4) and ((out["boxes"] > 0) & (out["boxes"] < 1)).all()


def test_dense_config_equals_all_gates_open(make_tiny, tiny_model):
    """``model.dense=true`` has no gating network and computes the supernet with every gate open."""
    dense = make_tiny("model.dense=true").eval()
    assert dense.gating is None and "gating" not in dense.parameter_counts()
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("gating.")}
    dense.load_state_dict(state, strict=True)
    images, pixel_mask, ids, mask = make_batch(batch=2, seed=2)
    with torch.no_grad():
        got = dense(images, pixel_mask, ids, mask)
        want = tiny_model(images, pixel_mask, ids, mask, gates=all_open(tiny_model, 2))["boxes"]
    assert got["soft"] is None and "mi" not in dense.loss(got, torch.full((2, 4), 0.5))
    torch.testing.assert_close(got["boxes"], want, rtol=0, atol=0)


def test_layer_drop_skips_fusion_sublayers_in_dense_training_only(make_tiny):
    """``model.layer_drop_fusion``: in training, each fusion sublayer of each expression skipped
    with its probability (every bottleneck and filter runs), and the boxes are those of the
    supernet with those gates; in evaluation, and at 0, every layer runs."""
    model = make_tiny("model.dense=true", "model.layer_drop_fusion=0.3")
    torch.manual_seed(0)
    many = model.layer_drop(4000, "cpu")
    fusion = torch.tensor(model.layout.layer_owner) >= model.layout.num_visual
    assert set(many.layer.unique().tolist()) == {0.0, 1.0} and bool((many.filter == 1).all())
    assert abs(many.layer[:, fusion].mean().item() - 0.7) < 0.01
    assert bool((many.layer[:, ~fusion] == 1).all())
    images, pixel_mask, ids, mask = make_batch(batch=3, seed=4)
    model.train()
    with torch.no_grad():
        out = model(images, pixel_mask, ids, mask)
        again = model(images, pixel_mask, ids, mask, gates=out["gates"])["heads"]
    assert out["gates"].layer.shape == (3, model.layout.num_layer_gates) and (out["gates"].layer == 0).any()
    torch.testing.assert_close(out["heads"], again, rtol=0, atol=0)
    assert "mi" not in model.loss(out, torch.full((3, 4), 0.5))  # no gating network, no MI term
    assert model.eval()(images, pixel_mask, ids, mask)["gates"] is None
    assert make_tiny("model.dense=true").train()(images, pixel_mask, ids, mask)["gates"] is None


@pytest.mark.parametrize("overrides, message", [
    (["model.dense=true", "model.layer_drop_fusion=1"], "model.layer_drop_fusion must be a probability"),
    (["model.layer_drop_fusion=0.2"], "model.layer_drop_fusion is for the dense network"),
    (["model.filter_drop=0.1"], "config.model.filter_drop was removed"),
    (["demo.layer_drop_visual=0.2"], "config.demo.layer_drop_visual was removed"),
])
def test_layer_drop_is_checked(make_tiny, overrides, message):
    from lads.errors import LadsError

    with pytest.raises(LadsError, match=message):
        make_tiny(*overrides)


def test_a_saved_config_with_retired_keys_at_their_value_still_loads():
    """Checkpoints keep their whole config: the keys of removed means, at the value they always
    had, are read and dropped."""
    from lads.config import config_from_dict, load_config, to_dict

    saved = to_dict(load_config("tiny"))
    saved["model"].update(layer_drop_visual=0.0, filter_drop=0.0)
    saved["demo"].update(layer_drop_visual=0.0, filter_drop=0.0)
    assert to_dict(config_from_dict(saved)) == to_dict(load_config("tiny"))


# ----------------------------------------------------------------------------- optimisation


def test_a_few_dozen_steps_drive_the_loss_down(make_tiny):
    """60 AdamW steps on a fixed batch of 8: L1 + GIoU (eval, deterministic gates) falls below 40 %."""
    model = make_tiny(seed=0)
    images, pixel_mask, ids, mask = make_batch(batch=8, size=32, seed=7)
    g = torch.Generator().manual_seed(8)
    centre, size = 0.3 + 0.4 * torch.rand(8, 2, generator=g), 0.1 + 0.3 * torch.rand(8, 2, generator=g)
    target = torch.cat((centre, size), 1)

    def box_loss():
        model.eval()
        with torch.no_grad():
            terms = model.loss(model(images, pixel_mask, ids, mask), target)
        model.train()
        return (terms["l1"] + terms["giou"]).item()

    initial = box_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        terms = model.loss(model(images, pixel_mask, ids, mask), target)
        assert torch.isfinite(terms["loss"])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    final = box_loss()
    print(f"L1+GIoU {initial:.3f} -> {final:.3f}")
    assert final < 0.4 * initial, (initial, final)


def test_positions_are_fractions_of_the_padded_square():
    """The same cell has the same embedding whatever the letterbox padding (boxes are fractions
    of the padded square too); values follow DETR's sine formula, written out here in float64."""
    from lads.models.fusion import sine_position_embedding

    h, w, dim = 4, 6, 8
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[1, 3:] = True  # a wide image: the last row is padding
    masks[1, :, 5:] = True
    pos = sine_position_embedding(masks, dim)
    assert pos.shape == (2, h * w, dim)
    torch.testing.assert_close(pos[0], pos[1])
    i, j = 2, 3  # row, column
    y, x = 2 * math.pi * (i + 1) / h, 2 * math.pi * (j + 1) / w
    freq = [10000 ** (2 * (k // 2) / (dim // 2)) for k in range(dim // 2)]
    half = lambda v: [math.sin(v / freq[k]) if k % 2 == 0 else math.cos(v / freq[k]) for k in range(dim // 2)]  # noqa: E731
    expected = torch.tensor(half(y) + half(x), dtype=torch.float64)
    torch.testing.assert_close(pos[0, i * w + j].double(), expected, atol=1e-6, rtol=0)

