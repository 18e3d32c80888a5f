"""Real subnets (docs/design.md §3): extraction equals the masked supernet, FLOPs, grouping runner."""

import copy
import shutil

import pytest
import torch

from lads.errors import LadsError
from lads.inference import SubnetRunner
from lads.models import Gates, build_model
from lads.models.backbone import FrozenBatchNorm2d
from lads.models.subnet import extract_subnet, random_gates
from lads.models.text import resolve_text_model
from lads.util.flops import count_flops

SIZE = {"tiny": 96, "lads-r50": 64}
ATOL = 1e-5


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT (hidden 32, 2 layers), MiniLM's vocabulary."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert")
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(path)
    shutil.copy(f"{resolve_text_model('minilm-l6')}/vocab.txt", path)
    return str(path)


def randomize_norms(model, seed=0):
    """Non-trivial batch-norm statistics, so that a closed branch's bn3 shift is not 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.visual_backbone.modules():
            if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


_MODELS = {}


@pytest.fixture(scope="module")
def make_model(bert_dir):
    def make(preset="tiny", norm=None, extra=()):
        key = (preset, norm, tuple(extra))
        if key not in _MODELS:
            torch.manual_seed(0)
            overrides = [f"model.text.name={bert_dir}", "model.text.pretrained=false", "model.text.num_layers=2",
                         *extra]
            if norm:
                overrides.append(f"model.visual.norm={norm}")
            model = build_model(preset, overrides)
            randomize_norms(model)
            _MODELS[key] = model.eval()
        return _MODELS[key]

    return make


def inputs(model, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = SIZE["tiny" if model.config.visual.width < 64 else "lads-r50"]
    images = torch.randn(batch, 3, size, size, generator=g)
    pixel_mask = torch.zeros(batch, size, size, dtype=torch.bool)
    pixel_mask[-1, :, size * 3 // 4:] = True  # letterbox padding
    input_ids = torch.randint(1000, 5000, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length - 2:] = 0
    return images, pixel_mask, input_ids, attention_mask


def patterns(layout):
    """All open, all closed, one filter per block, random at several keep rates, a block with
    every filter closed but its layer gate open."""
    ones = Gates(torch.ones(1, layout.num_layer_gates), torch.ones(1, layout.num_filter_gates))
    single = ones.map(torch.zeros_like)
    single.layer.fill_(1)
    for s in layout.filter_slices:
        single.filter[0, s.start + s.stop // 7 % (s.stop - s.start)] = 1
    empty_blocks = random_gates(layout, 0.6, generator=torch.Generator().manual_seed(3))
    empty_blocks.layer.fill_(1)
    for i in (0, 1, 7):  # layer1.0 (projection), layer1.1 (identity), layer3.0 (projection)
        empty_blocks.filter[0, layout.filter_slices[i]] = 0
    yield "open", ones
    yield "closed", ones.map(torch.zeros_like)
    yield "single-filter", single
    yield "empty-blocks", empty_blocks
    for keep in (0.25, 0.5, 0.75):
        yield f"keep{keep}", random_gates(layout, keep, generator=torch.Generator().manual_seed(int(keep * 100)))


def check_structure(model, subnet, gates):
    """What is absent from the subnet: closed bottlenecks, closed sublayers, closed filters."""
    layer_gates, filter_gates, fusion_gates = model.layout.split(gates)
    names = [n for (n, _), g in zip(model.visual_backbone.blocks(), layer_gates) if g is None or g[0] == 1]
    assert subnet.block_names == names
    assert len(subnet.blocks) == 4 + int(gates.layer[0, : 12].sum())
    open_filters = [int(f.sum()) for f, (n, _) in zip(filter_gates, model.visual_backbone.blocks()) if n in names]
    assert [b.filters for b in subnet.blocks] == open_filters
    for block, n in zip(subnet.blocks, open_filters):
        convs = list(block.branch or [])
        assert [c.out_channels for c in convs[1:2]] + [c.in_channels for c in convs[2:]] == ([n, n] if n else [])
    assert len(subnet.sublayers) == int(sum(g[0] for g in fusion_gates))
    assert sum(1 for _ in subnet.modules() if isinstance(_, torch.nn.MultiheadAttention)) == sum(
        1 for name in subnet.sublayer_names if name.endswith("attn")
    )


TOKEN_HEAD = ("model.loss.token=1", "model.loss.token_box=1", "model.head=token")
PAPER_HEAD = ("model.loss.token=0", "model.loss.token_box=0", "model.head=cls")
CASES = [("tiny", "batch", PAPER_HEAD), ("tiny", "frozen", PAPER_HEAD), ("tiny", "batch", TOKEN_HEAD),
         ("lads-r50", "frozen", ()), ("lads-r50", "batch", ())]


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn", "folded"])
@pytest.mark.parametrize("preset,norm,extra", CASES, ids=["tiny-batch", "tiny-frozen", "tiny-token-head",
                                                          "r50-frozen", "r50-batch"])
def test_subnet_equals_masked_supernet(make_model, preset, norm, extra, fold_bn):
    """Every head's boxes (the paper's, and the token head's where the model has one)."""
    model = make_model(preset, norm, extra)
    images, pixel_mask, input_ids, attention_mask = inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        text, text_mask = model.encode_text(input_ids, attention_mask)
        dense = model.ground(images, pixel_mask, text, text_mask, None)
        for name, gates in patterns(model.layout):
            masked = model.ground(images, pixel_mask, text, text_mask, gates.map(lambda g: g.expand(2, -1)))
            subnet = model.extract_subnet(gates, fold_bn=fold_bn)
            check_structure(model, subnet, gates)
            out = subnet(images, pixel_mask, text, text_mask)
            assert set(out["heads"]) == ({"cls", "token"} if extra == TOKEN_HEAD else {"cls"})
            torch.testing.assert_close(out["heads"], masked["heads"], atol=ATOL, rtol=0, msg=f"pattern {name}")
            torch.testing.assert_close(out["boxes"], masked["boxes"], atol=ATOL, rtol=0)
            if name != "open":  # the comparison is informative: the gates change the boxes
                assert (masked["boxes"] - dense["boxes"]).abs().max() > 1e-4, name
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"extraction changed the supernet's {k}"


