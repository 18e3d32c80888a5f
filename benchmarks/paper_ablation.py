"""What each training means of the paper's recipe buys, at one budget (docs/design.md §5e).

The recipe is ``lads demo --config tiny-paper``: stage 1 dense with the token head as a
training-only teacher, stage 1b dense with Eq. 9 alone, stage 2 LADS from it; the evaluated model
is the paper's (the ``[CLS]`` head, Eq. 5's hard gates). Each arm changes one thing and keeps the
number of training steps (tiny-paper's: 3,036 of 32 after the pre-training):

- ``exact``: no token teacher in stage 1, so Eq. 9 as written in every stage;
- ``layerdrop``: stage 1 with ``tiny``'s LayerDrop (the recipe dropped it at ceac671);
- ``no-eq9-stage``: the gates join straight after stage 1 (stage 2 takes stage 1b's steps too).

Every arm is a whole ``lads demo`` run in ``--work/<arm>`` that starts from the recipe arm's data
and pre-trained backbone (linked), and from its stage 1 where the arm keeps stage 1, so that only
what the arm names differs. ``--recipe`` may name a finished run of the recipe (e.g. a fresh
clone's ``runs/paper``) to serve as the recipe arm. A rerun skips what finished; two processes
with different ``--arms`` share the machine's cores (``--set train.threads=1``); ``--arms`` with
no name only writes the table::

    python benchmarks/paper_ablation.py --work runs/paper-ablation --set train.threads=1 \\
        --out benchmarks/results/paper-ablation/<machine>-<date>-<commit>

Writes ``ablation.md``, ``ablation.json`` and ``curves.png`` (val Prec@0.5 of the `[CLS]` head
against samples seen: stages 1b and 2 of each arm, and stage 1 too for ``exact``, whose every
stage trains Eq. 9 as written) to ``--out``, from the arms that finished.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lads.analysis.curves import plot_curves
from lads.config import DemoConfig, load_config
from lads.demo import run_demo
from lads.util.checkpoint import read_meta

STAGES = ("shared", "eq9", "lads")  # the recipe's run folders: stage 1, 1b, 2
ARMS = {  # name: (what it takes away, its overrides given the recipe's demo config, the stages it reuses)
    "recipe": ("nothing (the recipe)", lambda demo: [], ()),
    "exact": ("the token teacher in stage 1: Eq. 9 as written throughout",
              lambda demo: ["demo.shared_overrides=[]"], ()),
    "layerdrop": ("nothing: adds tiny's LayerDrop to stage 1",
                  lambda demo: [f"demo.layer_drop_fusion={DemoConfig().layer_drop_fusion}"], ()),
    "no-eq9-stage": ("the dense Eq. 9 stage: the gates join after stage 1, for its steps too",
                     lambda demo: ["demo.cls_steps=0", f"demo.steps={demo.cls_steps + demo.steps}",
                                   f"demo.minutes={demo.cls_minutes + demo.minutes}"], ("shared",)),
}


def prepare(work: Path, recipe: Path, arm: str) -> Path:
    """``work/arm`` with the recipe arm's data, pre-training and reused stages linked in."""
    out = work / arm
    out.mkdir(parents=True, exist_ok=True)
    for name in ("data", "pretrain", *ARMS[arm][2]):
        link = out / name
        if not link.exists():
            os.symlink((recipe / name).resolve(), link)
    return out


