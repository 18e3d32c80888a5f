"""One self-contained HTML page: the figures embedded as base64 PNGs, the key numbers, notes."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CAPTIONS = {
    "fig4a": "Selection rate of every filter, per bottleneck (filters sorted by rate).",
    "fig4b": "Selection rate of every layer; projection blocks have no gate and always run.",
    "fig4c": "Number of selected layers per expression, visual backbone and interaction module.",
    "fig4d": "Number of selected filters per expression in the first block of each stage.",
    "fig5": "t-SNE of the gate sets; labelled regions show expressions near k-means centres.",
    "fig6": "Subnets of a few expressions (one per expression type, or the most different ones).",
    "fig7": "Words assigned to the visual backbone (left) and the interaction module (right).",
}


# What the paper reports for its subnets on ReferIt test (Fig. 4 and its text), beside each row of
# ``dynamicity_table``; the paper prints no FLOPs spread.
PAPER = {
    "layers_varying": "nearly all (Fig. 4b)",
    "layers_never": "0",
    "layers_always": "–",
    "filters_varying_fraction": "almost all (Fig. 4a)",
    "filters_never_fraction": '0 ("no never-selected filter")',
    "flops": "–",
    "visual": "8 of 16 on average, 4 at least",
    "interaction": "10 of 12 on average, 6 at least",
}


def dynamicity_table(columns: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the dynamicity numbers (``stats.dynamicity``) of one or more models,
    ``columns``: name -> ``gate_statistics`` dict, with the paper's figures in the last column."""
    def flops(d):
        f = d["flops"]
        return f"{f['mean']:.2f} ± {f['std']:.2f} ({f['min']:.2f}–{f['max']:.2f})"

    def kept(s, part):
        k = s["layers_kept"][part]
        return f"{k['mean']:.1f} of {_total(s, part)} on average, {k['min']:.0f} at least"

    rows = [
        ["gated layers varying (selected for 10–90 % of expressions)", "layers_varying",
         lambda d: str(d["layers_varying"])],
        ["gated layers never selected", "layers_never", lambda d: str(d["layers_never"])],
        ["gated layers always selected", "layers_always", lambda d: str(d["layers_always"])],
        ["filters varying (5–95 %)", "filters_varying_fraction", lambda d: f"{d['filters_varying_fraction']:.3f}"],
        ["filters never selected", "filters_never_fraction", lambda d: f"{d['filters_never_fraction']:.3f}"],
        ["FLOPs kept per expression: mean ± std (min–max)", "flops", flops],
    ]
    body = [[label, *(fn(s["dynamicity"]) for s in columns.values()), PAPER[key]] for label, key, fn in rows
            if all(key in s["dynamicity"] for s in columns.values())]
    body += [[f"{part} layers run", *(kept(s, part) for s in columns.values()), PAPER[part]]
             for part in ("visual", "interaction")]
    return ["", *columns, "paper (ReferIt test)"], body


def _total(stats: dict, part: str) -> int:
    """Bottlenecks (``visual``) or fusion sublayers (``interaction``) of the model."""
    gated = sum(1 for name in stats["layer_selection_rate"] if name.startswith("fusion.") == (part == "interaction"))
    return gated + (len(stats["always_run_layers"]) if part == "visual" else 0)


def markdown(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(path: Path, stats: dict, figures: dict[str, Path], notes: list[str], title: str,
                 warning: str | None = None) -> Path:
    """``figures``: key (``fig4a`` …) -> PNG; keys missing from it are skipped figures; ``warning``
    comes first, under the title."""
    s = stats
    sub = s["subnet"]
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *([f'<p class="note"><b>{html.escape(warning)}</b></p>'] if warning else []),
        f"<p>{s['expressions']} expressions. Mean subnet: {sub['visual_layers_kept']:.1f} visual layers, "
        f"{sub['interaction_layers_kept']:.1f} interaction sublayers, {sub['filters_kept']:.0f} filters"
        + (f", {100 * sub['flops_fraction']:.1f}% of the dense FLOPs" if "flops_fraction" in sub else "")
        + ".</p>",
    ]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    never, always = s["never_selected"], s["always_selected"]
    parts.append(_table(
        [["never selected", never["num_layers"], never["num_filters"]],
         ["always selected", always["num_layers"], always["num_filters"]]],
        ["", "layers (of those with a gate)", "filters"],
    ))
    header, rows = dynamicity_table({"this model": s})
    parts += ["<h2>Do the subnets follow the expression?</h2>", _table(rows, header)]
    if "dynamicity_by_type" in s:
        keys = ["layers_varying", "layers_never", "filters_varying_fraction", "filters_never_fraction"]
        parts.append(_table(
            [[t, *(d[k] for k in keys),
              *([f"{d['flops']['mean']:.3f} ± {d['flops']['std']:.3f}"] if "flops" in d else [])]
             for t, d in s["dynamicity_by_type"].items()],
            ["type", *keys, *(["flops"] if "flops" in s["dynamicity"] else [])],
        ))
    if "by_type" in s:
        keys = [k for k in ("layers_kept", "filters_kept", "flops_fraction") if k in sub]
        parts += ["<h2>Subnet size per expression type</h2>", _table(
            [[t, v["expressions"], *(f"{v[k]:.3f}" if k == "flops_fraction" else f"{v[k]:.1f}" for k in keys)]
             for t, v in s["by_type"].items()],
            ["type", "expressions", *keys],
        )]
    for key, caption in CAPTIONS.items():
        if key in figures:
            parts.append(f"<figure>{_image(figures[key])}<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
             ".note{background:#fff3cd;padding:6px}figcaption{color:#555}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path
