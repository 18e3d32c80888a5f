"""``lads demo``: the main job on the embedded default, the synthetic REC benchmark.

Generate the benchmark, pre-train the visual backbone on its boxes (``lads pretrain``, the role
of the paper's DETR weights), train with the ``tiny`` preset in two stages (docs/design.md §5a):
the dense network first, once, for both models (with LayerDrop on its fusion sublayers, so that
the subnets LADS cuts start from weights that work without some of them); then, from it and for
the same steps each, LADS (the gating network joins) and the dense baseline; every stage has a
cap in minutes as well. Evaluate both on the test and held-out-combination splits, run
``predict`` on a few test images, draw what the subnets do (``lads analyze``) and the learning
curves, and write a report. A rerun reuses what is done and resumes what is not; SIGINT/SIGTERM
stops the whole demo after the running stage's checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SPLITS = ["test", "heldout"]
STEPS = 9


def add_arguments(parser):
    from lads.commands import add_config_arguments

    add_config_arguments(parser, data=False)
    parser.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic benchmark (default: 0)")


def run(args):
    from lads.config import load_config
    from lads.datasets import synth
    from lads.commands.evaluate import evaluate_checkpoints, markdown_table
    from lads.commands.pretrain import WEIGHTS, pretrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    demo = load_config(args.config, args.overrides).demo
    data = out / "data"
    if not (data / "instances.json").exists():
        print(f"[1/{STEPS}] generating the synthetic benchmark ({demo.images} images) in {data}")
        synth.generate(data, seed=args.seed, images=demo.images)
    else:
        print(f"[1/{STEPS}] reusing the synthetic benchmark in {data}")
    visual = out / "pretrain" / WEIGHTS
    if not (out / "pretrain" / "meta.json").exists():
        print(f"[2/{STEPS}] pre-training the visual backbone on the boxes of the training images, in {visual.parent}")
        pretrain(load_config(args.config, [*args.overrides, f"data.path={data}", f"pretrain.out={visual.parent}"]))
    else:
        print(f"[2/{STEPS}] reusing the pre-trained visual backbone {visual}")
    common = [*args.overrides, f"data.path={data}", f"model.visual.pretrained={visual}"]
    shared = _stage(3, "stage 1: the dense network, shared by both models", out / "shared", args.config, [
        *common, "model.dense=true", f"train.max_steps={demo.shared_steps}", f"train.max_minutes={demo.shared_minutes}",
        "train.lr_drop_epoch=1000000", "train.epochs=1000000", f"model.layer_drop_fusion={demo.layer_drop_fusion}",
        f"model.layer_drop_visual={demo.layer_drop_visual}"])
    branch = [*common, f"model.init={shared}", "model.layer_drop_fusion=0", "model.layer_drop_visual=0",
              f"train.max_steps={demo.steps}", f"train.max_minutes={demo.minutes}",
              "train.epochs=1000000", f"train.warmup_epochs={demo.warmup_epochs}",
              f"train.lr_drop_fraction={demo.lr_drop_fraction}"]
    checkpoints = {
        "lads": _stage(4, "stage 2: LADS (the gating network joins)", out / "lads", args.config,
                       [*branch, "model.dense=false"]),
        "dense": _stage(5, "stage 2: the dense baseline", out / "dense", args.config, [*branch, "model.dense=true"]),
    }
    print(f"[6/{STEPS}] evaluating both on", ", ".join(SPLITS))
    rows = evaluate_checkpoints([checkpoints["lads"], checkpoints["dense"]], str(data), SPLITS)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    print(table)
    print(f"[7/{STEPS}] predicting on a few test images")
    pictures = _predict_examples(checkpoints["lads"], data, out / "predictions")
    print(f"[8/{STEPS}] drawing the subnets of the test expressions")
    analysis = _analyze(checkpoints["lads"], data, out / "analysis")
    print(f"[9/{STEPS}] learning curves and the report")
    curves = _curves(out)
    report = _report(out, table, rows, pictures, analysis, curves, _stages(out), time.time() - started)
    print(f"report: {report}")


def _stage(number: int, what: str, run_dir: Path, config: str, overrides: list[str]) -> Path:
    """Train one stage into ``run_dir`` (resuming it if it was cut); its checkpoint."""
    from lads.config import load_config
    from lads.engine import train
    from lads.errors import LadsError

    if _finished(run_dir):
        print(f"[{number}/{STEPS}] {what}: done already ({run_dir})")
        return run_dir / "checkpoint"
    print(f"[{number}/{STEPS}] {what}, in {run_dir}")
    cfg = load_config(config, [*overrides, f"train.out={run_dir}"])
    checkpoint = train(cfg, resume=str(run_dir) if (run_dir / "checkpoint").exists() else None)
    if not _finished(run_dir):
        reason = json.loads((checkpoint / "meta.json").read_text()).get("reason")
        raise LadsError(f"stopped by {reason} during {what}; run the demo again to resume it")
    return checkpoint


def _finished(run_dir: Path) -> bool:
    """The stage ran to its end (its time budget or its epochs), not to a signal."""
    meta = run_dir / "checkpoint" / "meta.json"
    return meta.exists() and json.loads(meta.read_text()).get("reason") in ("finished", "time budget")


def _predict_examples(checkpoint, data: Path, out: Path, images: int = 4) -> list[Path]:
    """Every expression (four at most) of the first few test images, drawn on the image beside
    its ground-truth box."""
    from collections import defaultdict

    from lads.datasets import load_records
    from lads.models import LADS
    from lads.analysis.draw import draw

    model = LADS.from_pretrained(checkpoint)
    records, _ = load_records(data, "test")
    by_image = defaultdict(list)
    for r in records:
        by_image[r.image].append(r)
    pictures = []
    for image in sorted(by_image)[:images]:
        chosen = by_image[image][:4]
        predictions = model.predict(image, [r.expression for r in chosen])
        pictures.append(draw(image, predictions, out / (Path(image).stem + ".png"), truths=[r.box for r in chosen]))
        (out / (Path(image).stem + ".json")).write_text(json.dumps(predictions, indent=2))
    return pictures


def _analyze(checkpoint, data: Path, out: Path) -> dict:
    from lads.commands.analyze import analyze
    from lads.datasets import load_records
    from lads.models import LADS

    records, _ = load_records(data, "test")
    return analyze(LADS.from_pretrained(checkpoint), [r.expression for r in records],
                   [r.expr_type for r in records], out_dir=out, force=True, title="LADS subnets, synthetic test split")


RUNS = {"shared": "stage 1: dense, shared", "lads": "stage 2: LADS", "dense": "stage 2: dense"}


def _stages(out: Path) -> list[dict]:
    """Steps (done and budgeted), samples, minutes and samples/s of the pre-training and of each
    training stage, from their checkpoints."""
    pre = json.loads((out / "pretrain" / "meta.json").read_text())
    rows = [_stage_row("pretrain", "pre-training of the visual backbone", pre["steps"], pre.get("max_steps"),
                       pre.get("batch_size", 32), 60 * pre["minutes"], pre.get("amp"))]
    for name, what in RUNS.items():
        meta = json.loads((out / name / "checkpoint" / "meta.json").read_text())
        batch = json.loads((out / name / "checkpoint" / "config.json").read_text())["train"]["batch_size"]
        rows.append(_stage_row(name, what, meta["step"], meta.get("total_steps"), batch, meta.get("train_s", 0.0),
                               meta.get("amp")))
    return rows


def _stage_row(run: str, what: str, steps: int, budget, batch: int, seconds: float, amp) -> dict:
    seconds = max(seconds, 1e-9)
    return {"run": run, "what": what, "steps": steps, "budget": budget or steps, "samples": steps * batch,
            "minutes": seconds / 60, "samples_per_s": steps * batch / seconds,
            "precision": {"none": "float32", None: "?"}.get(amp, amp)}


def _curves(out: Path) -> Path:
    """Val Prec@0.5 against training minutes: stage 1, then both branches of stage 2."""
    from lads.analysis.curves import plot_curves

    offset = json.loads((out / "shared" / "checkpoint" / "meta.json").read_text()).get("train_s", 0.0) / 60
    logs = {"stage 1 (dense)": (out / "shared" / "log.jsonl", 0.0),
            "LADS": (out / "lads" / "log.jsonl", offset), "dense": (out / "dense" / "log.jsonl", offset)}
    return plot_curves(logs, out / "curves.png", title="lads demo: val Prec@0.5 while training")


def _report(out: Path, table: str, rows, pictures, analysis, curves: Path, stages, seconds) -> Path:
    from lads.util.dist import device_name, local_device

    lines = [
        "# lads demo: the synthetic REC benchmark",
        "",
        f"Everything here took {seconds / 60:.1f} minutes on {device_name(local_device())}.",
        "",
        "## Prec@0.5",
        "",
        table,
        "",
        "Checkpoints: " + ", ".join(f"`{r['checkpoint']}`" for r in rows),
        "",
        "## Training",
        "",
        "| stage | steps | samples | minutes | samples/s | precision |",
        "|---|---|---|---|---|---|",
        *(f"| {s['what']} | {s['steps']:,} | {s['samples']:,} | {s['minutes']:.1f} | {s['samples_per_s']:.0f} "
          f"| {s['precision']} |" for s in stages),
        "",
        *(f"- **warning**: {s['what']} reached its time cap after {s['steps']:,} of its {s['budget']:,} steps "
          f"({s['samples_per_s']:.0f} samples/s): a slower or busy machine, so fewer steps and figures that differ "
          "from a run that had them all." for s in stages if s["steps"] < s["budget"]),
        "",
        f"![learning curves]({curves.relative_to(out)})",
        "",
    ]
    for r in rows:
        for split, res in r["splits"].items():
            if "prec@0.5_by_type" in res:
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in res["prec@0.5_by_type"].items())
                lines.append(f"- {r['name']}, {split}, by expression type: {kinds}")
    lines += ["", "## Predictions (LADS, extracted subnets)", ""]
    lines += [f"![{p.stem}]({p.relative_to(out)})" for p in pictures]
    lines += ["", "## The subnets (test split)", "",
              f"Full report: `{Path(analysis['report']).relative_to(out)}`; numbers: "
              f"`{Path(analysis['stats_path']).relative_to(out)}`.", ""]
    by_type = analysis["stats"].get("by_type", {})
    if by_type:
        lines += ["| expression type | " + " | ".join(next(iter(by_type.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(by_type.values())))]
        lines += [f"| {k} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
                  for k, row in by_type.items()]
        lines.append("")
    lines += [f"![{key}]({Path(path).relative_to(out)})" for key, path in analysis["figures"].items()]
    lines += [f"- note: {n}" for n in analysis["notes"]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
