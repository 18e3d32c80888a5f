"""Do the subnets follow the expression? Stage-2 arms from one stage-1 checkpoint, on val
(docs/design.md §5c; issue: LADS against its static control).

Every arm trains stage 2 of the demo (``lads.demo.stage2_overrides``: the same steps,
warm-up and learning-rate drop) from the same stage-1 weights, with the overrides it names, then
is evaluated on ``--split`` (extracted subnets, Prec@0.5 of the inference head, per expression
type) and its subnets counted there (``stats.dynamicity``: layers varying, never selected,
filters varying, FLOPs mean and spread).

    python benchmarks/adaptive.py --demo runs/demo --arms lads static dense mi3 \\
        --set demo.minutes=30 \\
        --out benchmarks/results/adaptive/<machine>-<date>-<commit>

``--demo`` is a finished (or at least stage-1-finished) demo folder: its data, pre-trained
backbone and stage-1 checkpoint. Each arm keeps the demo's cap in minutes (``demo.minutes``): raise it
(``--set demo.minutes=30``) so that every arm trains its steps; the table gives the steps each
arm reached and marks an arm the cap stopped. Runs go to ``--work`` (default ``runs/adaptive``); a rerun skips
the arms whose run finished. Writes ``adaptive.md`` and ``adaptive.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from lads.analysis.collect import subnet_statistics
from lads.analysis.stats import VARYING_FILTERS, VARYING_LAYERS
from lads.config import load_config
from lads.datasets import load_records
from lads.demo import STAGE2, stage2_overrides
from lads.engine import train
from lads.evaluation import evaluate_checkpoints
from lads.models import LADS
from lads.util.checkpoint import read_meta
from lads.util.dist import device_name, local_device

ARMS = {  # name: (what it is, overrides on top of stage 2's)
    "lads": ("LADS, tiny as it is", STAGE2["lads"][1]),
    "static": ("static control", STAGE2["static"][1]),
    "dense": ("dense baseline", STAGE2["dense"][1]),
    "mi1": ("LADS, λ_mi 1", [*STAGE2["lads"][1], "model.loss.mi=1"]),
    "mi3": ("LADS, λ_mi 3", [*STAGE2["lads"][1], "model.loss.mi=3"]),
}


def define_arms(specs: list[list[str]]) -> None:
    """Adds to ``ARMS`` the arms of ``--arm``: each a name, the arm it builds on and overrides."""
    for spec in specs:
        if len(spec) < 2:
            raise ValueError(f"--arm {' '.join(spec)}: give a name and the arm it builds on")
        name, base, *more = spec
        if base not in ARMS:
            raise ValueError(f"--arm {name}: no arm {base!r} to build on (one of {', '.join(ARMS)})")
        if name in ARMS:
            raise ValueError(f"--arm {name}: an arm of that name exists already")
        ARMS[name] = (f"{ARMS[base][0]}, {', '.join(more) or 'as it is'}", [*ARMS[base][1], *more])


def run_arm(name: str, overrides: list[str], args) -> Path:
    run = Path(args.work) / name
    meta = run / "checkpoint" / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("reason") in ("time budget", "finished"):
        print(f"{name}: done already ({run})")
        return run / "checkpoint"
    demo = Path(args.demo)
    base = [*args.set, f"data.path={demo / 'data'}",
            f"model.visual.pretrained={demo / 'pretrain' / 'visual.safetensors'}"]
    cfg = load_config("tiny", [*stage2_overrides(base, load_config("tiny", args.set).demo,
                                                 demo / "shared" / "checkpoint"), *overrides, f"train.out={run}"])
    return train(cfg, resume=str(run) if (run / "checkpoint").exists() else None)


def measure(name: str, checkpoint: Path, args) -> dict:
    row = evaluate_checkpoints([checkpoint], str(Path(args.demo) / "data"), [args.split])[0]
    result = row["splits"][args.split]
    _, _, meta = read_meta(checkpoint)
    out = {"arm": name, "what": ARMS[name][0], "steps": meta["step"], "stopped": meta["reason"],
           "prec@0.5": result["prec@0.5"], "by_type": result.get("prec@0.5_by_type", {}),
           "flops_kept": result["flops_kept"]}
    model = LADS.from_pretrained(checkpoint)
    if model.gating is not None:
        records, _ = load_records(Path(args.demo) / "data", args.split)
        stats, _ = subnet_statistics(model, [r.expression for r in records], [r.expr_type for r in records],
                                     progress=False)
        out["dynamicity"] = stats["dynamicity"]
        out["flops_by_type"] = {t: d["flops"]["mean"] for t, d in stats["dynamicity_by_type"].items()}
    return out


def markdown(rows: list[dict], split: str) -> str:
    types = sorted({t for r in rows for t in r["by_type"]})
    lines = [f"| arm | steps | {split} Prec@0.5 | " + " | ".join(types) + " | layers varying | never "
             "| filters varying | filters never | FLOPs mean ± std | FLOPs by type |",
             "|---|---|---|" + "---|" * len(types) + "---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("dynamicity")
        dyn = (f"{d['layers_varying']} | {d['layers_never']} | {d['filters_varying_fraction']:.2f} | "
               f"{d['filters_never_fraction']:.3f} | {d['flops']['mean']:.2f} ± {d['flops']['std']:.2f} | "
               + " / ".join(f"{r['flops_by_type'][t]:.2f}" for t in types)) if d else "– | – | – | – | 1.00 | –"
        steps = f"{r['steps']}{' (time cap)' if r['stopped'] == 'time budget' else ''}" if "steps" in r else "–"
        lines.append(f"| {r['what']} | {steps} | {r['prec@0.5']:.2f} | "
                     + " | ".join(f"{r['by_type'].get(t, 0):.1f}" for t in types)
                     + f" | {dyn} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a demo folder with stage 1 finished")
    parser.add_argument("--arms", nargs="*", choices=list(ARMS),
                        help="arms defined here (default: all of them, or none where --arm is given)")
    parser.add_argument("--arm", nargs="+", action="append", default=[], metavar=("NAME BASE", "KEY=VALUE"),
                        help="one more arm: its name, the arm it builds on and its overrides "
                             "(e.g. --arm mi3-frozen-bn mi3 model.visual.norm=frozen); repeatable")
    parser.add_argument("--split", default="val")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every arm (e.g. demo.steps=360)")
    parser.add_argument("--work", default="runs/adaptive")
    parser.add_argument("--out", default="benchmarks/results/adaptive/latest",
                        help="folder for adaptive.md and adaptive.json "
                             "(benchmarks/results/adaptive/MACHINE-DATE-COMMIT)")
    args = parser.parse_args()
    if args.arms is None:
        args.arms = [] if args.arm else list(ARMS)
    try:
        define_arms(args.arm)
    except ValueError as e:
        parser.error(str(e))
    rows = []
    for name in [*args.arms, *(a[0] for a in args.arm)]:
        rows.append(measure(name, run_arm(name, ARMS[name][1], args), args))
        print(markdown(rows, args.split), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(local_device()), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "split": args.split, "set": args.set,
            "varying_bounds": {"layers": VARYING_LAYERS, "filters": VARYING_FILTERS}}
    (out / "adaptive.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "adaptive.md").write_text(
        f"Stage-2 arms from `{args.demo}`'s stage 1, {args.split} split, {meta['device']}, "
        f"{meta['threads']} threads; overrides {args.set or 'none'}.\n\n" + markdown(rows, args.split) + "\n")


if __name__ == "__main__":
    main()
