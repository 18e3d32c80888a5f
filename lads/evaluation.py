"""Evaluation of checkpoints into rows like the paper's Table 1 (Prec@0.5 per split, time per
expression, subnet sizes), as markdown and JSON; beside ``lads.engine``, whose ``evaluate`` scores
one model on one split. ``lads eval`` is its command.
"""

from __future__ import annotations

from pathlib import Path

from lads.models.provenance import OVERLAP_WARNING


def evaluate_checkpoints(checkpoints, data=None, splits=None, mode="subnet", batch_size=32,
                         dtype="fp32") -> list[dict]:
    """One row per checkpoint: {name, mode, device, dtype, splits: {split: summary}}; ``dtype``
    fp32, or bf16/fp16 autocast."""
    import torch

    from lads.engine import evaluate, load_split
    from lads.models.pretrained import load_model
    from lads.models.text import load_tokenizer
    from lads.util import dist
    from lads.util.amp import DTYPES

    device = dist.local_device()
    dist.init_distributed(device)
    rows = []
    for ckpt in checkpoints:
        model, cfg = load_model(ckpt, device)
        if data:
            cfg.data.path = data
        tokenizer = load_tokenizer(model.config.text.name)
        results = {}
        for split in splits or cfg.data.eval_splits:
            dataset = load_split(cfg, split, False, tokenizer)
            results[split] = evaluate(model, dataset, batch_size, mode if not cfg.model.dense else "dense",
                                      amp=DTYPES[dtype])
        run = Path(ckpt).parent if Path(ckpt).name == "checkpoint" else Path(ckpt)
        kind = "dense" if cfg.model.dense else "static control" if cfg.model.gating.static else "LADS"
        name = f"{kind} ({run.name})"
        rows.append({"name": name, "checkpoint": str(ckpt), "mode": mode, "device": dist.device_name(device),
                     "warning": OVERLAP_WARNING if cfg.model.visual.allow_eval_overlap else None,
                     "dtype": "float32" if dtype == "fp32" else f"{dtype} autocast",
                     "threads": torch.get_num_threads(), "splits": results})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Rows of models, columns of splits (Prec@0.5), then time and subnet size; a model with a
    second head (docs/design.md §5a) gets a second row with the paper's [CLS] head. The first line
    names the models whose starting weights saw evaluation images (design §4a), if any."""
    splits = list(dict.fromkeys(s for r in rows for s in r["splits"]))
    head = ["Method", *splits, "Time (ms)", "Layers kept", "Filters kept", "FLOPs kept"]
    overlapping = [r["name"] for r in rows if r.get("warning")]
    lines = [f"**Warning: {', '.join(overlapping)} {OVERLAP_WARNING}.**", ""] if overlapping else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["splits"]
        n = sum(v["expressions"] for v in res.values())
        mean = lambda key: sum(v[key] * v["expressions"] for v in res.values()) / max(n, 1)  # noqa: E731
        size = [f"{mean('ms_per_expression'):.1f}", f"{mean('layers_kept'):.1f}", f"{mean('filters_kept'):.0f}",
                f"{100 * mean('flops_kept'):.0f} %"]
        heads = {h for v in res.values() for h in v.get("prec@0.5_by_head", {})}
        two_heads = len(heads) > 1
        name = r["name"] + (", token head" if two_heads else ", [CLS] head (paper)" if heads == {"cls"} else "")
        lines.append("| " + " | ".join([name, *(f"{res[s]['prec@0.5']:.2f}" if s in res else "–" for s in splits),
                                        *size]) + " |")
        if two_heads:
            cls = [f"{res[s]['prec@0.5_by_head']['cls']:.2f}" if s in res else "–" for s in splits]
            lines.append("| " + " | ".join([r["name"] + ", [CLS] head (paper)", *cls, *size]) + " |")
    r0 = rows[0]
    lines.append("")
    lines.append(f"Prec@0.5 (%), IoU ≥ 0.5 in original image pixels. Time: mean per expression over the split, "
                 f"batch of the evaluation, mode {r0['mode']}, on {r0['device']}, {r0['dtype']}, "
                 f"{r0['threads']} threads. FLOPs kept: of the dense network's, per expression, averaged.")
    return "\n".join(lines)