def test_folded_subnet_has_no_norms(make_model):
    model = make_model("tiny")
    gates = random_gates(model.layout, 0.5, generator=torch.Generator().manual_seed(0))
    folded = extract_subnet(model, gates, fold_bn=True)
    convs = [folded.stem, *(c for b in folded.blocks for c in (*(b.branch or ()), b.downsample) if c is not None)]
    assert convs and all(c.norm is None and c.bias is not None for c in convs)
    with pytest.raises(LadsError, match="inference only"):
        folded.train()
    with pytest.raises(LadsError, match="shares its supernet's weights"):
        folded.to(torch.float64)


@pytest.mark.parametrize("preset,extra", [("tiny", PAPER_HEAD), ("tiny", TOKEN_HEAD), ("lads-r50", ())],
                         ids=["tiny", "tiny-token-head", "r50"])
def test_flops_measured_equal_analytic_and_fall_with_keep_rate(make_model, preset, extra):
    model = make_model(preset, extra=extra)
    images, pixel_mask, input_ids, attention_mask = inputs(model)
    b, _, h, w = images.shape
    with torch.no_grad():
        text, text_mask = model.encode_text(input_ids, attention_mask)
    args = (images, pixel_mask, text, text_mask)

    def flops(gates):
        subnet = extract_subnet(model, gates)
        measured = count_flops(subnet, *args)
        assert measured == subnet.analytic_flops(b, h, w, text.shape[1])["total"]
        return measured

    all_open = flops(Gates(torch.ones(1, model.layout.num_layer_gates), torch.ones(1, model.layout.num_filter_gates)))
    assert all_open == count_flops(model.ground, *args, None)  # the all-open subnet is the dense network
    counts = [flops(random_gates(model.layout, keep, generator=torch.Generator().manual_seed(1)))
              for keep in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
    assert counts[-1] == all_open


def test_runner_groups_caches_and_matches_masked(make_model):
    model = make_model("tiny", extra=("model.gating.bias_init=0.0",))
    images, pixel_mask, input_ids, attention_mask = inputs(model, batch=6, seed=1)
    input_ids[3] = input_ids[0]  # rows 0 and 3: the same expression (on different images)
    attention_mask[3] = attention_mask[0]
    runner = SubnetRunner(model)
    out = runner(images, pixel_mask, input_ids, attention_mask, mode="subnet")
    gates = out["gates"]
    assert len({bytes(torch.cat((gates.layer[i], gates.filter[i])).bool().numpy()) for i in range(6)}) == 5
    assert sorted(map(sorted, out["groups"])) == [[0, 3], [1], [2], [4], [5]]
    assert out["cache"] == {"hits": 0, "misses": 5}
    assert out["times"]["extract"] > 0 and out["times"]["forward"] > 0

    masked = runner(images, pixel_mask, input_ids, attention_mask, mode="masked")
    torch.testing.assert_close(out["boxes"], masked["boxes"], atol=ATOL, rtol=0)
    with torch.no_grad():
        text, text_mask = model.encode_text(input_ids, attention_mask)
        for i in range(6):
            one = extract_subnet(model, gates.map(lambda g: g[i]))(images[i:i + 1], pixel_mask[i:i + 1],
                                                                   text[i:i + 1], text_mask[i:i + 1])
            torch.testing.assert_close(out["boxes"][i:i + 1], one["boxes"], atol=ATOL, rtol=0)

    again = runner(images[:4], pixel_mask[:4], input_ids[:4], attention_mask[:4])
    assert again["cache"] == {"hits": 3, "misses": 0} and again["times"]["extract"] < out["times"]["extract"]
    torch.testing.assert_close(again["boxes"], out["boxes"][:4], atol=ATOL, rtol=0)

    dense = runner(images, pixel_mask, input_ids, attention_mask, mode="dense")
    assert bool(dense["gates"].filter.all()) and not torch.allclose(dense["boxes"], out["boxes"])

    nchw = SubnetRunner(model, fold_bn=False, channels_last=False)(images, pixel_mask, input_ids, attention_mask)
    torch.testing.assert_close(nchw["boxes"], out["boxes"], atol=ATOL, rtol=0)


def test_bad_gates_and_modes_refused(make_model):
    model = make_model("tiny")
    n_layer, n_filter = model.layout.num_layer_gates, model.layout.num_filter_gates
    with pytest.raises(LadsError, match=rf"gates.layer: expected shape \(1, {n_layer}\)"):
        extract_subnet(model, Gates(torch.ones(1, 23), torch.ones(1, n_filter)))
    with pytest.raises(LadsError, match="gates.filter: expected shape"):
        extract_subnet(model, Gates(torch.ones(1, n_layer), torch.ones(2, n_filter)))
    with pytest.raises(LadsError, match="must be 0 or 1"):
        extract_subnet(model, Gates(torch.ones(1, n_layer), torch.full((1, n_filter), 0.5)))
    with pytest.raises(LadsError, match="expected a Gates"):
        extract_subnet(model, torch.ones(1, n_layer))
    runner = SubnetRunner(model)
    with pytest.raises(LadsError, match="mode must be one of"):
        runner(*inputs(model), mode="fast")
    model.train()
    try:
        with pytest.raises(LadsError, match="training mode"):
            extract_subnet(model, Gates(torch.ones(1, n_layer), torch.ones(1, n_filter)))
    finally:
        model.eval()


def test_block_with_every_filter_closed_runs(make_model):
    """Projection block: relu(downsample(x) + bn3 shift); identity block: relu(x + bn3 shift)."""
    model = make_model("lads-r50", "frozen")
    images, pixel_mask, input_ids, attention_mask = inputs(model, batch=1)
    layout = model.layout
    gates = Gates(torch.ones(1, layout.num_layer_gates), torch.ones(1, layout.num_filter_gates))
    for i in (0, 1, 3):  # layer1.0, layer1.1, layer2.0
        gates.filter[0, layout.filter_slices[i]] = 0
    subnet = extract_subnet(model, gates)
    assert [b.branch is None for b in subnet.blocks[:4]] == [True, True, False, True]
    with torch.no_grad():
        text, text_mask = model.encode_text(input_ids, attention_mask)
        torch.testing.assert_close(
            subnet(images, pixel_mask, text, text_mask)["heads"],
            model.ground(images, pixel_mask, text, text_mask, gates)["heads"], atol=ATOL, rtol=0,
        )
        x = torch.rand(1, 256, 8, 8)
        block = model.visual_backbone.layer1[1]
        torch.testing.assert_close(subnet.blocks[1](x), torch.relu(x + block.bn3.scale_shift()[1][None, :, None, None]))


def test_subnet_shares_what_it_does_not_prune_and_sees_weight_changes(make_model):
    """Unpruned bottlenecks and open fusion sublayers are the supernet's own tensors and modules
    (only sliced tensors are new), so an in-place change of a supernet weight reaches them."""
    model = copy.deepcopy(make_model("tiny"))
    layout = model.layout
    gates = random_gates(layout, 0.6, generator=torch.Generator().manual_seed(5))
    gates.layer.fill_(1)
    gates.filter[0, layout.filter_slices[1]] = 1  # layer1.1 keeps every filter
    subnet = extract_subnet(model, gates)
    block = model.visual_backbone.layer1[1]
    kept = subnet.blocks[subnet.block_names.index("layer1.1")]
    assert all(c.weight is conv.weight for c, conv in zip(kept.branch, (block.conv1, block.conv2, block.conv3)))
    pruned = subnet.blocks[subnet.block_names.index("layer1.2")]
    assert pruned.branch[0].weight is model.visual_backbone.layer1[2].conv1.weight  # conv1 is never sliced
    assert pruned.branch[1].weight.data_ptr() != model.visual_backbone.layer1[2].conv2.weight.data_ptr()
    layer = model.fusion.layers[0]
    attn = subnet.sublayers[subnet.sublayer_names.index("fusion.0.attn")]
    assert attn.self_attn is layer.self_attn and attn.norm1 is layer.norm1
    supernet = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    held = {t.data_ptr(): t for b in subnet.blocks for c in b.branch or ()
            for t in (c.weight, c.bias, *(c.norm[:4] if c.norm else ())) if t is not None}
    assert 0 < subnet.new_bytes == sum(t.nbytes for ptr, t in held.items() if ptr not in supernet)
    open_subnet = extract_subnet(model, gates.map(torch.ones_like))
    assert open_subnet.new_bytes == 0

    images, pixel_mask, input_ids, attention_mask = inputs(model)
    with torch.no_grad():
        text, text_mask = model.encode_text(input_ids, attention_mask)
        before = subnet(images, pixel_mask, text, text_mask)["boxes"]
        block.conv2.weight.mul_(1.5)
        layer.linear1.weight.mul_(1.5)
        after = subnet(images, pixel_mask, text, text_mask)["boxes"]
        masked = model.ground(images, pixel_mask, text, text_mask, gates.map(lambda g: g.expand(2, -1)))["boxes"]
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, masked, atol=ATOL, rtol=0)


