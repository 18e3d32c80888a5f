"""The paper's Figs. 4-7 as PNG files (matplotlib, Agg backend). Each function writes one file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from lads.analysis.stats import stage_first_blocks  # noqa: E402

STAGE_COLOURS = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"]
ATTN_COLOUR, FFN_COLOUR, SKIPPED = "#dd8452", "#937860", "#d9d9d9"
MIN_TSNE = 10  # fewer expressions than this: no t-SNE map (Fig. 5)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _stage(name: str) -> int:
    return int(name[len("layer")]) - 1


def filter_rates(filt: np.ndarray, layout, path: Path) -> Path:
    """Fig. 4a: one heat strip per bottleneck, its filters sorted by selection rate; the x axis
    is the fraction of the block's filters, so blocks of different widths line up."""
    rate = filt.mean(0)
    fig, ax = plt.subplots(figsize=(8, 5))
    for row, s in enumerate(layout.filter_slices):
        r = np.sort(rate[s])[::-1]
        mesh = ax.pcolormesh(np.linspace(0, 1, len(r) + 1), [row - 0.4, row + 0.4], r[None],
                             vmin=0, vmax=1, cmap="viridis")
    names = layout.names[: layout.num_visual]
    ax.set_yticks(range(len(names)), [f"{n} ({s.stop - s.start})" for n, s in zip(names, layout.filter_slices)])
    ax.invert_yaxis()
    ax.set_xlabel("filters, sorted by selection rate (fraction of the block's width)")
    ax.set_title("Fig. 4a  Selection rate of every filter, per bottleneck")
    fig.colorbar(mesh, ax=ax, label="selection rate")
    return _save(fig, path)


def layer_rates(layer: np.ndarray, layout, path: Path) -> Path:
    """Fig. 4b: selection rate of every candidate layer; projection blocks (no gate) hatched."""
    runs = layout.runs(layer).mean(0)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for i, c in enumerate(layout.candidates):
        if i < layout.num_visual:
            colour = STAGE_COLOURS[_stage(c.name)]
        else:
            colour = ATTN_COLOUR if c.name.endswith("attn") else FFN_COLOUR
        ax.bar(i, runs[i], color=colour, hatch=None if c.layer_gate else "//",
               edgecolor="white" if c.layer_gate else "black", alpha=1 if c.layer_gate else 0.35)
    labels = [n.replace("fusion.", "f").replace(".attn", " MHSA").replace(".ffn", " FFN") for n in layout.names]
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("selection rate")
    ax.axvline(layout.num_visual - 0.5, color="black", lw=0.8)
    ax.set_title("Fig. 4b  Selection rate of every layer (hatched: projection blocks, always run)")
    return _save(fig, path)


