"""See the subnets of a trained LADS over a split (paper Figs. 4-7): the gates of each expression
(``collect``), their statistics (``subnet_statistics``), and ``analyze``, which ``lads analyze``
calls. The gates depend on the expression alone, so only the text backbone and the gating network
run; no image is read. ``analyze(model, expressions, expr_types, out_dir)`` writes::

    OUT/fig4a_filter_rates.png       OUT/fig5_tsne.png (when there are enough expressions)
    OUT/fig4b_layer_rates.png        OUT/fig6_subnets.png
    OUT/fig4c_layers_kept.png        OUT/fig7_word_clouds.png
    OUT/fig4d_filters_kept.png       OUT/stats.json, OUT/report.html (figures embedded)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lads.analysis import figures, stats
from lads.analysis.report import write_report
from lads.errors import LadsError
from lads.models.provenance import OVERLAP_WARNING

OUTPUTS = {
    "fig4a": "fig4a_filter_rates.png", "fig4b": "fig4b_layer_rates.png", "fig4c": "fig4c_layers_kept.png",
    "fig4d": "fig4d_filters_kept.png", "fig5": "fig5_tsne.png", "fig6": "fig6_subnets.png",
    "fig7": "fig7_word_clouds.png", "stats": "stats.json", "report": "report.html",
}


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise LadsError(f"output folder {out} exists and is not empty; pass --force (force=True) to overwrite it")


@torch.no_grad()
def collect(model, expressions: list[str], tokenizer=None, batch_size: int = 128, progress: bool = True) -> dict:
    """Hard gates (eval mode) and α (Eq. 1) of each expression, from the text alone.

    Returns ``layer`` (N, n_L), ``filter`` (N, n_C), ``words`` (whole words, WordPieces merged,
    [CLS]/[SEP] dropped), ``alpha`` (per expression, (K, words); None for the static control,
    whose gating network reads no word) and ``tokens`` (N,).
    """
    from tqdm import tqdm

    from lads.models.text import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(model.config.text.name)
    special = set(tokenizer.all_special_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    layer, filt, words, alphas, tokens = [], [], [], [], []
    for start in tqdm(range(0, len(expressions), batch_size), desc="gates", unit="batch", disable=not progress):
        batch = tokenizer(expressions[start : start + batch_size], padding=True, truncation=True,
                          max_length=model.config.text.max_tokens, return_tensors="pt").to(device)
        text, mask = model.encode_text(batch["input_ids"], batch["attention_mask"])
        gates, _, _, alpha = model.gates(text, mask)
        layer.append(gates.layer.cpu().numpy())
        filt.append(gates.filter.cpu().numpy())
        for j, (ids, m) in enumerate(zip(batch["input_ids"].cpu(), mask.cpu())):
            n = int(m.sum())
            a = np.zeros((1, n)) if alpha is None else alpha[j].float().cpu().numpy()[:, :n]
            w, wa = stats.merge_wordpieces(tokenizer.convert_ids_to_tokens(ids[:n].tolist()), a, special)
            words.append(w)
            alphas.append(None if alpha is None else wa)
            tokens.append(n)
    model.train(was_training)
    return {"layer": np.concatenate(layer), "filter": np.concatenate(filt), "words": words,
            "alpha": alphas, "tokens": np.array(tokens)}


def subnet_statistics(model, expressions: list[str], expr_types=None, batch_size: int = 128,
                      progress: bool = True) -> tuple[dict, dict]:
    """``stats.gate_statistics`` of the expressions' subnets, their FLOPs and dynamicity
    included, and what ``collect`` returned."""
    got = collect(model, expressions, batch_size=batch_size, progress=progress)
    flops = stats.kept_flops_fraction(model, got["layer"], got["filter"], got["tokens"])
    return stats.gate_statistics(got["layer"], got["filter"], model.layout, expr_types, flops), got


def choose_examples(layer, filt, expr_types=None, count: int = 4) -> list[int]:
    """Expressions for Fig. 6: per type, the one whose gates are closest to the type's mean;
    without types, the smallest subnet then, greedily, the most different (Hamming) ones."""
    gates = np.concatenate([layer, filt], 1)
    if expr_types is not None:
        chosen = []
        for t in sorted(set(expr_types)):
            idx = np.array([i for i, e in enumerate(expr_types) if e == t])
            centre = gates[idx].mean(0)
            chosen.append(int(idx[np.abs(gates[idx] - centre).sum(1).argmin()]))
        return chosen
    chosen = [int(layer.sum(1).argmin())]
    distance = np.abs(gates - gates[chosen[0]]).sum(1)
    while len(chosen) < min(count, len(gates)) and distance.max() > 0:
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, np.abs(gates - gates[chosen[-1]]).sum(1))
    return chosen


def analyze(model, expressions: list[str], expr_types: list[str] | None = None, out_dir="analysis",
            force: bool = False, batch_size: int = 128, title: str = "LADS subnets", progress: bool = True) -> dict:
    """Figs. 4-7, ``stats.json`` and ``report.html`` for ``expressions`` in ``out_dir``.

    ``expr_types`` (one per expression, e.g. the synthetic benchmark's) colours Fig. 5, picks
    the Fig. 6 examples and gives per-type subnet sizes. Returns ``{"stats", "figures"
    (key -> path), "report", "stats_path", "notes"}``.
    """
    if model.gating is None:
        raise LadsError("this is a dense model (model.dense = true): it has no gating network, "
                        "so there are no subnets to analyse")
    if not expressions:
        raise LadsError("no expression to analyse")
    if expr_types is not None and len(expr_types) != len(expressions):
        raise LadsError(f"{len(expr_types)} expression types for {len(expressions)} expressions")
    out = Path(out_dir)
    check_out_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS.values():  # no stale figure from an earlier run
        (out / name).unlink(missing_ok=True)

    result, got = subnet_statistics(model, expressions, expr_types, batch_size, progress)
    layer, filt, layout = got["layer"], got["filter"], model.layout
    notes = []
    static = model.config.gating.static
    if static:
        notes.append("The static control: its gating network reads no word, so every expression has the "
                     "same subnet and there are no word scores (Fig. 7).")
    else:
        words = stats.word_scores(got["words"], got["alpha"], layout.num_visual)
        result["words"] = dict(sorted(words.items(), key=lambda kv: -kv[1]["count"]))

    figs = {
        "fig4a": figures.filter_rates(filt, layout, out / OUTPUTS["fig4a"]),
        "fig4b": figures.layer_rates(layer, layout, out / OUTPUTS["fig4b"]),
        "fig4c": figures.layers_per_expression(layer, layout, out / OUTPUTS["fig4c"]),
        "fig4d": figures.filters_per_expression(filt, layout, out / OUTPUTS["fig4d"]),
    }
    if len(expressions) >= figures.MIN_TSNE:
        figs["fig5"], result["tsne_regions"] = figures.tsne_map(layer, filt, expressions, expr_types,
                                                                out / OUTPUTS["fig5"])
    else:
        notes.append(f"Fig. 5 (t-SNE) skipped: {len(expressions)} expressions, "
                     f"it needs at least {figures.MIN_TSNE}.")
    chosen = choose_examples(layer, filt, expr_types)
    labels = [expressions[i] + (f" [{expr_types[i]}]" if expr_types else "") for i in chosen]
    figs["fig6"] = figures.subnet_drawings(layer[chosen], filt[chosen], labels, layout, out / OUTPUTS["fig6"])
    if not static:
        visual, interaction = stats.cloud_weights(words)
        figs["fig7"] = figures.word_clouds(visual, interaction, out / OUTPUTS["fig7"])
    result["notes"] = notes
    result["figures"] = {k: p.name for k, p in figs.items()}

    stats_path = out / OUTPUTS["stats"]
    stats_path.write_text(json.dumps(result, indent=2))
    warning = f"Warning: this model {OVERLAP_WARNING}." if model.config.visual.allow_eval_overlap else None
    report = write_report(out / OUTPUTS["report"], result, figs, notes, title, warning)
    return {"stats": result, "figures": figs, "report": report, "stats_path": stats_path, "notes": notes}
