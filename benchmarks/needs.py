"""Do the expression types need different parts of the network? Every gated layer of a checkpoint
skipped in turn, Prec@0.5 per expression type (docs/design.md §5c).

    python benchmarks/needs.py --checkpoint runs/demo/dense/checkpoint --split val \\
        --out benchmarks/results/needs/<machine>-<date>-<commit>

A subnet per expression can only beat one subnet for all (the static control) where the
expressions differ in what they need. This measures that on a trained network, before any
gating: for each gated layer (a bottleneck with an identity residual, a fusion sublayer), the
whole split with that layer's gate closed for every expression and every other gate open, and
the drop of Prec@0.5 (inference head) from the whole network's, overall and per expression type.
Types that need the same layers have drop profiles that rise and fall together: the table ends
with the correlation of every two types' profiles, and with each type's cheapest layer against
the cheapest for all expressions. Writes ``needs.md``, ``needs.json`` and ``needs.png`` (the drops
as a heat map) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lads.datasets.dataset import collate
from lads.datasets.transforms import box_to_original
from lads.engine import load_split, to_device
from lads.models.gating import Gates
from lads.models.losses import expected_flops
from lads.models.pretrained import load_model
from lads.models.text import load_tokenizer
from lads.util.box_ops import box_iou
from lads.util.dist import device_name, local_device


def skip_one(model, batch: int, device) -> list[tuple[str, Gates]]:
    """(name, gates): every gate open (the whole network, whatever a gating network would say),
    then each gated layer closed alone."""
    layout = model.layout
    arms = []
    for slot in [None, *range(layout.num_layer_gates)]:
        layer = torch.ones(batch, layout.num_layer_gates, device=device)
        if slot is not None:
            layer[:, slot] = 0
        name = "whole network" if slot is None else layout.names[layout.layer_owner[slot]]
        arms.append((name, Gates(layer, torch.ones(batch, layout.num_filter_gates, device=device))))
    return arms


@torch.no_grad()
def correct_by_arm(model, dataset, batch_size: int = 64) -> tuple[list[str], np.ndarray, list[str], list[float]]:
    """Arm names, a (arms, expressions) 0/1 array of Prec@0.5 hits, each expression's type and
    each arm's FLOPs as a fraction of the whole network's (at 10 tokens)."""
    device = next(model.parameters()).device
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    hits, types, names, flops = [], [], None, None
    for batch in loader:
        batch = to_device(batch, device)
        arms = skip_one(model, len(batch["meta"]), device)
        if names is None:
            names = [name for name, _ in arms]
            flops = [expected_flops(gates.map(lambda g: g[:1].float().cpu()), model.layout, model.gate_costs(10)).item()
                     for _, gates in arms]
        text, text_mask = model.encode_text(batch["input_ids"], batch["attention_mask"])  # once for every arm
        rows = []
        for _, gates in arms:
            boxes = model.ground(batch["image"], batch["pixel_mask"], text, text_mask, gates)["boxes"]
            rows.append([box_iou(box_to_original(boxes[j].float().cpu(), meta),
                                 torch.tensor(meta["record"].box, dtype=torch.float32)).item() >= 0.5
                         for j, meta in enumerate(batch["meta"])])
        hits.append(np.array(rows))
        types += [meta["record"].expr_type or "untyped" for meta in batch["meta"]]
    return names, np.concatenate(hits, 1).astype(float), types, flops


def summarise(names, hits, types, flops) -> dict:
    """Prec@0.5 per arm overall and per type, drops from the whole network, the correlation of
    the types' drop profiles over the skipped layers, and each type's cheapest layer."""
    kinds = sorted(set(types))
    types = np.array(types)
    prec = {"all": 100 * hits.mean(1)}
    prec.update({t: 100 * hits[:, types == t].mean(1) for t in kinds})
    drops = {k: (v[0] - v[1:]) for k, v in prec.items()}
    layers = names[1:]
    cheapest_all = int(np.argmin(drops["all"]))
    return {
        "layers": [{"layer": name, "flops": flops[i + 1], "prec@0.5": {k: v[i + 1] for k, v in prec.items()},
                    "drop": {k: v[i] for k, v in drops.items()}} for i, name in enumerate(layers)],
        "whole": {k: v[0] for k, v in prec.items()},
        "counts": {t: int((types == t).sum()) for t in kinds},
        "correlation": {a: {b: float(np.corrcoef(drops[a], drops[b])[0, 1]) for b in kinds} for a in kinds},
        "cheapest": {t: {"layer": layers[int(np.argmin(drops[t]))], "drop": float(drops[t].min()),
                         "drop_of_cheapest_for_all": float(drops[t][cheapest_all])} for t in kinds},
        "cheapest_for_all": layers[cheapest_all],
    }


def markdown(result: dict) -> str:
    kinds = list(result["counts"])
    head = "| layer skipped | FLOPs kept | all | " + " | ".join(kinds) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(kinds),
             "| none: Prec@0.5 | 1.00 | " + " | ".join(f"{result['whole'][k]:.1f}" for k in ["all", *kinds]) + " |"]
    for row in result["layers"]:
        lines.append(f"| {row['layer']} | {row['flops']:.2f} | "
                     + " | ".join(f"{row['drop'][k]:+.1f}" for k in ["all", *kinds]) + " |")
    lines += ["", "Drops are points of Prec@0.5 lost by skipping the layer. Correlation of the types' "
              "drop profiles over the skipped layers:", "",
              "| | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for a in kinds:
        lines.append(f"| {a} | " + " | ".join(f"{result['correlation'][a][b]:.2f}" for b in kinds) + " |")
    lines += ["", f"The layer cheapest to skip for all expressions: {result['cheapest_for_all']}.", "",
              "| type | expressions | its cheapest layer | drop | drop of the cheapest for all |",
              "|---|---|---|---|---|"]
    for t in kinds:
        c = result["cheapest"][t]
        lines.append(f"| {t} | {result['counts'][t]} | {c['layer']} | {c['drop']:+.1f} | "
                     f"{c['drop_of_cheapest_for_all']:+.1f} |")
    return "\n".join(lines)


def heat_map(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["all", *result["counts"]]
    drops = np.array([[row["drop"][k] for k in kinds] for row in result["layers"]])
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2.5, 0.3 * len(drops) + 1.5))
    image = ax.imshow(drops, cmap="Reds", aspect="auto", vmin=min(0.0, drops.min()))
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(drops)), [row["layer"] for row in result["layers"]])
    fig.colorbar(image, ax=ax, label="Prec@0.5 lost (points)")
    ax.set_title("Each gated layer skipped alone")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a trained checkpoint (dense or gated: its gates are forced)")
    parser.add_argument("--data", help="the dataset folder (default: the checkpoint's)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/needs/latest")
    args = parser.parse_args()
    model, cfg = load_model(args.checkpoint, local_device())
    if args.data:
        cfg.data.path = args.data
    dataset = load_split(cfg, args.split, False, load_tokenizer(model.config.text.name))
    result = summarise(*correct_by_arm(model, dataset, args.batch_size))
    result["meta"] = {"checkpoint": args.checkpoint, "split": args.split, "device": device_name(local_device()),
                      "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "needs.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "needs.md").write_text(f"`{args.checkpoint}`, {args.split} split, {result['meta']['device']}.\n\n{table}\n")
    heat_map(result, out / "needs.png")
    print(table)


if __name__ == "__main__":
    main()