def layers_per_expression(layer: np.ndarray, layout, path: Path) -> Path:
    """Fig. 4c: how many layers each expression's subnet keeps, per module."""
    kept = layout.kept(layer)
    visual, interaction = kept["visual_layers"], kept["fusion_sublayers"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    for ax, values, top, title in (
        (axes[0], visual, layout.num_visual, "visual backbone (bottlenecks)"),
        (axes[1], interaction, len(layout.candidates) - layout.num_visual, "interaction module (MHSA + FFN)"),
    ):
        ax.hist(values, bins=np.arange(top + 2) - 0.5, color="#4c72b0", rwidth=0.85)
        ax.axvline(values.mean(), color="black", ls="--", lw=1, label=f"mean {values.mean():.1f}")
        ax.set_xlim(-0.5, top + 0.5)
        ax.set_xlabel("layers kept")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("expressions")
    fig.suptitle("Fig. 4c  Number of selected layers per expression")
    return _save(fig, path)


def filters_per_expression(filt: np.ndarray, layout, path: Path) -> Path:
    """Fig. 4d: how many filters each expression opens in the first bottleneck of each stage
    (``layer1.0`` … ``layer4.0``, always run), one histogram per width."""
    blocks = stage_first_blocks(layout)
    fig, axes = plt.subplots(1, len(blocks), figsize=(3 * len(blocks), 3), layout="constrained")
    for ax, i in zip(np.atleast_1d(axes), blocks):
        s = layout.filter_slices[i]
        width = s.stop - s.start
        counts = filt[:, s].sum(1)
        ax.hist(counts, bins=np.linspace(0, width, min(width, 32) + 1), color=STAGE_COLOURS[_stage(layout.names[i])])
        ax.set_xlim(0, width)
        ax.set_title(f"{layout.names[i]} (width {width})", fontsize=10)
        ax.set_xlabel("filters selected")
    np.atleast_1d(axes)[0].set_ylabel("expressions")
    fig.suptitle("Fig. 4d  Number of selected filters per expression, first block of each stage")
    return _save(fig, path)


def tsne_map(layer, filt, expressions, expr_types, path: Path, regions: int = 6, seed: int = 0):
    """Fig. 5 written to ``path``; returns (path, {region: [expressions]}) (``tsne_figure``)."""
    fig, labelled = tsne_figure(layer, filt, expressions, expr_types, regions, seed)
    return _save(fig, path), labelled


def tsne_figure(layer, filt, expressions, expr_types, regions: int = 6, seed: int = 0):
    """Fig. 5: t-SNE of the gate sets G = {g_L, g_C}, one point per expression, coloured by
    expression type when known. Identical gate sets share one position (t-SNE runs on the
    distinct sets), their expressions spread around it in a disc whose area grows with their
    number, so that a pattern shared by many expressions looks big, not like one dot. k-means
    regions are numbered on the map and captioned beside it with expressions near their centres.
    Returns (figure, {region: [expressions]})."""
    from sklearn.cluster import KMeans
    from sklearn.manifold import TSNE

    n = len(expressions)
    gates = np.concatenate([layer, filt], 1)
    patterns, which, counts = np.unique(gates, axis=0, return_inverse=True, return_counts=True)
    which = which.reshape(-1)
    if len(patterns) >= 5:
        centres = TSNE(2, perplexity=min(30.0, (len(patterns) - 1) / 3), init="random",
                       random_state=seed).fit_transform(patterns)
    else:  # too few for t-SNE: the distinct sets on a circle
        angles = 2 * np.pi * np.arange(len(patterns)) / len(patterns)
        centres = 10 * np.stack([np.cos(angles), np.sin(angles)], 1)
    spread = 0.08 * max(np.ptp(centres, 0).max(), 1.0) / np.sqrt(max(counts.max(), 1))
    rng = np.random.default_rng(seed)
    radius = spread * np.sqrt(counts[which]) * np.sqrt(rng.random(n))
    angle = 2 * np.pi * rng.random(n)
    xy = centres[which] + np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)

    fig, (ax, side) = plt.subplots(1, 2, figsize=(13, 7), width_ratios=[2.2, 1], layout="constrained")
    side.axis("off")
    top = 1.0
    if expr_types is not None:
        for k, t in enumerate(sorted(set(expr_types))):
            mask = np.array([e == t for e in expr_types])
            ax.scatter(*xy[mask].T, s=8, alpha=0.6, color=plt.cm.tab10(k % 10), label=f"{t} ({mask.sum()})")
        legend = side.legend(*ax.get_legend_handles_labels(), title="expression type", fontsize=8, markerscale=2,
                             loc="upper left", bbox_to_anchor=(0, 1))
        fig.canvas.draw()
        top = side.transAxes.inverted().transform(legend.get_window_extent(fig.canvas.get_renderer()).p0)[1] - 0.04
    else:
        ax.scatter(*xy.T, s=8, alpha=0.6, color="#4c72b0")
    km = KMeans(min(regions, len(patterns), n), n_init=4, random_state=seed).fit(xy)
    labelled, numbers, captions = {}, [], []
    for r, centre in enumerate(km.cluster_centers_):
        nearest = np.argsort(((xy - centre) ** 2).sum(1))
        samples = list(dict.fromkeys(expressions[j] for j in nearest[:12]))[:3]
        labelled[f"region {r + 1}"] = samples
        numbers.append(ax.text(*centre, f"{r + 1}", fontsize=9, fontweight="bold", ha="center", va="center",
                               bbox=dict(boxstyle="circle", fc="white", ec="grey", alpha=0.9)))
        size = int((km.labels_ == r).sum())
        captions.append(f"({r + 1}) {size} expressions\n" + "\n".join("   " + textwrap.shorten(e, 44) for e in samples))
    side.text(0, top, "regions:\n\n" + "\n\n".join(captions), va="top", ha="left", fontsize=8,
              transform=side.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Fig. 5  t-SNE of the gate sets ({n} expressions, {len(patterns)} distinct, "
                 f"{gates.shape[1]} gates each)", fontsize=10)
    _declutter(fig, ax, numbers)
    return fig, labelled


def _declutter(fig, ax, texts) -> None:
    """Move texts up, one height at a time, until none covers another (display coordinates)."""
    renderer = fig.canvas.get_renderer()
    done = []
    for text in texts:
        for _ in range(50):
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in done):
                break
            x, y = ax.transData.transform(text.get_position())
            text.set_position(ax.transData.inverted().transform((x, y + box.height * 1.1)))
        done.append(text.get_window_extent(renderer))


