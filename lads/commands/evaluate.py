"""``lads eval``: Prec@0.5 per split as a table like the paper's Table 1 (markdown and JSON;
``lads.evaluation``)."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="DIR",
                        help="one or more checkpoints (one table row each)")
    parser.add_argument("--data", help="dataset path (default: the checkpoint's data.path)")
    parser.add_argument("--splits", nargs="+", help="splits to evaluate (default: the config's data.eval_splits)")
    parser.add_argument("--mode", choices=["subnet", "masked", "dense"], default="subnet",
                        help="extracted subnets (default), masked supernet, or every gate open")
    parser.add_argument("--batch-size", type=int, default=32, help="expressions per batch (default 32)")
    parser.add_argument("--out", help="write the table as OUT.md and OUT.json")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="fp32 (default), or bf16/fp16 autocast (boxes and gates stay fp32)")


def run(args):
    from lads.evaluation import evaluate_checkpoints, markdown_table
    from lads.util import dist
    from lads.util.card import record_evaluation
    from lads.util.checkpoint import resolve_checkpoint

    rows = evaluate_checkpoints(args.checkpoint, args.data, args.splits, args.mode, args.batch_size, args.dtype)
    if not dist.is_main():
        return
    if not args.data:  # figures on the checkpoint's own data go into its model card
        for row in rows:
            record_evaluation(resolve_checkpoint(row["checkpoint"]), row)
    table = markdown_table(rows)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text(table + "\n")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=2))
