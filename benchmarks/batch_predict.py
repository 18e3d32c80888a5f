"""Batch prediction against loops of single ``predict`` calls, on the expressions of a split.

Takes the first ``--expressions`` expressions of ``--split`` (image by image, in the data's
order) and grounds them three ways, each ``--repeats`` times in alternating rounds, each round
from a cold subnet cache (``SubnetRunner.clear``):

- ``per expression``: ``model.predict(image, [expression])`` for each expression;
- ``per image``: ``model.predict(image, expressions)`` for each image;
- ``predict_many``: ``lads.batch.predict_many`` over all of them (``--batch-size``, the default
  image-reading workers).

Prints and writes (``--out``) expressions per second (median, min and max of the rounds), the
ratios of the medians, and the largest box difference between the three (pixels).

    python benchmarks/batch_predict.py --checkpoint runs/demo/lads/checkpoint --data runs/demo/data \
        --out benchmarks/results/batch-predict/<machine>-<date>-<commit>
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lads.batch import predict_many
from lads.datasets import load_records
from lads.models.pretrained import load_model


def queries_of(records, limit: int) -> list[tuple[str, list[str]]]:
    """(image, expressions) in the records' order, ``limit`` expressions in all."""
    by_image: dict[str, list[str]] = {}
    for r in records[:limit]:
        by_image.setdefault(r.image, []).append(r.expression)
    return list(by_image.items())


def per_expression(model, queries):
    return [p for image, expressions in queries for e in expressions for p in model.predict(image, [e])]


def per_image(model, queries):
    return [p for image, expressions in queries for p in model.predict(image, expressions)]


def batched(model, queries, batch_size):
    return list(predict_many(model, queries, batch_size=batch_size))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def setup(description: str, repeats: int, add_arguments) -> tuple:
    """The arguments both inference benchmarks take (and ``add_arguments``' own), parsed;
    torch's threads set; (args, the model, the records of ``--split``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", required=True)
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args, load_model(args.checkpoint)[0], load_records(args.data, args.split)[0]


def main():
    def own(parser):
        parser.add_argument("--expressions", type=int, default=1000)
        parser.add_argument("--batch-size", type=int, default=64)

    args, model, records = setup(__doc__, 3, own)
    queries = queries_of(records, args.expressions)
    n = sum(len(e) for _, e in queries)
    methods = {"per expression": lambda: per_expression(model, queries),
               "per image": lambda: per_image(model, queries),
               "predict_many": lambda: batched(model, queries, args.batch_size)}
    model.predict(queries[0][0], queries[0][1])  # the runner exists; each round clears its cache
    rates, answers = {name: [] for name in methods}, {}
    for round_ in range(args.repeats):
        for name, run in methods.items():
            model._runner.clear()
            start = time.perf_counter()
            answers[name] = run()
            rates[name].append(n / (time.perf_counter() - start))
            print(f"round {round_ + 1}: {name}: {rates[name][-1]:.1f} expressions/s", flush=True)
    boxes = {name: np.array([a["box"] for a in out]) for name, out in answers.items()}
    diff = max(float(np.abs(boxes[name] - boxes["per expression"]).max()) for name in boxes)
    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {"checkpoint": args.checkpoint, "split": args.split, "expressions": n, "images": len(queries),
              "batch_size": args.batch_size, "threads": args.threads, "device": f"CPU {cpu_name()}",
              "torch": torch.__version__, "repeats": args.repeats,
              "expressions_per_s": {name: {"median": round(median[name], 1), "min": round(min(r), 1),
                                           "max": round(max(r), 1)} for name, r in rates.items()},
              "ratio": {f"predict_many / {name}": round(median["predict_many"] / median[name], 2)
                        for name in ("per expression", "per image")},
              "max_box_difference_px": diff}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_predict.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Batch prediction: {n} expressions on {len(queries)} images ({args.split})", "",
             f"{result['device']}, {args.threads} threads, torch {torch.__version__}, batch size {args.batch_size}, "
             f"{args.repeats} rounds from a cold subnet cache; `{args.checkpoint}`.", "",
             "| method | expressions/s (median) | min–max |", "|---|---|---|"]
    lines += [f"| {name} | {median[name]:.1f} | {min(r):.1f}–{max(r):.1f} |" for name, r in rates.items()]
    lines += ["", *(f"- {k}: **{v}×**" for k, v in result["ratio"].items()),
              f"- largest box difference between the methods: {diff:.2f} px"]
    (out / "batch_predict.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
