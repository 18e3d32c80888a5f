"""Training step of the visual backbone with frozen batch norm, folded into the convolutions or
applied after them (docs/design.md §2, "Frozen batch norm in training").

Times forward + backward + AdamW of ``VisualBackbone`` with frozen batch norm, as the paper
presets train it (DETR's convention), for each ``--widths`` (64: ResNet-50, the paper's; 16:
``tiny``'s width), once with the fold (``conv_norm``, what lads runs) and once with batch norm as
its own pass after each convolution (what it ran before); prints ms per step (median and
quartiles of ``--rounds`` rounds of ``--steps`` steps, the two ways alternating, each after 2
warm-up steps) and the largest difference of the two outputs before the first step.

    python benchmarks/frozen_norm.py --out benchmarks/results/frozen-norm/<machine>-<date>-<commit>
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lads.models import backbone as visual
from lads.util.dist import device_name


def unfolded(conv, norm, x):
    return norm(conv(x))


def time_steps(width: int, frozen_stages: int, size: int, batch: int, steps: int, fold: bool):
    """Seconds of each of ``steps`` steps (after 2 warm-up steps) and the output before the first."""
    torch.manual_seed(0)
    model = visual.VisualBackbone(width, "frozen", dilation=False, frozen_stages=frozen_stages)
    for name, buffer in model.named_buffers():  # statistics as a pretrained network has them
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    folded = visual.conv_norm
    visual.conv_norm = folded if fold else unfolded
    try:
        with torch.no_grad():
            output = model(x)  # before any step: the same weights in both runs
        times = []
        for i in range(steps + 2):
            began = time.perf_counter()
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - began)
    finally:
        visual.conv_norm = folded
    return times, output


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4)
    return {"ms_per_step": 1000 * q[1], "ms_quartiles": [1000 * q[0], 1000 * q[2]], "steps": len(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frozen-stages", type=int, default=1, help="as lads-r50 (stem and layer1)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the two ways alternating in each")
    parser.add_argument("--out", help="folder for frozen_norm.md and frozen_norm.json")
    args = parser.parse_args()
    rows = []
    for width in args.widths:
        times, outputs = {False: [], True: []}, {}
        for r in range(args.rounds):
            for fold in (False, True) if r % 2 == 0 else (True, False):
                t, outputs[fold] = time_steps(width, args.frozen_stages, args.size, args.batch, args.steps, fold)
                times[fold] += t
        results = {fold: summary(t) for fold, t in times.items()}
        diff = ((outputs[True] - outputs[False]).abs().max() / outputs[False].abs().max()).item()
        row = {"width": width, "unfolded": results[False], "folded": results[True], "max_rel_diff": diff,
               "speedup": results[False]["ms_per_step"] / results[True]["ms_per_step"]}
        rows.append(row)
        print(f"width {width}: batch norm after the convolution {results[False]['ms_per_step']:.0f} ms, folded "
              f"{results[True]['ms_per_step']:.0f} ms per step ({row['speedup']:.2f}x); outputs differ by {diff:.1e} "
              "of their largest value")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cpu = torch.device("cpu")
        lines = [f"`python benchmarks/frozen_norm.py --out {args.out}`: {device_name(cpu)}, {torch.get_num_threads()} "
                 f"threads, torch {torch.__version__}, float32, channels_last, batch {args.batch} of "
                 f"{args.size}x{args.size}, stem and layer1 frozen ({args.frozen_stages}), forward + backward + "
                 f"AdamW, median of {args.rounds} rounds of {args.steps} steps, the two ways alternating (quartiles "
                 "beside it); output difference relative to the largest output, before the first step.", "",
                 "| width | batch norm after the convolution (ms) | folded (ms) | speed-up "
                 "| largest output difference |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['width']} | {r['unfolded']['ms_per_step']:.0f} ({r['unfolded']['ms_quartiles'][0]:.0f}-"
                  f"{r['unfolded']['ms_quartiles'][1]:.0f}) | {r['folded']['ms_per_step']:.0f} "
                  f"({r['folded']['ms_quartiles'][0]:.0f}-{r['folded']['ms_quartiles'][1]:.0f}) | "
                  f"{r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |" for r in rows]
        (out / "frozen_norm.md").write_text("\n".join(lines) + "\n")
        (out / "frozen_norm.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
