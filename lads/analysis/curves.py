"""Learning curves: val Prec@0.5 against training minutes or samples seen, read from runs'
``log.jsonl``.

``lads train`` with ``train.eval_every`` logs, at each evaluation, ``<split>/prec@0.5`` (the
inference head) and, for a model with two heads, ``<split>/prec@0.5_cls`` and
``<split>/prec@0.5_token``, with ``step`` and ``train_s``, the training seconds so far
(evaluation excluded).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lads.errors import LadsError  # noqa: E402

HEADS = {"cls": "[CLS] head (paper)", "token": "token head"}


def read_curve(log: Path, split: str = "val", batch: int | None = None) -> dict[str, list[tuple[float, float]]]:
    """``{series: [(x, Prec@0.5), ...]}`` of one run, x in training minutes, or with ``batch``
    (samples per step) in thousands of samples seen: ``"boxes"`` for the inference head, and one
    series per head where the model has two."""
    if not Path(log).exists():
        raise LadsError(f"{log}: no such training log")
    series: dict[str, list[tuple[float, float]]] = {}
    for line in Path(log).read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if f"{split}/prec@0.5" not in record:
            continue
        x = record["step"] * batch / 1000 if batch else record["train_s"] / 60
        series.setdefault("boxes", []).append((x, record[f"{split}/prec@0.5"]))
        for head in HEADS:
            if f"{split}/prec@0.5_{head}" in record:
                series.setdefault(head, []).append((x, record[f"{split}/prec@0.5_{head}"]))
    return series


def plot_curves(logs: dict, path, split: str = "val", title: str | None = None, batch: int | None = None,
                colours: dict | None = None) -> Path:
    """One solid line per run (its inference head) and, for a run with two heads, a dashed one
    for the other head. ``logs``: name -> ``log.jsonl``, or (``log.jsonl``, x to shift it by, for
    a run that started from another's weights); x in training minutes, or with ``batch`` (samples
    per step) in thousands of samples seen; ``colours``: name -> colour index, for runs that share
    one (the stages of one schedule), else one per run."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, log) in enumerate(logs.items()):
        log, offset = log if isinstance(log, tuple) else (log, 0.0)
        series = {k: [(x + offset, p) for x, p in v] for k, v in read_curve(log, split, batch).items()}
        if not series:
            continue
        used = next((h for h in HEADS if series.get(h) == series["boxes"]), None)
        lines = [("boxes", "o-", name + (f", {HEADS[used]}" if len(series) > 2 else ""))]
        lines += [(h, "s--", f"{name}, {HEADS[h]}") for h in HEADS if h in series and h != used]
        for key, style, label in lines:
            xs, ys = zip(*series[key])
            ax.plot(xs, ys, style, color=f"C{(colours or {}).get(name, i)}", markersize=3, label=label)
    ax.set_xlabel("thousands of training samples seen" if batch else "training minutes (evaluation excluded)")
    ax.set_ylabel(f"{split} Prec@0.5 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
