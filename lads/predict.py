"""``lads predict``: a box per expression on your own image, with the subnet that found it."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from lads.datasets.images import open_rgb, to_rgb
from lads.errors import LadsError


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, metavar="DIR")
    parser.add_argument("--image", required=True, metavar="FILE")
    parser.add_argument("--expr", action="append", required=True, metavar="TEXT",
                        help="a referring expression (repeat for several)")
    parser.add_argument("--out", metavar="FILE.png", help="draw the boxes on the image and save it here")
    parser.add_argument("--mode", choices=["subnet", "masked", "dense"], default="subnet")


def tokenize(tokenizer, expressions: list[str], max_tokens: int) -> dict:
    """Token ids with ``[CLS]`` first; an empty expression is an error, a long one is truncated."""
    for e in expressions:
        if not isinstance(e, str) or not e.strip():
            raise LadsError(f"expression {e!r} is empty")
    full = tokenizer(expressions, add_special_tokens=True)["input_ids"]
    for e, ids in zip(expressions, full):
        if len(ids) > max_tokens:
            warnings.warn(f"expression {e[:40]!r}… has {len(ids)} tokens; truncated to {max_tokens}", stacklevel=3)
    return tokenizer(expressions, max_length=max_tokens, truncation=True, padding=True, return_tensors="pt")


@torch.no_grad()
def predict(model, image, expressions: list[str] | str, mode: str = "subnet", tokenizer=None) -> list[dict]:
    """Boxes ``[x1, y1, x2, y2]`` in original image pixels, one dict per expression.

    ``image``: a path or a PIL image (EXIF orientation honoured).
    """
    from lads.datasets.transforms import box_to_original, eval_transform
    from lads.inference import SubnetRunner
    from lads.models.text import load_tokenizer

    expressions = [expressions] if isinstance(expressions, str) else list(expressions)
    if not expressions:
        raise LadsError("give at least one expression")
    pil = open_rgb(str(image)) if isinstance(image, (str, Path)) else to_rgb(image)
    tokenizer = tokenizer or load_tokenizer(model.config.text.name)
    tokens = tokenize(tokenizer, expressions, model.config.text.max_tokens)
    tensor, pixel_mask, _, _, meta = eval_transform(pil, None, "", model.config.image_size)
    device = next(model.parameters()).device
    n = len(expressions)
    model.eval()
    if getattr(model, "_runner", None) is None:  # keeps its cache of subnets between calls
        model._runner = SubnetRunner(model)
    result = model._runner(
        tensor[None].expand(n, -1, -1, -1).to(device), pixel_mask[None].expand(n, -1, -1).to(device),
        tokens["input_ids"].to(device), tokens["attention_mask"].to(device), mode=mode,
    )
    out = []
    for j, expression in enumerate(expressions):
        box = [round(float(v), 2) for v in box_to_original(result["boxes"][j].float().cpu(), meta)]
        out.append({"expression": expression, "box": box, **subnet_summary(model, result["gates"], j)})
    return out


def subnet_summary(model, gates, j) -> dict:
    """Layers and filters kept by expression ``j``'s subnet (all of them for the dense net)."""
    layout = model.layout
    visual_total, fusion_total = layout.num_visual, len(layout.candidates) - layout.num_visual
    if gates is None:
        visual, fusion, filters = visual_total, fusion_total, layout.num_filter_gates
    else:
        closed = [layout.layer_owner[i] for i in torch.nonzero(gates.layer[j] == 0).flatten().tolist()]
        visual = visual_total - sum(1 for c in closed if c < layout.num_visual)
        fusion = fusion_total - sum(1 for c in closed if c >= layout.num_visual)
        filters = int(gates.filter[j].sum())
    return {
        "visual_layers": visual, "fusion_sublayers": fusion, "filters": filters,
        "summary": f"{visual}/{visual_total} bottlenecks, {fusion}/{fusion_total} fusion sublayers, "
                   f"{filters}/{layout.num_filter_gates} filters",
    }


def draw(image, predictions: list[dict], path) -> Path:
    """The image with each expression's box drawn and labelled."""
    from PIL import ImageDraw

    pil = open_rgb(str(image)) if isinstance(image, (str, Path)) else to_rgb(image)
    factor = max(1, 512 // max(pil.size))  # small images are enlarged so the labels are legible
    pil = pil.resize((pil.width * factor, pil.height * factor))
    canvas = ImageDraw.Draw(pil)
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    for i, p in enumerate(predictions):
        colour = colours[i % len(colours)]
        box = [v * factor for v in p["box"]]
        canvas.rectangle(box, outline=colour, width=max(2, factor))
        label = f"{i + 1}: {p['expression']}"
        x, y = box[0], max(0, box[1] - 12)
        canvas.rectangle(canvas.textbbox((x, y), label), fill=colour)
        canvas.text((x, y), label, fill="white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def run(args):
    from lads.engine import load_model

    model, _ = load_model(args.checkpoint)
    if not Path(args.image).exists():
        raise LadsError(f"--image {args.image}: no such file")
    predictions = predict(model, args.image, args.expr, mode=args.mode)
    json.dump(predictions, sys.stdout, indent=2)
    print()
    for i, p in enumerate(predictions, 1):
        print(f"{i}: {p['expression']!r}: {p['summary']}", file=sys.stderr)
    if args.out:
        print(f"drawn: {draw(args.image, predictions, args.out)}", file=sys.stderr)
