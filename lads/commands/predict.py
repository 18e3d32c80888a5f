"""``lads predict``: boxes for your own images: one image (``--image``), or many from a JSON-lines
file or a folder (``--input``, written to ``--out`` as they come, resumable; the library:
``lads.batch``)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from lads.errors import LadsError


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a trained model's checkpoint folder (e.g. runs/demo/lads/checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="FILE", help="one image (any format Pillow reads)")
    source.add_argument("--input", metavar="FILE.jsonl|DIR",
                        help='many: a JSON-lines file, one {"image": "path", "expressions": ["…", …]} per line '
                             "(paths relative to the file's folder), or a folder of images, each with every --expr")
    parser.add_argument("--expr", action="append", metavar="TEXT",
                        help="a referring expression (repeat for several); with --input DIR, asked of every image")
    parser.add_argument("--out", metavar="FILE",
                        help="with --image: draw the boxes on the image and save it here (PNG); with --input: the "
                             "answers, one JSON line per expression (required; a rerun skips what is written)")
    parser.add_argument("--mode", choices=["subnet", "masked", "dense"], default="subnet",
                        help="subnet: each expression's extracted subnet (default); masked: the supernet with "
                             "its gates multiplied in; dense: every gate open")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="fp32 (default), or bf16/fp16 autocast (boxes and gates stay fp32)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="with --input: expressions grounded together, across images (default: 64)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="with --input: image-reading processes (default: the cores that torch leaves free, "
                             "up to 8)")


def run(args):
    from lads.models.pretrained import load_model

    if args.input is None and not args.expr:
        raise LadsError("--image needs at least one --expr")
    if args.input is not None and not args.out:
        raise LadsError("--input needs --out FILE.jsonl (the answers)")
    if args.batch_size < 1:
        raise LadsError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise LadsError(f"--workers must be >= 0, got {args.workers}")
    model, _ = load_model(args.checkpoint)
    if args.input is not None:
        return run_batch(model, batch_queries(args), args)
    if not Path(args.image).exists():
        raise LadsError(f"--image {args.image}: no such file")
    from lads.analysis.draw import draw
    from lads.inference import predict
    from lads.util.amp import DTYPES

    predictions = predict(model, args.image, args.expr, mode=args.mode, amp=DTYPES[args.dtype])
    json.dump(predictions, sys.stdout, indent=2)
    print()
    for i, p in enumerate(predictions, 1):
        print(f"{i}: {textwrap.shorten(p['expression'], 60)!r}: {p['summary']}", file=sys.stderr)
    if args.out:
        print(f"drawn: {draw(args.image, predictions, args.out)}", file=sys.stderr)


def batch_queries(args):
    from lads.batch import FolderQueries, JsonlQueries

    if Path(args.input).is_dir():
        return FolderQueries(args.input, args.expr or [])
    if args.expr:
        raise LadsError("--expr goes with --image or --input DIR; a JSON-lines --input names its expressions")
    return JsonlQueries(args.input)


def run_batch(model, queries, args):
    from lads.batch import predict_to_file
    from lads.util.amp import DTYPES

    counts = predict_to_file(model, queries, args.out, batch_size=args.batch_size, num_workers=args.workers,
                             mode=args.mode, amp=DTYPES[args.dtype])
    skipped = f"; {counts['skipped']} images answered before, skipped" if counts["skipped"] else ""
    print(f"{args.out}: {counts['answers']} answers, {counts['errors']} errors written{skipped}", file=sys.stderr)