def subnet_drawings(layer, filt, expressions, layout, path: Path) -> Path:
    """Fig. 6: one row per expression: 16 bottlenecks, then the MHSA/FFN sublayers; kept blocks
    coloured (bottlenecks by stage), skipped grey; the filters kept written in each bottleneck."""
    runs = layout.runs(layer)
    kept = layout.filters_kept(layer, filt)
    k, p = len(layout.candidates), layout.num_visual
    fig, ax = plt.subplots(figsize=(max(10, 0.62 * k), 1.1 * len(expressions) + 0.8))
    for row, expression in enumerate(expressions):
        y = -row * 1.1
        ax.text(-0.3, y + 0.9, f"“{expression}”  ({int(runs[row, :p].sum())} + {int(runs[row, p:].sum())} layers)",
                fontsize=9, va="bottom")
        for i, c in enumerate(layout.candidates):
            x = i + (0.6 if i >= p else 0)
            on = runs[row, i] > 0
            if i < p:
                colour = STAGE_COLOURS[_stage(c.name)] if on else SKIPPED
                label = f"{int(kept[row, i])}" if on else ""
            else:
                colour = (ATTN_COLOUR if c.name.endswith("attn") else FFN_COLOUR) if on else SKIPPED
                label = ("A" if c.name.endswith("attn") else "F") if on else ""
            ax.add_patch(Rectangle((x, y), 0.9, 0.8, color=colour, ec="black" if not c.layer_gate else None))
            ax.text(x + 0.45, y + 0.4, label, ha="center", va="center", fontsize=7, color="white")
    bottom = -(len(expressions) - 1) * 1.1 - 0.1
    for i, c in enumerate(layout.candidates[:p]):
        ax.text(i + 0.45, bottom, c.name.removeprefix("layer"), ha="center", va="top", fontsize=7)
    ax.set_xlim(-0.4, k + 1)
    ax.set_ylim(bottom - 0.5, 1.4)
    ax.axis("off")
    ax.set_title("Fig. 6  Subnets: bottlenecks (filters kept written in; outlined: projection blocks, "
                 "always run), then interaction sublayers (A = MHSA, F = FFN); grey = skipped", fontsize=9)
    return _save(fig, path)


def word_clouds(visual: dict, interaction: dict, path: Path, seed: int = 0) -> Path:
    """Fig. 7: words assigned to the visual backbone (left) and the interaction module (right)."""
    from wordcloud import WordCloud

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, weights, title, cmap in ((axes[0], visual, "visual backbone", "Blues"),
                                     (axes[1], interaction, "modality interaction module", "Oranges")):
        ax.axis("off")
        ax.set_title(title)
        if not weights:
            ax.text(0.5, 0.5, "no word", ha="center", va="center")
            continue
        cloud = WordCloud(width=560, height=360, background_color="white", colormap=cmap,
                          random_state=seed, prefer_horizontal=0.9, margin=8).generate_from_frequencies(weights)
        ax.imshow(cloud.to_array(), interpolation="bilinear")
    fig.suptitle("Fig. 7  Words assigned to the visual backbone and the interaction module")
    return _save(fig, path)
