"""Binary gates (Eqs. 4-5) and the gating network (Eqs. 1-3)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch

from lads.models import Gates
from lads.models.gating import Relevance, binary_gates


def is_hard(g: torch.Tensor) -> torch.Tensor:
    return (g == 0) | (g == 1)


def test_training_gates_are_noisy(tiny_model):
    """Training: the same expressions get different gates from call to call (logistic noise)."""
    model = tiny_model
    _, _, ids, mask = make_batch(batch=4)
    text, text_mask = model.encode_text(ids, mask)
    model.train()
    torch.manual_seed(0)
    try:
        draws = [model.gates(text, text_mask) for _ in range(2)]
    finally:
        model.eval()
    (g1, s1, r1, _), (g2, s2, r2, _) = draws
    assert torch.equal(r1.filter, r2.filter)  # same relevance scores ...
    assert not torch.equal(s1.filter, s2.filter)  # ... different noise


def test_per_batch_granularity_mixes_soft_and_hard_batches():
    """Per batch: each call is wholly hard (exactly 0/1) or wholly soft, layer and filter gates
    alike (the paper's one draw n_s for both kinds), and both occur."""
    torch.manual_seed(0)
    r = Relevance(torch.randn(8, 12), torch.randn(8, 50))
    kinds = []
    for _ in range(40):
        g, soft = binary_gates(r, training=True, granularity="batch")
        hard = [is_hard(g.layer), is_hard(g.filter)]
        assert all(h.all() for h in hard) or not any(h.any() for h in hard)
        for gate, s in ((g.layer, soft.layer), (g.filter, soft.filter)):
            if hard[0].all():
                assert torch.equal(gate, (s >= 0.5).float())  # hard gate = 1[r̂ ≥ 0]
            else:
                assert torch.equal(gate, s)
        kinds.append(bool(hard[0].all()))
    assert 8 <= sum(kinds) <= 32  # p = 0.5: both kinds, in plausible numbers


def test_given_draw_decides_soft_or_hard():
    """A given n_s (the engine's one per optimizer step) decides: ≥ 0.5 soft, below hard."""
    r = Relevance(torch.randn(8, 12), torch.randn(8, 50))
    for n_s, hard in ((0.7, False), (0.5, False), (0.2, True)):
        g, _ = binary_gates(r, training=True, granularity="batch", n_s=n_s)
        assert bool(is_hard(g.layer).all() and is_hard(g.filter).all()) == hard


def test_engine_draws_soft_or_hard_once_per_optimizer_step(tmp_path, tiny_text_dir, synth_data, monkeypatch):
    """Eq. 5's n_s is one per training batch (the paper), not one per micro-batch: with two
    micro-batches per step both get the step's draw (``soft_hard_draw(seed, step)``, the same on
    every rank by construction), and the draws differ from step to step."""
    from helpers import engine_overrides

    import lads.models.lads as lads_model
    from lads.config import load_config
    from lads.engine import soft_hard_draw, train

    seen = []

    def recording(relevance, training, granularity="batch", n_s=None):
        seen.append(n_s)
        return binary_gates(relevance, training, granularity, n_s)

    monkeypatch.setattr(lads_model, "binary_gates", recording)
    cfg = load_config("tiny", engine_overrides(tiny_text_dir, synth_data, tmp_path / "run") + [
        "train.max_steps=4", "train.epochs=100", "train.batch_size=8", "train.micro_batch=4",
        "train.checkpoint_every=1000"])
    train(cfg)
    assert seen == [soft_hard_draw(cfg.train.seed, step) for step in range(4) for _ in range(2)]
    assert len(set(seen)) == 4


def test_per_element_granularity_mixes_inside_one_batch():
    """Per element: one batch holds about half exact 0/1 gates and half fractional gates."""
    torch.manual_seed(1)
    g, soft = binary_gates(Relevance(torch.randn(16, 20), torch.randn(16, 200)), training=True, granularity="element")
    for gate, s in ((g.layer, soft.layer), (g.filter, soft.filter)):
        hard = is_hard(gate)
        assert 0.3 < hard.float().mean() < 0.7
        assert torch.equal(gate[~hard], s[~hard])


def test_model_granularity_option(make_tiny):
    """``model.gating.granularity=element`` reaches the gates; an unknown value is refused."""
    from lads.errors import LadsError

    model = make_tiny("model.gating.granularity=element").train()
    _, _, ids, mask = make_batch(batch=4)
    torch.manual_seed(0)
    gates = model(*make_batch(batch=4))["gates"]
    hard = is_hard(gates.filter)
    assert hard.any() and not hard.all()
    with pytest.raises(LadsError, match="granularity"):
        make_tiny("model.gating.granularity=token")


def test_eval_gates_are_hard_and_deterministic(tiny_model):
    """Eval: no noise, exactly 0/1, 1[r ≥ 0], identical across calls."""
    _, _, ids, mask = make_batch(batch=4, seed=3)
    with torch.no_grad():
        text, text_mask = tiny_model.encode_text(ids, mask)
        (g1, s1, r1, alpha), (g2, *_) = tiny_model.gates(text, text_mask), tiny_model.gates(text, text_mask)
    for a, b, r in [(g1.layer, g2.layer, r1.layer), (g1.filter, g2.filter, r1.filter)]:
        assert is_hard(a).all() and torch.equal(a, b)
        assert torch.equal(a, (r >= 0).float())
    assert torch.allclose(s1.filter, torch.sigmoid(r1.filter))
    # α is a softmax over the valid tokens only
    assert torch.allclose(alpha.sum(-1), torch.ones_like(alpha[..., 0]))
    assert (alpha.masked_select(~mask.bool()[:, None, :].expand_as(alpha)) == 0).all()


def test_gates_start_mostly_open(tiny_model):
    """bias_init = 3: at initialisation most gates are open."""
    with torch.no_grad():
        gates = tiny_model(*make_batch(batch=4))["gates"]
    assert gates.layer.mean() > 0.8 and gates.filter.mean() > 0.8


def test_straight_through_gradient_of_hard_gate_equals_soft_gate():
    """∂(w·g_h)/∂r equals ∂(w·g_s)/∂r for the same noise, and is not zero."""
    r = torch.randn(4, 30, requires_grad=True)
    w = torch.randn(4, 30)
    for seed in range(20):
        torch.manual_seed(seed)
        g, soft = binary_gates(Relevance(r[:, :3], r), training=True, granularity="batch")
        g, soft = g.filter, soft.filter
        if is_hard(g).all():
            break
    else:
        pytest.fail("no hard batch in 20 draws")
    (grad_hard,) = torch.autograd.grad((w * g).sum(), r, retain_graph=True)
    (grad_soft,) = torch.autograd.grad((w * soft).sum(), r)
    assert torch.equal(grad_hard, grad_soft)
    assert grad_hard.abs().sum() > 0


def test_box_loss_reaches_gating_network_through_hard_gates(make_tiny):
    """Training with hard gates, L1 + GIoU alone (no MI term) gives the gating weights a gradient."""
    model = make_tiny().train()
    batch = make_batch(batch=2)
    for seed in range(30):
        torch.manual_seed(seed)
        out = model(*batch)
        if is_hard(out["gates"].layer).all() and is_hard(out["gates"].filter).all():
            break
    else:
        pytest.fail("no all-hard draw in 30 tries")
    terms = model.loss(out, torch.tensor([[0.4, 0.5, 0.2, 0.3]] * 2))
    (terms["l1"] + terms["giou"]).backward()
    for name in ("w1", "w2", "w3", "embedding"):
        grad = getattr(model.gating, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_gates_map_and_len():
    gates = Gates(torch.zeros(3, 2), torch.ones(3, 5))
    assert len(gates) == 3 and torch.equal(gates.map(lambda t: t + 1).filter, torch.full((3, 5), 2.0))


# ----------------------------------------------------------------------------- the static control


def test_static_control_gives_every_expression_the_same_gates(make_tiny):
    """``model.gating.static``: a learned constant in place of F_l. In evaluation every expression
    gets the same hard gates whatever its words; LADS's gates, from the same weights, differ."""
    static = make_tiny("model.gating.static=true", "model.gating.bias_init=0").eval()
    lads = make_tiny("model.gating.bias_init=0").eval()
    _, _, ids, mask = make_batch(batch=6, seed=3)
    with torch.no_grad():
        text, text_mask = static.encode_text(ids, mask)
        gates, soft, relevance, alpha = static.gates(text, text_mask)
        lads_relevance = lads.gates(*lads.encode_text(ids, mask))[2]
    assert alpha is None  # it reads no word
    assert torch.equal(relevance.layer, relevance.layer[:1].expand_as(relevance.layer))
    assert torch.equal(relevance.filter, relevance.filter[:1].expand_as(relevance.filter))
    assert not torch.equal(lads_relevance.filter, lads_relevance.filter[:1].expand_as(lads_relevance.filter))
    assert 0 < gates.filter.mean() < 1  # the gates are not all open: they are one mask, not no mask


def test_static_control_learns_its_mask_through_its_weights(make_tiny):
    """The box loss and Eq. 8 reach the constant and the stacked weights, as they reach LADS's."""
    model = make_tiny("model.gating.static=true").train()
    torch.manual_seed(0)
    out = model(*make_batch(batch=2))
    model.loss(out, torch.tensor([[0.4, 0.5, 0.2, 0.3]] * 2))["loss"].backward()
    for name in ("constant", "w1", "w2", "w3", "b2", "b3"):
        grad = getattr(model.gating, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.gating.embedding.grad is None or model.gating.embedding.grad.abs().sum() == 0  # α is unused
