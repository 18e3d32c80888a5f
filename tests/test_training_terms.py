"""Training beyond the paper (docs/design.md §5a): the token head, the weight-0 guarantee, the
frozen text cache, bf16 autocast, evaluation during training, step budgets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import engine_overrides, make_batch
from safetensors.torch import load_file

from lads.config import load_config
from lads.errors import LadsError
from lads.models.heads import TokenHead
from lads.models.losses import gate_mutual_information, giou_loss, l1_loss

AUX = ("model.loss.token=1", "model.loss.token_box=1", "model.loss.deep=1", "model.head=token")


def test_weight_zero_gives_eq9_and_its_gradients_exactly(make_tiny):
    """A model built with every training-only term, then trained with their weights at 0: the
    loss is Eq. 9 computed by hand from the same outputs and every gradient equals Eq. 9's; the
    token head gets none."""
    model = make_tiny(*AUX).train()
    for name in ("token", "token_box", "deep", "flops"):
        setattr(model.config.loss, name, 0.0)
    batch = make_batch(batch=3)
    target = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.1, 0.2], [0.5, 0.5, 0.4, 0.4]])

    def gradients(loss_fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = model(*batch)
        loss = loss_fn(out)
        loss.backward()
        return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    def eq9(out):
        pred = out["heads"]["cls"]
        return l1_loss(pred, target) + giou_loss(pred, target) - 0.1 * gate_mutual_information(out["soft"])

    loss_a, grads_a = gradients(lambda out: model.loss(out, target)["loss"])
    loss_b, grads_b = gradients(eq9)
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        if name.startswith("token_head."):
            assert g is None, name
        elif g is None:
            assert grads_b[name] is None, name
        else:
            assert torch.equal(g, grads_b[name]), name
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads_a.items() if n.startswith("fusion."))


def test_token_head_reads_the_box_of_its_best_cell():
    """Hand-set weights: the score is the first feature, the box offsets σ(t) are fixed; the box
    is read at the best-scoring cell of a 2 × 3 grid, padded cells never win."""
    head = TokenHead(4)
    with torch.no_grad():
        head.score.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        head.score.bias.zero_()
        for layer in head.box.layers:
            layer.weight.zero_()
        head.box.layers[-1].bias.copy_(torch.logit(torch.tensor([0.25, 0.75, 0.1, 0.2])))
    tokens = torch.zeros(1, 6, 4)
    tokens[0, :, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 9.0])
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 1, 2] = True  # the last cell (score 9) is padding
    scores, boxes = head(tokens, mask)
    assert scores[0, 5] == float("-inf") and scores.argmax().item() == 4  # row 1, col 1
    torch.testing.assert_close(boxes[0, 4], torch.tensor([(1 + 0.25) / 3, (1 + 0.75) / 2, 0.1, 0.2]))
    torch.testing.assert_close(boxes[0, 2], torch.tensor([(2 + 0.25) / 3, (0 + 0.75) / 2, 0.1, 0.2]))


def test_head_options_are_checked(make_tiny):
    with pytest.raises(LadsError, match="model.head"):
        make_tiny("model.head=anchor")
    with pytest.raises(LadsError, match="model.loss.token_box"):
        make_tiny("model.head=token", "model.loss.token=1", "model.loss.token_box=0")
    with pytest.raises(LadsError, match="model.loss.deep"):
        make_tiny("model.loss.deep=-1")
    with pytest.raises(LadsError, match=r"model.loss.flops_floor \(0.6\) must not exceed model.loss.flops_target"):
        make_tiny("model.loss.flops_target=0.5", "model.loss.flops_floor=0.6")


def test_frozen_text_is_cached_and_equals_the_backbone(make_tiny):
    """Frozen: no parameter trains, dropout stays off in training mode, F_l of each expression is
    the unfrozen backbone's (to float rounding) and is computed once."""
    model = make_tiny("model.text.frozen=true").train()
    text = model.text_backbone
    assert not text.training and not any(p.requires_grad for p in text.parameters())
    _, _, ids, mask = make_batch(batch=4)
    features, _ = model.encode_text(ids, mask)
    with torch.no_grad():
        reference = text.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(features[valid], reference[valid], atol=1e-5, rtol=1e-5)
    assert (features[~valid] == 0).all()
    assert len(text.cache) == len({tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)})
    calls = []
    handle = text.bert.register_forward_hook(lambda *a: calls.append(1))
    again, _ = model.encode_text(ids[[2, 0]], mask[[2, 0]])  # a new batch of cached expressions
    handle.remove()
    assert not calls and torch.equal(again, features[[2, 0], : again.shape[1]])


def test_unknown_amp_is_refused(tmp_path, tiny_text_dir, synth_data):
    from lads.engine import train

    cfg = load_config("tiny", engine_overrides(tiny_text_dir, synth_data, tmp_path) + ["train.amp=fp8"])
    with pytest.raises(LadsError, match="train.amp"):
        train(cfg)


