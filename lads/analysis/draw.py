"""Pictures of predictions: each expression's box drawn and labelled on its image (``lads
predict --out``, the demo, the report), beside the ground truth where it is known."""

from __future__ import annotations

import textwrap
from pathlib import Path

from lads.datasets.images import open_rgb

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def draw(image, predictions: list[dict], path, truths: list | None = None) -> Path:
    """The image with each expression's box drawn and labelled ("1: expression"), each in its
    colour; with ``truths`` (ground-truth ``[x1, y1, x2, y2]`` per prediction, or None where not
    known) the true box dashed beside it and the IoU in the label. Labels are stacked so that
    none covers another."""
    import torch
    from PIL import ImageDraw

    from lads.util.box_ops import box_iou

    pil = open_rgb(image)
    factor = max(1, 512 // max(pil.size))  # small images are enlarged so the labels are legible
    pil = pil.resize((pil.width * factor, pil.height * factor))
    canvas = ImageDraw.Draw(pil)
    width = max(2, factor)
    placed: list[tuple] = []
    for i, p in enumerate(predictions):
        colour = COLOURS[i % len(COLOURS)]
        box = [v * factor for v in p["box"]]
        canvas.rectangle(box, outline=colour, width=width)
        label = f"{i + 1}: {textwrap.shorten(p['expression'], 48)}"
        truth = truths[i] if truths else None
        if truth is not None:
            _dashed_rectangle(canvas, [v * factor for v in truth], colour, width)
            label += f"  (IoU {box_iou(torch.tensor(p['box']), torch.tensor(truth, dtype=torch.float32)).item():.2f})"
        x, y = _free_spot(canvas, label, box, placed, pil.size)
        rect = canvas.textbbox((x, y), label)
        placed.append(rect)
        canvas.rectangle(rect, fill=colour)
        canvas.text((x, y), label, fill="white")
    if truths and any(t is not None for t in truths):
        note = "solid: predicted box, dashed: ground truth"
        canvas.text((4, pil.height - 4 - (canvas.textbbox((0, 0), note)[3])), note, fill="black", stroke_width=2,
                    stroke_fill="white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def _free_spot(canvas, label: str, box, placed: list[tuple], size) -> tuple[float, float]:
    """Where a label goes: just above its box (inside it at the image's top edge), moved down
    a line at a time while it would cover a label already placed."""
    x0, y0, x1, y1 = canvas.textbbox((0, 0), label)
    w, h = x1 - x0, y1 - y0 + 2
    x = min(max(0, box[0]), max(0, size[0] - w))
    y = box[1] - h if box[1] - h >= 0 else box[1] + 1
    for _ in range(100):
        rect = (x, y, x + w, y + h)
        if not any(rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3] for r in placed):
            break
        y += h
        if y + h > size[1]:
            y, x = 0, min(x + w, max(0, size[0] - w))
    return x, y


def _dashed_rectangle(canvas, box, colour: str, width: int, dash: int = 6):
    x0, y0, x1, y1 = box
    for (a, b), (c, d) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(c - a), abs(d - b), 1)
        for start in range(0, int(length), 2 * dash):
            end = min(start + dash, length)
            canvas.line([(a + (c - a) * start / length, b + (d - b) * start / length),
                         (a + (c - a) * end / length, b + (d - b) * end / length)], fill=colour, width=width)