def test_runner_never_serves_a_stale_subnet(make_model):
    """After ``load_state_dict`` (or any in-place write) the runner extracts again: its boxes are
    those of the new weights, for sliced and folded tensors too."""
    model = copy.deepcopy(make_model("tiny", extra=("model.gating.bias_init=0.0",)))
    args = inputs(model, batch=3, seed=2)
    runner = SubnetRunner(model)
    first = runner(*args)
    assert runner(*args)["cache"]["misses"] == 0
    state = {k: v * 1.1 if v.is_floating_point() and "text_backbone" not in k and "gating" not in k else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    again = runner(*args)
    assert again["cache"]["hits"] == 0 and again["cache"]["misses"] > 0
    masked = runner(*args, mode="masked")
    torch.testing.assert_close(again["boxes"], masked["boxes"], atol=ATOL, rtol=0)
    assert (again["boxes"] - first["boxes"]).abs().max() > 1e-4


OPTIMIZERS = {
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "AdamW for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "SGD fused": lambda ps: torch.optim.SGD(ps, lr=1e-1, fused=True),
    "SGD foreach": lambda ps: torch.optim.SGD(ps, lr=1e-1, foreach=True),
    "SGD for-loop": lambda ps: torch.optim.SGD(ps, lr=1e-1, foreach=False),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_no_stale_subnet_after_any_optimizer_step(make_model, optimizer):
    """Fused optimizers write the weights without incrementing their version counters: the
    runner and a subnet kept from ``extract_subnet`` still see the step (a global step hook) and
    give the boxes of the new weights, those of the masked supernet."""
    model = copy.deepcopy(make_model("tiny", extra=("model.gating.bias_init=0.0",)))
    args = inputs(model, batch=3, seed=4)
    runner = SubnetRunner(model)
    gates = random_gates(model.layout, 0.6, generator=torch.Generator().manual_seed(1))
    kept = extract_subnet(model, gates, fold_bn=True)
    with torch.no_grad():
        text, text_mask = model.encode_text(*args[2:])
    first, kept_first = runner(*args), kept(args[0][:1], args[1][:1], text[:1], text_mask[:1])
    params = [p for n, p in model.named_parameters() if not n.startswith(("text_backbone", "gating"))]
    step = OPTIMIZERS[optimizer](params)
    g = torch.Generator().manual_seed(2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    step.step()
    again = runner(*args)
    assert again["cache"]["hits"] == 0 and again["cache"]["misses"] > 0
    torch.testing.assert_close(again["boxes"], runner(*args, mode="masked")["boxes"], atol=ATOL, rtol=0)
    assert (again["boxes"] - first["boxes"]).abs().max() > 1e-4
    with torch.no_grad():
        kept_again = kept(args[0][:1], args[1][:1], text[:1], text_mask[:1])["boxes"]
        masked = model.ground(args[0][:1], args[1][:1], text[:1], text_mask[:1], gates)["boxes"]
    torch.testing.assert_close(kept_again, masked, atol=ATOL, rtol=0)
    assert (kept_again - kept_first["boxes"]).abs().max() > 1e-4


def test_cache_stays_within_its_byte_bound(make_model):
    model = make_model("tiny", extra=("model.gating.bias_init=0.0",))
    sizes = [extract_subnet(model, random_gates(model.layout, 0.5, generator=torch.Generator().manual_seed(i)),
                            fold_bn=True).new_bytes for i in range(3)]
    bound_mb = 2.5 * max(sizes) / 2**20
    runner = SubnetRunner(model, cache_mb=bound_mb)
    seen = 0
    for seed in range(6):
        out = runner(*inputs(model, batch=4, seed=seed))
        seen += out["cache"]["misses"]
        assert 0 < runner.cached_bytes <= bound_mb * 2**20
    assert len(runner.cache) < seen  # some were evicted
    assert len(SubnetRunner(model, cache_mb=0)(*inputs(model))["groups"]) == 2
    none = SubnetRunner(model, cache_mb=0)
    none(*inputs(model))
    assert not none.cache and none.cached_bytes == 0
    with pytest.raises(LadsError, match="cache_mb"):
        SubnetRunner(model, cache_mb=-1)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_low_precision_subnet_matches_the_masked_supernet(make_model, amp):
    """Under bf16/fp16 autocast, with folded weights stored in that dtype, every pattern's subnet
    gives the boxes and token scores of the masked supernet under the same autocast to 2e-2 of
    the image side (bf16 keeps 8 bits of mantissa); boxes stay float32. The runner does the same."""
    from lads.models.subnet import BackbonePlan
    from lads.util.amp import AMP

    model = make_model("tiny", extra=TOKEN_HEAD)
    images, pixel_mask, input_ids, attention_mask = inputs(model)
    for fold_bn in (False, True):
        plan = BackbonePlan(model.visual_backbone, fold_bn, torch.channels_last, AMP[amp])
        with torch.no_grad(), torch.autocast("cpu", dtype=AMP[amp]):
            text, text_mask = model.encode_text(input_ids, attention_mask)
            for name, gates in patterns(model.layout):
                out = extract_subnet(model, gates, plan=plan)(images, pixel_mask, text, text_mask)
                masked = model.ground(images, pixel_mask, text, text_mask, gates.map(lambda g: g.expand(2, -1)))
                assert out["boxes"].dtype == torch.float32
                for key in ("token_scores", "token_boxes"):  # the argmax over near-equal scores may flip
                    torch.testing.assert_close(out[key].float(), masked[key].float(), atol=2e-2, rtol=0, msg=name)
                torch.testing.assert_close(out["heads"]["cls"], masked["heads"]["cls"], atol=2e-2, rtol=0, msg=name)
    low = SubnetRunner(model, amp=amp)
    sub, masked = (low(images, pixel_mask, input_ids, attention_mask),
                   low(images, pixel_mask, input_ids, attention_mask, mode="masked"))
    assert low._plan.dtype == AMP[amp]
    torch.testing.assert_close(sub["heads"]["cls"], masked["heads"]["cls"], atol=2e-2, rtol=0)