def test_auto_amp_takes_bf16_only_where_the_cpu_has_it(monkeypatch):
    """``train.amp=auto``: bf16 on a CPU with AVX512-BF16 or AMX, float32 on one without; the
    other values pass through and an unknown one is refused, naming the key."""
    from lads.util.amp import resolve_amp

    cpu = torch.device("cpu")
    for bf16, amx, expected in [(False, False, "none"), (True, False, "bf16"), (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_amp("auto", cpu) == expected
    assert [resolve_amp(a, cpu) for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]
    with pytest.raises(LadsError, match="train.amp must be one of none, bf16, fp16 or auto"):
        resolve_amp("fp8", cpu)


def test_fp16_trains_with_loss_scaling_and_resumes_it(tmp_path, tiny_text_dir, synth_data):
    """``train.amp=fp16`` (autocast, CPU here) scales the loss: the losses are finite, the weights
    move, and the scaler's state is in the checkpoint and restored on resume."""
    from lads.engine import train
    from lads.util.checkpoint import load_training_state

    common = engine_overrides(tiny_text_dir, synth_data, tmp_path / "fp16") + [
        "train.batch_size=4", "train.micro_batch=4", "train.amp=fp16", "model.text.frozen=true"]
    first = train(load_config("tiny", common + ["train.epochs=1"]))
    state = load_training_state(first)
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
    steps = [json.loads(line) for line in (tmp_path / "fp16" / "log.jsonl").read_text().splitlines()]
    assert steps and all(math.isfinite(r["loss"]) for r in steps if "loss" in r)
    before = load_file(str(first / "model.safetensors"))
    second = train(load_config("tiny", common + ["train.epochs=2"]), resume=str(first))
    after = load_file(str(second / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert load_training_state(second)["scaler"]["scale"] > 0


@pytest.mark.slow
def test_eval_during_training_counts_every_val_expression_and_keeps_the_trajectory(tmp_path, tiny_text_dir,
                                                                                     synth_data):
    """With ``train.eval_every`` the log holds val Prec@0.5 over every val expression (once each)
    and the weights after N steps are those of the same run without it; bf16 autocast on CPU
    trains to a finite loss."""
    from lads.datasets import load_records
    from lads.engine import train

    common = engine_overrides(tiny_text_dir, synth_data, tmp_path) + [
        "train.epochs=3", "train.batch_size=4", "train.micro_batch=4", *AUX, "model.text.frozen=true"]
    runs = {}
    for name, extra in {"plain": [], "eval": ["train.eval_every=0.5"]}.items():
        cfg = load_config("tiny", common + [f"train.out={tmp_path / name}", *extra])
        runs[name] = train(cfg)
    a, b = (load_file(str(runs[n] / "model.safetensors")) for n in ("plain", "eval"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (tmp_path / "eval" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val/prec@0.5" in r]
    val_count = len(load_records(synth_data, "val")[0])
    assert len(evals) >= 6 and all(r["val/expressions"] == val_count for r in evals)
    assert {"val/prec@0.5_cls", "val/prec@0.5_token"} <= set(evals[-1])
    assert not any("val/prec@0.5" in r for r in
                   (json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()))

    cfg = load_config("tiny", common + [f"train.out={tmp_path / 'bf16'}", "train.amp=bf16", "train.epochs=1"])
    train(cfg)
    steps = [json.loads(line) for line in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in steps if "loss" in r)


def test_max_steps_ends_the_run_and_places_the_lr_drop(tmp_path, tiny_text_dir, synth_data):
    """``train.max_steps`` ends training after that many steps (epochs and a time budget left)
    and ``train.lr_drop_fraction`` then drops the learning rates at that fraction of the steps."""
    from lads.engine import train

    cfg = load_config("tiny", engine_overrides(tiny_text_dir, synth_data, tmp_path) + [
        "train.epochs=100", "train.batch_size=4", "train.micro_batch=4", "train.max_steps=6",
        "train.lr_drop_fraction=0.5", "train.max_minutes=60", "model.text.frozen=true"])
    checkpoint = train(cfg)
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert (meta["step"], meta["total_steps"], meta["reason"]) == (6, 6, "finished")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # the logged rate is the next step's: steps 0-2 at 1e-3, steps 3-5 at 1e-4
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in log] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4])
    with pytest.raises(LadsError, match="train.max_steps must be at least 1, got 0"):
        train(load_config("tiny",
                          engine_overrides(tiny_text_dir, synth_data, tmp_path / "zero") + ["train.max_steps=0"]))


def test_expected_flops_of_hard_gates_equal_the_extracted_subnets(make_tiny):
    """``loss.flops`` counts FLOPs as the extracted subnets do: for hard gates (no bottleneck with
    every filter closed) the fraction equals ``Subnet.analytic_flops`` over the all-open one."""
    from lads.models import Gates
    from lads.models.losses import expected_flops
    from lads.models.subnet import extract_subnet, random_gates

    model = make_tiny(*AUX).eval()
    size, tokens = model.config.image_size, 10
    dense = extract_subnet(model, Gates(torch.ones(1, model.layout.num_layer_gates),
                                        torch.ones(1, model.layout.num_filter_gates)))
    for keep in (0.3, 0.6, 1.0):
        gates = random_gates(model.layout, keep, batch=3, generator=torch.Generator().manual_seed(int(keep * 10)))
        for s in model.layout.filter_slices:  # keep one filter per bottleneck open
            gates.filter[:, s.start] = 1
        got = expected_flops(gates, model.layout, model.gate_costs())
        for i in range(3):
            subnet = extract_subnet(model, gates.map(lambda g: g[i]))
            want = (subnet.analytic_flops(1, size, size, tokens)["total"]
                    / dense.analytic_flops(1, size, size, tokens)["total"])
            assert got[i].item() == pytest.approx(want, rel=1e-6)  # float32


def test_flops_term_by_hand(make_tiny):
    """loss gains ``flops · (relu(F − flops_target) + relu(flops_floor − F))``, F the mean
    fraction; between the floor and the target, nothing."""
    model = make_tiny("model.loss.flops=0").train()
    batch = make_batch(batch=2)
    target = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.1, 0.2]])
    torch.manual_seed(0)
    out = model(*batch)
    fraction = out["flops"].mean().item()
    assert fraction == 1.0  # the evaluation's gates 1[r ≥ 0] start all open (bias +3)
    with torch.no_grad():
        model.gating.b2.fill_(-1.0)  # close every layer gate: the FLOPs fall, exactly as counted
        closed = model(*batch)["flops"]
    assert closed.max().item() < 0.7
    base = model.loss(out, target)["loss"].item()
    for w, goal in ((2.0, 0.4), (2.0, 0.7), (2.0, 1.0)):
        model.config.loss.flops, model.config.loss.flops_target = w, goal
        got = model.loss(out, target)["loss"].item()
        assert got == pytest.approx(base + w * max(0.0, fraction - goal), rel=1e-6)
    model.config.loss.flops, model.config.loss.flops_target = 2.0, 1.0
    closed_out = {**out, "flops": closed}  # the same heads: only the FLOPs term differs
    for floor in (0.0, 0.9, 1.0):
        model.config.loss.flops_floor = floor
        got = model.loss(closed_out, target)["loss"].item()
        assert got == pytest.approx(base + 2.0 * max(0.0, floor - closed.mean().item()), rel=1e-6)


def test_optimizer_groups_take_their_learning_rates(make_tiny):
    """Every trainable parameter is in exactly one AdamW group: ``lr_backbone`` for the text
    backbone, ``lr_visual`` for the visual one, ``lr_gating`` for the gating network (``lr``
    when unset), ``lr`` for the rest."""
    from lads.config import TrainConfig
    from lads.engine import build_optimizer

    model = make_tiny("model.text.frozen=false")
    part = {id(p): name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    for lr_gating, gating_lr in ((None, 5e-4), (5e-3, 5e-3)):
        cfg = TrainConfig(lr=5e-4, lr_backbone=2e-5, lr_visual=1e-4, lr_gating=lr_gating)
        seen = {}
        for group in build_optimizer(model, cfg).param_groups:
            for p in group["params"]:
                assert id(p) not in seen
                seen[id(p)] = group["lr"]
        assert seen.keys() == part.keys()
        want = {"text_backbone": 2e-5, "visual_backbone": 1e-4, "gating": gating_lr}
        for key, lr in seen.items():
            assert lr == want.get(part[key], 5e-4), part[key]


def test_resuming_an_optimizer_state_of_other_groups_is_refused(tmp_path, tiny_text_dir, synth_data):
    """A checkpoint whose optimizer has other parameter groups than this version builds (one
    written before the gating network had its own) is refused with a message that names it."""
    from lads.engine import train

    cfg = load_config("tiny", engine_overrides(tiny_text_dir, synth_data, tmp_path) + [
        "train.batch_size=4", "train.micro_batch=4", "train.max_steps=1", "model.text.frozen=true"])
    checkpoint = train(cfg)
    state_file = checkpoint / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    gating = state["optimizer"]["param_groups"].pop()  # the last group: the gating network's
    state["optimizer"]["param_groups"][0]["params"] += gating["params"]  # as one "rest" group had it
    torch.save(state, state_file)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"]["training_state.pt"] = state_file.stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    cfg.train.max_steps = 2
    with pytest.raises(LadsError, match=r"optimizer state has 2 parameter groups where this version trains 3"):
        train(cfg, resume=str(checkpoint))
