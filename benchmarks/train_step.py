"""One ``tiny`` training step on this machine, lever by lever (docs/design.md §5a).

Times forward + backward + AdamW on a batch of synthetic-benchmark samples (already loaded:
data loading is not timed) for the earlier ``tiny`` settings, then with each speed lever added in
turn, and last all of them in float32 (``train.amp=auto`` on a CPU without native bf16); prints ms
per step and samples per second (median and quartiles of ``--steps`` steps after 2 warm-up steps)
and, with ``--profile``, the top operators of the last configuration.

    python benchmarks/train_step.py --data runs/demo/data --out benchmarks/results/train-step/<machine>-<date>-<commit>
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lads.config import load_config
from lads.datasets.dataset import collate
from lads.engine import build_optimizer, load_split
from lads.models import LADS
from lads.models.text import load_tokenizer
from lads.util.amp import autocast, native_bf16
from lads.util.dist import device_name

EARLIER = ["train.amp=none", "train.channels_last=false", "model.text.frozen=false", "model.fusion.dropout=0.1"]
LEVERS = [
    ("earlier tiny settings (float32, NCHW, text trained, dropout 0.1)", []),
    ("+ bf16 autocast", ["train.amp=bf16"]),
    ("+ channels_last", ["train.channels_last=true"]),
    ("+ no dropout", ["model.fusion.dropout=0"]),
    ("+ frozen, cached text backbone", ["model.text.frozen=true"]),
    ("the same in float32 (what train.amp=auto picks without native bf16)", ["train.amp=none"]),
]


def time_steps(cfg, batches, steps: int, profile: bool = False) -> dict:
    torch.manual_seed(0)
    model = LADS(cfg.model)
    if cfg.train.channels_last:
        model.visual_backbone.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train)
    model.train()
    device = torch.device("cpu")

    def step(b):
        with autocast(device, cfg.train.amp):
            out = model(b["image"], b["pixel_mask"], b["input_ids"], b["attention_mask"])
            loss = model.loss(out, b["box"])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in batches[:2]:
        step(b)
    times = []
    for i in range(steps):
        began = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - began)
    quartiles = statistics.quantiles(times, n=4)
    result = {"ms_per_step": 1000 * quartiles[1], "ms_quartiles": [1000 * quartiles[0], 1000 * quartiles[2]],
              "samples_per_s": len(batches[0]["box"]) / quartiles[1]}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[:3]:
                step(b)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the synthetic benchmark (lads data synth)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="print the top operators of the last row")
    parser.add_argument("--out", help="folder for train_step.md and train_step.json")
    args = parser.parse_args()
    base = load_config("tiny", [f"data.path={args.data}", "model.visual.pretrained=null", *EARLIER])
    tokenizer = load_tokenizer(base.model.text.name)
    dataset = load_split(base, base.data.train_split, True, tokenizer)
    batches = [collate([dataset[i * args.batch + j] for j in range(args.batch)]) for i in range(4)]
    rows, overrides = [], list(EARLIER)
    for i, (what, more) in enumerate(LEVERS):
        overrides += more
        cfg = load_config("tiny", [f"data.path={args.data}", "model.visual.pretrained=null", *overrides])
        result = time_steps(cfg, batches, args.steps, profile=args.profile and i == len(LEVERS) - 1)
        rows.append({"what": what, **{k: v for k, v in result.items() if k != "profile"}})
        low, high = result["ms_quartiles"]
        print(f"{what}: {result['ms_per_step']:.0f} ms per step of {args.batch} (quartiles {low:.0f}-{high:.0f}), "
              f"{result['samples_per_s']:.0f} samples/s")
        if "profile" in result:
            print(result["profile"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cpu = torch.device("cpu")
        lines = [f"`python benchmarks/train_step.py --data {args.data} --out {args.out}`: {device_name(cpu)} "
                 f"({'with' if native_bf16(cpu) else 'without'} native bf16), "
                 f"{torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}, "
                 f"median of {args.steps} steps (quartiles beside it; data loading not timed; the text cache warm, as "
                 "from the second epoch on).", "",
                 "| settings | ms per step | quartiles | samples/s |", "|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['ms_per_step']:.0f} | {r['ms_quartiles'][0]:.0f}-{r['ms_quartiles'][1]:.0f} "
                  f"| {r['samples_per_s']:.0f} |" for r in rows]
        (out / "train_step.md").write_text("\n".join(lines) + "\n")
        (out / "train_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
