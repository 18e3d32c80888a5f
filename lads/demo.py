"""``lads demo``: the main job on the embedded default, the synthetic REC benchmark.

Generate the benchmark, pre-train the visual backbone on its boxes (``lads pretrain``, the role
of the paper's DETR weights), train LADS and the dense baseline from it (same budget) with the
``tiny`` preset, evaluate both on the test and held-out-combination splits, run ``predict`` on a
few test images, draw what the subnets do (``lads analyze``), and write a report. A rerun reuses
what is done and resumes what is not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SPLITS = ["test", "heldout"]
IMAGES = 2000  # synthetic images (train, val, test and held-out together)
MINUTES = 5.0  # training budget of each of the two models


def add_arguments(parser):
    parser.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    parser.add_argument("--config", default="tiny", help="preset or JSON config (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for both runs, e.g. train.max_minutes=3")
    parser.add_argument("--images", type=int, default=IMAGES, help=f"synthetic images (default: {IMAGES})")
    parser.add_argument("--seed", type=int, default=0)


def run(args):
    from lads.config import load_config
    from lads.datasets import synth
    from lads.engine import train
    from lads.evaluate import evaluate_checkpoints, markdown_table
    from lads.pretrain import WEIGHTS, pretrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = out / "data"
    images = args.images
    if not (data / "instances.json").exists():
        print(f"[1/7] generating the synthetic benchmark ({images} images) in {data}")
        synth.generate(data, seed=args.seed, images=images)
    else:
        print(f"[1/7] reusing the synthetic benchmark in {data}")
    visual = out / "pretrain" / WEIGHTS
    if not (out / "pretrain" / "meta.json").exists():
        print(f"[2/7] pre-training the visual backbone on the boxes of the training images, in {visual.parent}")
        pretrain(load_config(args.config, [*args.overrides, f"data.path={data}", f"pretrain.out={visual.parent}"]))
    else:
        print(f"[2/7] reusing the pre-trained visual backbone {visual}")
    checkpoints = {}
    for step, (name, dense) in enumerate((("lads", False), ("dense", True)), start=3):
        run_dir = out / name
        cfg = load_config(args.config, [f"train.max_minutes={MINUTES}", *args.overrides, f"data.path={data}",
                                        f"model.visual.pretrained={visual}", f"train.out={run_dir}",
                                        f"model.dense={json.dumps(dense)}"])
        done = _finished(run_dir)
        print(f"[{step}/7] training {'the dense baseline' if dense else 'LADS'} in {run_dir}"
              + (" (done already)" if done else ""))
        checkpoints[name] = run_dir / "checkpoint" if done else train(
            cfg, resume=str(run_dir) if (run_dir / "checkpoint").exists() else None
        )
    print("[5/7] evaluating both on", ", ".join(SPLITS))
    rows = evaluate_checkpoints([checkpoints["lads"], checkpoints["dense"]], str(data), SPLITS)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    print(table)
    print("[6/7] predicting on a few test images")
    pictures = _predict_examples(checkpoints["lads"], data, out / "predictions")
    print("[7/7] drawing the subnets of the test expressions")
    analysis = _analyze(checkpoints["lads"], data, out / "analysis")
    report = _report(out, table, rows, pictures, analysis, time.time() - started)
    print(f"report: {report}")


def _finished(run_dir: Path) -> bool:
    meta = run_dir / "checkpoint" / "meta.json"
    return meta.exists() and json.loads(meta.read_text()).get("reason") == "finished"


def _predict_examples(checkpoint, data: Path, out: Path, images: int = 4) -> list[Path]:
    """Every expression of the first few test images, drawn on the image."""
    from collections import defaultdict

    from lads.datasets import load_records
    from lads.models import LADS
    from lads.predict import draw

    model = LADS.from_pretrained(checkpoint)
    records, _ = load_records(data, "test")
    by_image = defaultdict(list)
    for r in records:
        by_image[r.image].append(r.expression)
    pictures = []
    for image in sorted(by_image)[:images]:
        predictions = model.predict(image, by_image[image][:4])
        pictures.append(draw(image, predictions, out / (Path(image).stem + ".png")))
        (out / (Path(image).stem + ".json")).write_text(json.dumps(predictions, indent=2))
    return pictures


def _analyze(checkpoint, data: Path, out: Path) -> dict:
    from lads.analyze import analyze
    from lads.datasets import load_records
    from lads.models import LADS

    records, _ = load_records(data, "test")
    return analyze(LADS.from_pretrained(checkpoint), [r.expression for r in records],
                   [r.expr_type for r in records], out_dir=out, force=True, title="LADS subnets, synthetic test split")


def _report(out: Path, table: str, rows, pictures, analysis, seconds) -> Path:
    lines = [
        "# lads demo: the synthetic REC benchmark",
        "",
        f"Everything here took {seconds / 60:.1f} minutes.",
        "",
        "## Prec@0.5",
        "",
        table,
        "",
        "Checkpoints: " + ", ".join(f"`{r['checkpoint']}`" for r in rows),
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
