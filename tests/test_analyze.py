"""``lads analyze``: statistics against hand counts, kept FLOPs against torch's flop counter,
the paper's word scores on a hand example, figures and report on a tiny random model."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lads.analysis import stats
from lads.analysis.collect import analyze, choose_examples
from lads.cli import main
from lads.errors import LadsError
from lads.models.gating import Candidate, GateLayout, Gates

# ----------------------------------------------------------------------------- hand-set gates

# layer1.0 (2 filters, no layer gate), layer1.1 (2 filters), layer2.0 (3 filters, no layer
# gate), one fusion layer: MHSA and FFN. Layer gates: layer1.1, attn, ffn.
LAYOUT = GateLayout([
    Candidate("layer1.0", False, 2), Candidate("layer1.1", True, 2), Candidate("layer2.0", False, 3),
    Candidate("fusion.0.attn", True, 0), Candidate("fusion.0.ffn", True, 0),
])
LAYER = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]])
FILTER = np.array([
    [1, 0, 1, 1, 1, 1, 0],
    [1, 0, 1, 1, 0, 1, 0],
    [1, 1, 0, 0, 1, 1, 0],
    [1, 0, 1, 0, 0, 1, 0],
    [1, 0, 1, 1, 1, 1, 0],
])
TYPES = ["a", "b", "a", "b", "a"]
FLOPS = [0.5, 0.1, 0.7, 0.3, 0.9]


def test_statistics_equal_hand_counts():
    s = stats.gate_statistics(LAYER, FILTER, LAYOUT, TYPES, FLOPS)
    assert s["expressions"] == 5
    assert s["layer_selection_rate"] == pytest.approx({"layer1.1": 0.6, "fusion.0.attn": 1.0, "fusion.0.ffn": 0.0})
    assert s["always_run_layers"] == ["layer1.0", "layer2.0"]
    assert s["never_selected"]["layers"] == ["fusion.0.ffn"]
    assert s["always_selected"]["layers"] == ["fusion.0.attn"]
    assert s["never_selected"]["filters"] == ["layer2.0/2"]
    assert s["always_selected"]["filters"] == ["layer1.0/0", "layer2.0/1"]
    assert s["never_selected"]["num_filters"] == 1 and s["always_selected"]["num_filters"] == 2
    l10 = s["filter_selection_rate"]["layer1.0"]
    assert (l10["filters"], l10["mean"], l10["min"], l10["max"], l10["never"], l10["always"]) == pytest.approx(
        (2, 0.6, 0.2, 1.0, 0, 1))
    assert s["filter_selection_rate"]["layer1.1"]["mean"] == pytest.approx(0.7)
    # visual layers: the two ungated blocks plus layer1.1 when open; interaction: MHSA only
    assert s["layers_kept"]["visual"]["histogram"] == {2: 2, 3: 3}
    assert s["layers_kept"]["interaction"]["histogram"] == {1: 5}
    assert s["filters_selected_first_blocks"]["layer1.0"]["mean"] == pytest.approx(6 / 5)
    assert list(s["filters_selected_first_blocks"]) == ["layer1.0", "layer2.0"]
    # filters that run: a skipped layer1.1 runs none of its open filters -> 5, 2, 4, 2, 5
    assert s["subnet"]["filters_kept"] == pytest.approx(18 / 5)
    a, b = s["by_type"]["a"], s["by_type"]["b"]
    assert (a["expressions"], a["layers_kept"], a["filters_kept"], a["flops_fraction"]) == pytest.approx(
        (3, 4, 14 / 3, 0.7))
    assert (b["expressions"], b["layers_kept"], b["filters_kept"], b["flops_fraction"]) == pytest.approx(
        (2, 3, 2, 0.2))
    json.dumps(s)  # JSON-ready


def test_dynamicity_equals_hand_counts():
    """Rates: layer1.1 0.6, attn 1.0, ffn 0.0; filters 1.0, 0.2, 0.8, 0.6, 0.6, 1.0, 0.0."""
    d = stats.gate_statistics(LAYER, FILTER, LAYOUT, TYPES, FLOPS)["dynamicity"]
    assert set(d) == {"layers_varying", "layers_never", "layers_always", "filters_varying_fraction",
                      "filters_never_fraction", "flops"}
    assert (d["layers_varying"], d["layers_never"], d["layers_always"]) == (1, 1, 1)
    assert d["filters_varying_fraction"] == pytest.approx(4 / 7) and d["filters_never_fraction"] == pytest.approx(1 / 7)
    assert d["flops"] == pytest.approx({"mean": 0.5, "std": np.std(FLOPS), "min": 0.1, "max": 0.9})
    a = stats.gate_statistics(LAYER, FILTER, LAYOUT, TYPES, FLOPS)["dynamicity_by_type"]["a"]
    # type a (rows 0, 2, 4): layer1.1 always, filters 1, 1/3, 2/3, 2/3, 1, 1, 0
    assert (a["layers_varying"], a["layers_never"], a["layers_always"]) == (0, 1, 2)
    assert a["filters_varying_fraction"] == pytest.approx(3 / 7) and a["flops"]["mean"] == pytest.approx(0.7)


@pytest.mark.parametrize("rate, varies", [(0.05, False), (0.1, True), (0.9, True), (0.95, False)])
def test_a_layer_varies_between_ten_and_ninety_percent_bounds_included(rate, varies):
    layer = np.zeros((20, 3))
    layer[: round(20 * rate), 0] = 1
    assert stats.dynamicity(layer, np.ones((20, 7)))["layers_varying"] == int(varies)


def test_examples_one_per_type_or_most_different():
    assert sorted(TYPES[i] for i in choose_examples(LAYER, FILTER, TYPES)) == ["a", "b"]
    chosen = choose_examples(LAYER, FILTER)
    assert chosen[0] in (1, 3) and len(set(chosen)) == len(chosen)  # smallest subnet first


# ----------------------------------------------------------------------------- words (Fig. 7)


def test_word_scores_follow_the_paper():
    # K = 3 candidates: P = 2 visual, M = 1 interaction; "red" occurs twice, "ball" once
    words = [["red", "ball"], ["red"]]
    alphas = [np.array([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0]]), np.array([[1.0], [0.0], [0.0]])]
    scores = stats.word_scores(words, alphas, num_visual=2)
    s_red = [0.75, 0.1, 0.5]  # mean of α over its two occurrences
    e = [math.exp(x) for x in s_red]
    assert scores["red"]["count"] == 2
    assert scores["red"]["visual"] == pytest.approx((e[0] + e[1]) / sum(e))
    assert scores["red"]["interaction"] == pytest.approx(e[2] / sum(e))
    e = [math.exp(x) for x in (0.5, 0.8, 0.0)]
    assert scores["ball"]["interaction"] == pytest.approx(e[2] / sum(e))
    visual, interaction = stats.cloud_weights({**scores, "x": {"count": 1, "visual": 0.5, "interaction": 0.5}})
    assert set(visual) == {"ball"} and set(interaction) == {"x"}  # median split


def test_wordpieces_merge_and_specials_drop():
    tokens = ["[CLS]", "blu", "##ish", "ball", "[SEP]"]
    alpha = np.array([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.5, 0.5, 0.0, 0.0]])
    words, a = stats.merge_wordpieces(tokens, alpha, {"[CLS]", "[SEP]", "[PAD]"})
    assert words == ["bluish", "ball"]
    np.testing.assert_allclose(a, [[0.5, 0.4], [1.0, 0.0]])


# ----------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="module")
def make_model(tmp_path_factory):
    """``make_model(*overrides)``: ``tiny`` with a random 2-layer BERT of the real vocabulary."""
    from transformers import BertConfig, BertModel

    import lads
    from lads.models.text import resolve_text_model

    bert = tmp_path_factory.mktemp("bert")
    vocab = Path(resolve_text_model("minilm-l6")) / "vocab.txt"
    shutil.copy(vocab, bert / "vocab.txt")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(vocab.read_text().splitlines()))
    BertModel(config).save_pretrained(bert)

    def make(*overrides):
        torch.manual_seed(0)
        return lads.build_model("tiny", [f"model.text.name={bert}", "model.text.pretrained=false",
                                         "model.text.num_layers=2", "model.gating.bias_init=0", *overrides]).eval()

    return make


@pytest.fixture(scope="module")
def model(make_model):
    return make_model()


COLOURS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "star"]
EXPRESSIONS = (
    [(f"the {s}", "category") for s in SHAPES]
    + [(f"the small {c} {s}", "attribute") for c in COLOURS for s in SHAPES]
    + [(f"the {w} {s}", "spatial") for w in ("leftmost", "second", "topmost") for s in SHAPES]
    + [(f"the {s} left of the {c} square", "relational") for c in COLOURS for s in SHAPES[:2]]
)


def test_kept_flops_fraction_is_the_measured_ratio(model):
    """Kept FLOPs per expression = FlopCounterMode on the extracted subnet over the all-open one."""
    from lads.models.subnet import extract_subnet
    from lads.util.flops import count_flops

    size, text_tokens = model.config.image_size, 7
    images, pixel_mask = torch.randn(1, 3, size, size), torch.zeros(1, size, size, dtype=torch.bool)
    ids = torch.randint(1000, 2000, (1, text_tokens))
    with torch.no_grad():
        text, mask = model.encode_text(ids, torch.ones_like(ids))
    layer, filt = np.ones((3, model.layout.num_layer_gates)), np.ones((3, model.layout.num_filter_gates))
    names = model.layout.names
    layer[1, model.layout.layer_slot[names.index("layer3.2")]] = 0
    layer[1, model.layout.layer_slot[names.index("fusion.1.ffn")]] = 0
    filt[2, ::2] = 0  # every other filter closed
    measured = []
    for i in range(3):
        gates = Gates(torch.tensor(layer[i], dtype=torch.float32), torch.tensor(filt[i], dtype=torch.float32))
        subnet = extract_subnet(model, gates)
        measured.append(count_flops(subnet, images, pixel_mask, text, mask))
    fractions = stats.kept_flops_fraction(model, layer, filt, [text_tokens] * 3)
    np.testing.assert_allclose(fractions, np.array(measured) / measured[0], rtol=1e-9)
    assert fractions[0] == 1.0 and 0.5 < fractions[2] < fractions[1] < 1.0


# ----------------------------------------------------------------------------- figures and report


def _check_png(path: Path):
    assert path.exists() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, f"{path.name} is a single colour"


def _references(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page)


@pytest.fixture(scope="module")
def analysed(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "out"
    expressions, types = zip(*EXPRESSIONS)
    return out, analyze(model, list(expressions), list(types), out, progress=False)


def test_every_figure_is_a_png_and_the_report_embeds_them(analysed):
    out, result = analysed
    assert set(result["figures"]) == {"fig4a", "fig4b", "fig4c", "fig4d", "fig5", "fig6", "fig7"}
    for path in result["figures"].values():
        _check_png(path)
    page = result["report"].read_text()
    refs = _references(page)
    assert len(refs) == len(result["figures"])
    for ref in refs:
        if ref.startswith("data:"):
            assert ref.startswith("data:image/png;base64,")
            assert base64.b64decode(ref.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert (out / ref).exists(), ref
    saved = json.loads(result["stats_path"].read_text())
    assert saved["expressions"] == len(EXPRESSIONS) and saved["notes"] == []
    assert set(saved["by_type"]) == {"category", "attribute", "spatial", "relational"}
    assert 0 < saved["subnet"]["flops_fraction"] < 1  # bias_init = 0: about half the gates closed
    assert {"the", "left"} <= set(saved["words"])
    assert saved["dynamicity"]["layers_varying"] + saved["dynamicity"]["layers_never"] \
        + saved["dynamicity"]["layers_always"] <= 20
    page = result["report"].read_text()
    assert "Do the subnets follow the expression?" in page and "no never-selected filter" in page
    assert f"<td>{saved['dynamicity']['layers_varying']}</td>" in page
    assert not any(w.startswith("##") or w in ("[CLS]", "[SEP]") for w in saved["words"])


def test_existing_folder_needs_force(model, analysed):
    out, _ = analysed
    with pytest.raises(LadsError, match=r"(?s)" + re.escape(str(out)) + r".*--force"):
        analyze(model, ["the red circle"], out_dir=out)
    assert main(["analyze", "--checkpoint", "none", "--data", "none", "--out", str(out)]) == 2


def test_too_few_expressions_skip_the_map_only(model, tmp_path):
    result = analyze(model, ["the red circle", "the star", "the leftmost square"], out_dir=tmp_path,
                     force=True, progress=False)
    assert "fig5" not in result["figures"] and not (tmp_path / "fig5_tsne.png").exists()
    assert any("t-SNE" in n and "skipped" in n for n in result["notes"])
    for path in result["figures"].values():
        _check_png(path)
    assert "t-SNE) skipped" in result["report"].read_text()
    assert json.loads(result["stats_path"].read_text())["notes"] == result["notes"]


def test_static_control_has_one_subnet_and_no_word_scores(make_model, tmp_path):
    static = make_model("model.gating.static=true")
    expressions, types = zip(*EXPRESSIONS)
    result = analyze(static, list(expressions), list(types), tmp_path, force=True, progress=False)
    d = result["stats"]["dynamicity"]
    assert d["layers_varying"] == 0 and d["layers_never"] + d["layers_always"] == 20  # one subnet for all
    assert d["filters_varying_fraction"] == 0 and 0 < d["filters_never_fraction"] < 1
    assert "fig7" not in result["figures"] and "words" not in result["stats"]
    assert any("static control" in n for n in result["notes"])


def test_dense_model_is_refused(model, tmp_path):
    model.gating, gating = None, model.gating
    try:
        with pytest.raises(LadsError, match="dense"):
            analyze(model, ["the star"], out_dir=tmp_path / "x")
    finally:
        model.gating = gating


def test_fig5_with_few_distinct_patterns_keeps_every_text_apart():
    """30 expressions sharing 3 gate sets: the map still renders, each set drawn as a disc of its
    expressions, and no text box (title, region numbers, legend, captions) covers another."""
    from lads.analysis.figures import tsne_figure

    layer, filt = np.repeat(LAYER[:3], 10, axis=0), np.repeat(FILTER[:3], 10, axis=0)
    expressions = [f"the {i}th expression, long enough to need shortening in a caption" for i in range(30)]
    fig, labelled = tsne_figure(layer, filt, expressions, ["a", "b", "c"] * 10)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for ax in fig.axes for t in [*ax.texts, ax.title] if t.get_text()]
    boxes += [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend()]
    assert len(boxes) == 1 + 3 + 1 + 1  # title, 3 region numbers, the captions, the legend
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    assert len(labelled) == 3
    points = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    assert len(np.unique(points.round(6), axis=0)) == 30  # spread, not 3 dots


def test_filters_kept_one_definition(model, synth_data, tmp_path):
    """predict, eval and analyze count a subnet's filters alike, as counted here by hand: the open
    filter gates of the bottlenecks that run (a skipped bottleneck runs none of them)."""
    from lads.datasets import load_records
    from lads.datasets.dataset import RecDataset
    from lads.engine import evaluate

    records, _ = load_records(synth_data, "test")
    layout, by_hand, open_gates = model.layout, [], []
    for r in records:
        with torch.no_grad():
            gates = model(**model.prepare(r.image, [r.expression]))["gates"]
        runs = [i not in layout.layer_slot or gates.layer[0, layout.layer_slot[i]] == 1
                for i in range(layout.num_visual)]
        by_hand.append(sum(int(gates.filter[0, s].sum()) for s, run in zip(layout.filter_slices, runs) if run))
        open_gates.append(int(gates.filter[0].sum()))
    assert any(h < o for h, o in zip(by_hand, open_gates))  # the two definitions differ here

    assert [model.predict(r.image, [r.expression])[0]["filters"] for r in records] == by_hand
    evaluated = evaluate(model, RecDataset(records, model.tokenizer, model.config.image_size,
                                              model.config.text.max_tokens), progress=False)
    assert evaluated["filters_kept"] == pytest.approx(np.mean(by_hand))
    analysed = analyze(model, [r.expression for r in records], out_dir=tmp_path / "a", progress=False)
    assert analysed["stats"]["subnet"]["filters_kept"] == pytest.approx(np.mean(by_hand))
