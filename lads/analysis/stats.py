"""Numbers about the subnets, from stacks of hard gates and the attention weights α.

Everything here takes plain arrays (one row per expression) and a ``GateLayout``, so hand-set
gates can be fed in: ``layer`` is (N, n_L) and ``filt`` is (N, n_C), both 0/1.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from lads.models.gating import GateLayout


def _summary(values: np.ndarray, histogram: bool = False) -> dict:
    out = {"mean": float(values.mean()), "std": float(values.std()),
           "min": float(values.min()), "max": float(values.max())}
    if histogram:
        out["histogram"] = {int(k): n for k, n in sorted(Counter(values.astype(int).tolist()).items())}
    return out


VARYING_LAYERS = (0.10, 0.90)  # a gated layer "varies" when selected for 10 % to 90 % of the expressions
VARYING_FILTERS = (0.05, 0.95)  # a filter, 5 % to 95 %


def dynamicity(layer, filt, flops_fraction=None) -> dict:
    """How much the subnets follow the expression, counted as the paper's Fig. 4 counts it
    (docs/design.md §5c), from (N, n_L) layer gates and (N, n_C) filter gates:

    - ``layers_varying``: gated layers selected for 10 % to 90 % of the expressions (bounds
      included); ``layers_never`` / ``layers_always``: for none / for all of them;
    - ``filters_varying_fraction``: the share of filter gates open for 5 % to 95 % of the
      expressions; ``filters_never_fraction``: the share open for none (the paper: no filter is
      never selected). A filter gate is counted as the gating network sets it, as in Fig. 4a,
      whether or not its bottleneck runs;
    - ``flops``: mean, std, min and max of the per-expression FLOPs fraction, when given.
    """
    layer_rate, filter_rate = np.asarray(layer, float).mean(0), np.asarray(filt, float).mean(0)
    (lo, hi), (flo, fhi) = VARYING_LAYERS, VARYING_FILTERS
    out = {
        "layers_varying": int(((layer_rate >= lo) & (layer_rate <= hi)).sum()),
        "layers_never": int((layer_rate == 0).sum()),
        "layers_always": int((layer_rate == 1).sum()),
        "filters_varying_fraction": float(((filter_rate >= flo) & (filter_rate <= fhi)).mean()),
        "filters_never_fraction": float((filter_rate == 0).mean()),
    }
    if flops_fraction is not None:
        flops = _summary(np.asarray(flops_fraction, float))
        out["flops"] = {k: flops[k] for k in ("mean", "std", "min", "max")}
    return out


def gate_statistics(layer, filt, layout: GateLayout, expr_types=None, flops_fraction=None) -> dict:
    """Selection rates and subnet sizes (the numbers behind Fig. 4), as a JSON-ready dict.

    ``flops_fraction``: (N,) kept FLOPs of each subnet (``kept_flops_fraction``), optional.
    ``expr_types``: one label per expression (synthetic benchmark), for per-type means.
    """
    layer, filt = np.asarray(layer, float), np.asarray(filt, float)
    n = layer.shape[0]
    names = layout.names
    layer_rate = layer.mean(0)
    filter_rate = filt.mean(0)
    gated = [names[i] for i in layout.layer_owner]
    filter_names = [f"{names[owner]}/{j}" for owner, s in enumerate(layout.filter_slices)
                    for j in range(s.stop - s.start)]

    def extremes(value):
        layers = [name for name, r in zip(gated, layer_rate) if r == value]
        filters = [name for name, r in zip(filter_names, filter_rate) if r == value]
        return {"num_layers": len(layers), "layers": layers, "num_filters": len(filters), "filters": filters}

    kept = layout.kept(layer, filt)
    visual, interaction = kept["visual_layers"], kept["fusion_sublayers"]
    size = {"layers_kept": visual + interaction, "visual_layers_kept": visual,
            "interaction_layers_kept": interaction, "filters_kept": kept["filters"]}
    if flops_fraction is not None:
        size["flops_fraction"] = np.asarray(flops_fraction, float)
    stats = {
        "expressions": n,
        "layer_selection_rate": {name: float(r) for name, r in zip(gated, layer_rate)},
        "always_run_layers": [c.name for c in layout.candidates if not c.layer_gate],
        "filter_selection_rate": {
            names[i]: {"filters": s.stop - s.start, **_summary(filter_rate[s]),
                       "never": int((filter_rate[s] == 0).sum()), "always": int((filter_rate[s] == 1).sum())}
            for i, s in enumerate(layout.filter_slices)
        },
        "never_selected": extremes(0.0),
        "always_selected": extremes(1.0),
        "layers_kept": {"visual": _summary(visual, True), "interaction": _summary(interaction, True)},
        "filters_selected_first_blocks": {  # Fig. 4d: the first block of each stage
            names[i]: _summary(filt[:, layout.filter_slices[i]].sum(1))
            for i in stage_first_blocks(layout)
        },
        "subnet": {k: float(v.mean()) for k, v in size.items()},
        "dynamicity": dynamicity(layer, filt, flops_fraction),
    }
    if expr_types is not None:
        groups = defaultdict(list)
        for i, t in enumerate(expr_types):
            groups[t].append(i)
        stats["by_type"] = {
            t: {"expressions": len(idx), **{k: float(v[idx].mean()) for k, v in size.items()}}
            for t, idx in sorted(groups.items())
        }
        stats["dynamicity_by_type"] = {
            t: dynamicity(layer[idx], filt[idx], None if flops_fraction is None else size["flops_fraction"][idx])
            for t, idx in sorted(groups.items())
        }
    return stats


def stage_first_blocks(layout: GateLayout) -> list[int]:
    """Candidate indices of ``layer1.0`` … ``layer4.0``: one representative block per width."""
    return [i for i, c in enumerate(layout.candidates[: layout.num_visual]) if c.name.endswith(".0")]


# ----------------------------------------------------------------------------- FLOPs


def kept_flops_fraction(model, layer, filt, text_tokens) -> np.ndarray:
    """(N,) FLOPs of each expression's extracted subnet over those of the all-open one, at the
    model's image size and the expression's token count: ``Subnet.analytic_flops``, the count
    that the subnet tests check against ``FlopCounterMode``. One subnet at a time is extracted
    per gate pattern, and only its counts are kept; ``model`` must be in eval mode."""
    from lads.inference import group_by_pattern
    from lads.models.gating import Gates
    from lads.models.subnet import BackbonePlan, extract_subnet

    size = model.config.image_size
    gates = Gates(torch.as_tensor(np.asarray(layer, np.float32)), torch.as_tensor(np.asarray(filt, np.float32)))
    tokens = np.asarray(text_tokens, dtype=int)
    plan = BackbonePlan(model.visual_backbone, fold_bn=False)

    def counts(subnet, rows) -> dict[int, int]:
        return {int(n): subnet.analytic_flops(1, size, size, int(n))["total"] for n in np.unique(tokens[rows])}

    dense = counts(extract_subnet(model, gates.map(lambda g: torch.ones_like(g[0])), plan=plan), np.arange(len(tokens)))
    fractions = np.empty(len(gates))
    for rows in group_by_pattern(gates).values():
        kept = counts(extract_subnet(model, gates.map(lambda g: g[rows[0]]), plan=plan), rows)
        for i in rows:
            fractions[i] = kept[tokens[i]] / dense[tokens[i]]
    return fractions


# ----------------------------------------------------------------------------- words (Fig. 7)


def merge_wordpieces(tokens: list[str], alpha: np.ndarray, special: set[str]):
    """Words of one expression and their α (K, W): a word's α is the sum over its WordPiece
    pieces (its share of each candidate's attention); special tokens and padding dropped."""
    words, columns = [], []
    for j, tok in enumerate(tokens):
        if tok in special:
            continue
        if tok.startswith("##") and words:
            words[-1] += tok[2:]
            columns[-1].append(j)
        else:
            words.append(tok)
            columns.append([j])
    return words, np.stack([alpha[:, c].sum(1) for c in columns], 1) if words else alpha[:, :0]


def word_scores(words: list[list[str]], alphas: list[np.ndarray], num_visual: int) -> dict:
    """Fig. 7: for each word w, s_w = the mean of α_i (Eq. 1) at w over all its occurrences
    (K values), ŝ_w = softmax(s_w); the visual score is the sum of the first P elements of ŝ_w,
    the interaction score the sum of the last M. ``alphas[e]`` is (K, len(words[e]))."""
    sums, counts = {}, Counter()
    for ws, a in zip(words, alphas):
        for j, w in enumerate(ws):
            sums[w] = sums.get(w, 0.0) + np.asarray(a[:, j], float)
            counts[w] += 1
    out = {}
    for w, total in sums.items():
        s = total / counts[w]
        e = np.exp(s - s.max())
        hat = e / e.sum()
        out[w] = {"count": counts[w], "visual": float(hat[:num_visual].sum()),
                  "interaction": float(hat[num_visual:].sum())}
    return out


def cloud_weights(scores: dict, min_count: int = 1) -> tuple[dict, dict]:
    """Words assigned to each module, weighted for a word cloud. ŝ_w is close to uniform, so
    every visual score is near P/(P+M); a word goes to the visual cloud when its visual score
    is above the median over words, to the interaction cloud when below, weighted by the gap."""
    kept = {w: s["visual"] for w, s in scores.items() if s["count"] >= min_count}
    if not kept:
        return {}, {}
    median = float(np.median(list(kept.values())))
    visual = {w: v - median for w, v in kept.items() if v > median}
    interaction = {w: median - v for w, v in kept.items() if v < median}
    return visual, interaction
