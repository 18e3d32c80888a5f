"""The deployed bank (``lads export --bank``) against PyTorch on a split: accuracy, how each
expression was served, size on disk, time per expression.

Writes the bank of ``--bank-split``'s gate patterns (default: the split itself) to a temporary
folder, then grounds every expression of ``--split`` image by image with ``model.predict``
(PyTorch, extracted subnets, from a cold subnet cache) and with
``lads.deploy.Deployment.predict`` (onnxruntime, ``--threads`` threads), in ``--repeats``
rounds of one pass each (not alternating image by image: onnxruntime's threads spin-wait after
a run and would slow the PyTorch call after them). Prints and writes (``--out``) Prec@0.5 of
both, the share of expressions served by their own subnet, by a superset, by the dense network
(with Prec@0.5 of each), the bank's size beside one dense single-file export (``lads export``,
text backbone inside), and milliseconds per expression.

    python benchmarks/deploy_bank.py --checkpoint runs/demo/lads/checkpoint --data runs/demo/data \
        --out benchmarks/results/deploy-bank/<machine>-<date>-<commit>
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from batch_predict import cpu_name, setup

from lads.datasets import load_records
from lads.deploy import Deployment
from lads.export import export_bank, export_subnet
from lads.models.gating import Gates
from lads.util.box_ops import box_iou


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    def own(parser):
        parser.add_argument("--bank-split", help="the split whose patterns fill the bank (default: --split)")
        parser.add_argument("--coverage", type=float, default=0.95)

    args, model, records = setup(__doc__, 2, own)
    bank_records = records if not args.bank_split else load_records(args.data, args.bank_split)[0]
    work = Path(tempfile.mkdtemp(prefix="lads-bank-"))
    started = time.perf_counter()
    index = export_bank(model, [r.expression for r in bank_records], work / "bank", args.coverage,
                        {"data": args.data, "split": args.bank_split or args.split})
    export_s = time.perf_counter() - started
    layout = model.layout
    export_subnet(model, work / "dense.onnx",
                  gates=Gates(torch.ones(1, layout.num_layer_gates), torch.ones(1, layout.num_filter_gates)))
    deployment = Deployment(work / "bank", threads=args.threads)

    by_image: dict[str, list] = {}
    for r in records:
        by_image.setdefault(r.image, []).append(r)
    passes = {"pytorch": model.predict, "deployed": deployment.predict}
    seconds = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, run in passes.items():
            if name == "pytorch" and getattr(model, "_runner", None) is not None:
                model._runner.clear()
            start = time.perf_counter()
            answers = {image: run(image, [r.expression for r in rs]) for image, rs in by_image.items()}
            seconds[name].append(time.perf_counter() - start)
            if name == "pytorch":
                pytorch_answers = answers
            else:
                deployed_answers = answers
    hits = {"pytorch": 0, "deployed": 0}
    served, served_hits = Counter(), Counter()
    for image, rs in by_image.items():
        truth = torch.tensor([r.box for r in rs], dtype=torch.float32)
        for name, answers in (("pytorch", pytorch_answers[image]), ("deployed", deployed_answers[image])):
            ious = box_iou(torch.tensor([a["box"] for a in answers]), truth)
            hits[name] += int((ious >= 0.5).sum())
        for a, iou in zip(deployed_answers[image], ious.tolist()):
            served[a["served"]] += 1
            served_hits[a["served"]] += iou >= 0.5
    n = len(records)
    prec = {name: 100 * h / n for name, h in hits.items()}
    sizes = {"bank": folder_bytes(work / "bank"), "dense_export": (work / "dense.onnx").stat().st_size}
    result = {"checkpoint": args.checkpoint, "split": args.split, "bank_split": args.bank_split or args.split,
              "expressions": n, "images": len(by_image), "device": f"CPU {cpu_name()}", "threads": args.threads,
              "coverage": args.coverage, "subnets": len(index["subnets"]), "patterns": index["split"]["patterns"],
              "export_s": round(export_s, 1), "max_abs_diff": index["max_abs_diff"],
              "prec@0.5": {k: round(v, 2) for k, v in prec.items()},
              "difference_points": round(prec["deployed"] - prec["pytorch"], 2),
              "served": {k: {"share": round(v / n, 4), "prec@0.5": round(100 * served_hits[k] / v, 2)}
                         for k, v in served.items()},
              "size_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()},
              "ms_per_expression": {k: {"median": round(1000 * statistics.median(v) / n, 2),
                                        "min": round(1000 * min(v) / n, 2), "max": round(1000 * max(v) / n, 2)}
                                    for k, v in seconds.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_bank.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# The deployed bank against PyTorch: {n} expressions of {args.split}", "",
             f"{result['device']}, {args.threads} threads; bank of {result['bank_split']}'s patterns at coverage "
             f"{args.coverage}: {result['subnets']} subnets of {result['patterns']} patterns (export "
             f"{result['export_s']} s, largest box difference of a file against PyTorch "
             f"{result['max_abs_diff']:.1e}).", "",
             f"| | Prec@0.5 | ms / expression (median of {args.repeats} passes, min–max) |", "|---|---|---|",
             *(f"| {label} | {prec[k]:.2f} | {t['median']} ({t['min']}–{t['max']}) |"
               for k, label in (("pytorch", "PyTorch (`model.predict`, extracted subnets)"),
                                ("deployed", "deployed (`lads.deploy`, onnxruntime)"))
               for t in [result["ms_per_expression"][k]]), "",
             "| served by | share | Prec@0.5 |", "|---|---|---|"]
    lines += [f"| {k} | {100 * v['share']:.1f} % | {v['prec@0.5']:.2f} |" for k, v in result["served"].items()]
    lines += ["", f"Size on disk: bank {result['size_mib']['bank']} MiB, one dense export "
                  f"{result['size_mib']['dense_export']} MiB."]
    (out / "deploy_bank.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
