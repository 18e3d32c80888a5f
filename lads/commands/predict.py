"""``lads predict``: a box per expression on your own image, with the subnet that found it."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from lads.errors import LadsError

def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a trained model's checkpoint folder (e.g. runs/demo/lads/checkpoint)")
    parser.add_argument("--image", required=True, metavar="FILE", help="the image (any format Pillow reads)")
    parser.add_argument("--expr", action="append", required=True, metavar="TEXT",
                        help="a referring expression (repeat for several)")
    parser.add_argument("--out", metavar="FILE.png", help="draw the boxes on the image and save it here")
    parser.add_argument("--mode", choices=["subnet", "masked", "dense"], default="subnet",
                        help="subnet: each expression's extracted subnet (default); masked: the supernet with "
                             "its gates multiplied in; dense: every gate open")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="fp32 (default), or bf16/fp16 autocast (boxes and gates stay fp32)")


def run(args):
    from lads.util.checkpoint import load_model
    from lads.analysis.draw import draw
    from lads.inference import predict
    from lads.util.amp import DTYPES

    model, _ = load_model(args.checkpoint)
    if not Path(args.image).exists():
        raise LadsError(f"--image {args.image}: no such file")
    predictions = predict(model, args.image, args.expr, mode=args.mode, amp=DTYPES[args.dtype])
    json.dump(predictions, sys.stdout, indent=2)
    print()
    for i, p in enumerate(predictions, 1):
        print(f"{i}: {textwrap.shorten(p['expression'], 60)!r}: {p['summary']}", file=sys.stderr)
    if args.out:
        print(f"drawn: {draw(args.image, predictions, args.out)}", file=sys.stderr)
