"""``lads analyze``: see the subnets of a trained LADS over a split (paper Figs. 4-7;
``lads.analysis.collect``)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder written by lads train")
    parser.add_argument("--data", required=True, help="REFER folder, TransVG split folder or JSONL file")
    parser.add_argument("--split", default="test", help="split to analyse (default: test)")
    parser.add_argument("--out", required=True, help="output folder for the figures, stats.json and report.html")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    parser.add_argument("--limit", type=int, default=None, help="analyse the first N expressions only")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="expressions per batch when computing the gates (default 128)")


def run(args):
    from lads.analysis.collect import analyze, check_out_dir

    check_out_dir(Path(args.out), args.force)
    from lads.datasets import load_records
    from lads.errors import LadsError
    from lads.models.pretrained import load_model

    model, cfg = load_model(args.checkpoint)
    records, _ = load_records(args.data, args.split, image_root=cfg.data.image_root, split_by=cfg.data.split_by)
    records = records[: args.limit] if args.limit is not None else records
    if not records:
        raise LadsError(f"{args.data}: split {args.split!r} holds no expression")
    types = [r.expr_type for r in records]
    result = analyze(model, [r.expression for r in records], None if all(t is None for t in types) else types,
                     args.out, force=args.force, batch_size=args.batch_size,
                     title=f"LADS subnets: {args.checkpoint}, {args.data} [{args.split}]")
    for note in result["notes"]:
        print(note)
    print(f"report: {result['report']}")