def summary(out: Path) -> dict:
    """Test and heldout Prec@0.5 of LADS and of the dense Eq. 9 stage (where the arm has one),
    FLOPs kept, and the last val figure of each stage, from one arm's run."""
    rows = {r["name"]: r["splits"] for r in json.loads((out / "results.json").read_text())}
    lads = next(v for k, v in rows.items() if k.startswith("LADS"))
    dense = next((v for k, v in rows.items() if k.startswith("dense")), None)
    last_val = {}
    for stage in STAGES:
        log = out / stage / "log.jsonl"
        if log.exists():
            vals = [r for r in map(json.loads, log.read_text().splitlines()) if "val/prec@0.5" in r]
            if vals:
                last_val[stage] = (vals[-1]["step"], round(vals[-1]["val/prec@0.5"], 2))
    return {"test": round(lads["test"]["prec@0.5"], 2), "heldout": round(lads["heldout"]["prec@0.5"], 2),
            "flops_kept": round(lads["test"]["flops_kept"], 3),
            "dense_eq9_test": round(dense["test"]["prec@0.5"], 2) if dense else None, "last_val": last_val}


def report(work: Path, out: Path, batch: int) -> None:
    done = {arm: summary(work / arm) for arm in ARMS if (work / arm / "results.json").exists()}
    if not done:
        raise SystemExit(f"{work}: no arm has finished; nothing to tabulate")
    lines = ["# The paper's recipe, one means at a time", "",
             "`lads demo --config tiny-paper`, each arm taking one means away at the same steps "
             "(benchmarks/paper_ablation.py). LADS with the paper's `[CLS]` head, extracted subnets; "
             "Prec@0.5 (%); last val of each stage (at its step).", "",
             "| arm | takes away | LADS test | heldout | FLOPs kept | dense Eq. 9 stage, test | "
             "val: stage 1 / 1b / 2 |", "|---|---|---|---|---|---|---|"]
    for arm, s in done.items():
        val = " / ".join(f"{v} ({step})" for step, v in (s["last_val"].get(k, ("–", "–")) for k in STAGES))
        dense = s["dense_eq9_test"] if s["dense_eq9_test"] is not None else "–"
        flops = f"{100 * s['flops_kept']:.0f} %"
        lines.append(f"| {arm} | {ARMS[arm][0]} | {s['test']:.2f} | {s['heldout']:.2f} | {flops} | {dense} | {val} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(done, indent=2))
    logs = {}
    for arm in done:  # each stage shifted by the samples seen before it
        seen = 0.0
        for stage, label in zip(STAGES, ("1", "1b", "LADS")):
            log = work / arm / stage / "log.jsonl"
            if log.exists():
                logs[f"{arm}: {label}"] = (log, seen)
                _, config, meta = read_meta(work / arm / stage / "checkpoint")
                seen += meta["step"] * config["train"]["batch_size"] / 1000
    shown = {k: v for k, v in logs.items() if not k.endswith(": 1") or k.startswith("exact:")}
    colours = {k: list(done).index(k.split(":")[0]) for k in shown}
    plot_curves(shown, out / "curves.png", title="tiny-paper, one means at a time: val Prec@0.5", batch=batch,
                colours=colours)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/paper-ablation", help="where the arms' runs go")
    parser.add_argument("--recipe", help="a finished run of the recipe to serve as the recipe arm")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                        help="the arms to run (default: all; none: only the table, from the arms that finished)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="on top of every arm")
    parser.add_argument("--out", required=True, help="where the table and the curves go")
    args = parser.parse_args()
    work = Path(args.work)
    recipe = Path(args.recipe) if args.recipe else work / "recipe"
    if args.recipe and not (work / "recipe").exists():
        work.mkdir(parents=True, exist_ok=True)
        os.symlink(recipe.resolve(), work / "recipe")
    cfg = load_config("tiny-paper", args.set)
    for arm in args.arms:
        if arm == "recipe" and args.recipe:
            continue
        if arm != "recipe" and not (recipe / "pretrain" / "meta.json").exists():
            raise SystemExit(f"{recipe}: no finished pre-training; run the recipe arm first, or pass --recipe")
        out = work / arm if arm == "recipe" else prepare(work, recipe, arm)
        run_demo("tiny-paper", [*args.set, *ARMS[arm][1](cfg.demo)], out=out)
    report(work, Path(args.out), cfg.train.batch_size)


if __name__ == "__main__":
    main()
