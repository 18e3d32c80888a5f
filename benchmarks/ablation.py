"""What makes training converge on the synthetic benchmark, at one CPU budget (docs/design.md §5a).

Every row trains the ``tiny`` LADS model for ``--minutes`` of training time from the same data and
the same pre-trained visual backbone, in one stage, logging val Prec@0.5 as it goes, then
evaluates on val and test (extracted subnets, both heads where the model has two). Rows: Eq. 9
alone with the earlier ``tiny`` settings, each accelerator alone, all of them (the ``tiny`` preset).
The FLOPs budget (``loss.flops``) is off in every row: it makes subnets small, it does not make
training converge; the demo's staged schedule is measured by the demo itself.

    python benchmarks/ablation.py --data runs/demo/data \\
        --pretrained runs/demo/pretrain/visual.safetensors --minutes 5 \\
        --out benchmarks/results/ablation/<machine>-<date>-<commit>

The runs go to ``--work`` (default ``runs/ablation``); a rerun skips the rows whose run finished.
Writes ``ablation.md``, ``ablation.json`` and ``curves.png`` (val Prec@0.5 against training
minutes) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from lads.analysis.curves import plot_curves
from lads.config import load_config
from lads.engine import train
from lads.evaluation import evaluate_checkpoints
from lads.util.checkpoint import read_meta

# The earlier tiny settings: Eq. 9 only, float32, the text backbone trained, dropout 0.1,
# random crops, batch 16. Each row below changes only what it names.
BEFORE = ["train.amp=none", "train.channels_last=false", "model.text.frozen=false", "model.fusion.dropout=0.1",
          "data.crop=0.5", "train.batch_size=16", "train.micro_batch=16", "model.loss.token=0",
          "model.loss.token_box=0", "model.loss.deep=0", "model.head=cls"]
FAST = ["train.amp=bf16", "train.channels_last=true", "model.text.frozen=true", "model.fusion.dropout=0",
        "train.batch_size=32", "train.micro_batch=32"]
TOKEN_HEAD = ["model.loss.token=1", "model.loss.token_box=1", "model.head=token"]
ROWS = {
    "eq9": ("Eq. 9 alone (earlier tiny settings)", []),
    "fast": ("+ faster steps: bf16 autocast, NHWC, frozen cached text, no dropout, batch 32", FAST),
    "no-crop": ("+ no random crop (keeps the objects an expression names)", ["data.crop=0"]),
    "token-ce": ("+ token cross-entropy (loss.token=1), paper head", ["model.loss.token=1"]),
    "deep": ("+ deep supervision (loss.deep=1), paper head", ["model.loss.deep=1"]),
    "token-head": ("+ token head (loss.token=1, loss.token_box=1, model.head=token)", TOKEN_HEAD),
    "all": ("all of them: the tiny preset (one stage)", []),
}


def run_row(name: str, args) -> Path:
    run = Path(args.work) / name
    overrides = [f"data.path={args.data}", f"model.visual.pretrained={args.pretrained}",
                 f"train.max_minutes={args.minutes}", "train.epochs=1000", "train.lr_drop_epoch=1000",
                 f"train.eval_every={args.eval_every}", f"train.out={run}", "model.loss.flops=0"]
    if name != "all":
        overrides += BEFORE + ROWS[name][1]
    meta = run / "checkpoint" / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("reason") in ("time budget", "finished"):
        print(f"[{name}] done already")
        return run / "checkpoint"
    print(f"[{name}] {ROWS[name][0]}")
    return train(load_config(args.config, overrides), resume=str(run) if (run / "checkpoint").exists() else None)


def table(results: list[dict]) -> str:
    lines = ["| run | what | steps × batch | val | test | val, paper head | test, paper head |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        res = r["splits"]
        heads = {s: res[s].get("prec@0.5_by_head", {}) for s in res}
        paper = [f"{heads[s]['cls']:.1f}" if "cls" in heads[s] else "=" for s in ("val", "test")]
        lines.append(f"| {r['run']} | {r['what']} | {r['steps']:,} × {r['batch']} | {res['val']['prec@0.5']:.1f} "
                     f"| {res['test']['prec@0.5']:.1f} | {paper[0]} | {paper[1]} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the synthetic benchmark (lads data synth)")
    parser.add_argument("--pretrained", required=True, help="visual.safetensors from lads pretrain")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--minutes", type=float, default=5.0, help="training minutes of each run")
    parser.add_argument("--eval-every", type=float, default=0.5, help="epochs between val evaluations")
    parser.add_argument("--runs", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--work", default="runs/ablation", help="folder for the training runs")
    parser.add_argument("--out", default="benchmarks/results/ablation/latest",
                        help="folder for the table and the plot (benchmarks/results/ablation/MACHINE-DATE-COMMIT)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.runs:
        checkpoint = run_row(name, args)
        _, cfg, meta = read_meta(checkpoint)
        (row,) = evaluate_checkpoints([checkpoint], args.data, ["val", "test"])
        results.append({"run": name, "what": ROWS[name][0], "steps": meta["step"],
                        "batch": cfg["train"]["batch_size"], "splits": row["splits"], "device": row["device"]})
    plot_curves({r["run"]: Path(args.work) / r["run"] / "log.jsonl" for r in results}, out / "curves.png",
                title=f"tiny, {args.minutes:g} training minutes per run")
    text = table(results)
    header = (f"`python benchmarks/ablation.py --data {args.data} --pretrained {args.pretrained} "
              f"--minutes {args.minutes:g} --out {args.out}`\n\n"
              f"{results[0]['device']}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}. "
              "Prec@0.5 (%) of extracted subnets (float32); the paper head's column is that of the "
              "[CLS] head where the token head is the one used (= where the paper head is the only one).\n")
    (out / "ablation.md").write_text(header + "\n" + text + "\n\n![curves](curves.png)\n")
    (out / "ablation.json").write_text(json.dumps({"minutes": args.minutes, "rows": results}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
