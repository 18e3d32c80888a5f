"""Batch prediction: many images, each with its expressions (docs/design.md §3c).

A query is one image and its expressions. Images are read and letterboxed in ``DataLoader``
workers; the main process gathers up to ``batch_size`` expressions, across images, and grounds
them in one ``SubnetRunner`` call, which groups them by gate pattern (one subnet serves every
expression that shares its pattern, whatever its image) and runs each image through the visual
backbone once per pattern. Memory stays bounded: the input is read lazily, a few images are in
flight, one batch of expressions is grounded at a time.

Answers come in input order, one per expression: ``{"line": n, "index": j, "image": …,
"expression": …, "box": [x1, y1, x2, y2], …}`` (the fields of ``lads.inference.describe``), and
one ``{"line": n, "image": …, "error": reason}`` for a query that cannot be used (a bad line, an
unreadable image); the run goes on. ``line`` counts queries from 0 (the JSONL line, the image's
place in the folder). :func:`predict_to_file` writes them as JSON lines and resumes a file that
a killed run left.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lads.errors import LadsError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Query:
    """One image and its expressions; ``error`` says why the query cannot be used."""

    line: int
    image: object  # a path or a PIL image
    expressions: list[str]
    error: str | None = None

    @property
    def name(self) -> str | None:
        """The image as the answers name it: its path, or None for an in-memory image."""
        return str(self.image) if isinstance(self.image, (str, Path)) else None


def query(line: int, item, root: Path | None = None) -> Query:
    """A query from ``{"image": …, "expressions": [...]}`` or ``(image, expressions)``; an
    expression alone stands for a list of one. A relative path is read under ``root``."""
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"image", "expressions"})
        if unknown or not {"image", "expressions"} <= set(item):
            return Query(line, item.get("image"), [], 'expected the keys "image" and "expressions"'
                         + (f", got also {', '.join(unknown)}" if unknown else ""))
        image, expressions = item["image"], item["expressions"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        image, expressions = item
    else:
        return Query(line, None, [], 'expected {"image": …, "expressions": [...]} or (image, expressions)')
    if isinstance(image, str) and root is not None and not os.path.isabs(image):
        image = str(root / image)
    expressions = [expressions] if isinstance(expressions, str) else expressions
    if not isinstance(expressions, list) or not expressions:
        return Query(line, image, [], '"expressions" must be a non-empty list of strings')
    for j, e in enumerate(expressions):
        if not isinstance(e, str) or not e.strip():
            return Query(line, image, [], f"expression {j} is empty or not a string: {e!r}")
    if not isinstance(image, (str, Path)) and not hasattr(image, "convert"):
        return Query(line, None, [], f'"image" must be a path or a PIL image, got {type(image).__name__}')
    return Query(line, image, expressions)


class JsonlQueries:
    """The queries of a JSON-lines file, one per line, read lazily each time it is iterated;
    relative image paths are read under the file's folder. A line that is not a JSON object
    becomes a query with its error."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LadsError(f"--input {path}: no such file")

    def __iter__(self) -> Iterator[Query]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, text in enumerate(f):
                try:
                    item = json.loads(text)
                except json.JSONDecodeError as e:
                    yield Query(n, None, [], f"not JSON ({e.msg} at column {e.colno})")
                    continue
                yield query(n, item, self.path.parent)

    def __len__(self) -> int:
        with open(self.path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


class FolderQueries:
    """Every image of a folder (by suffix, sorted by name, not recursive), each with the same
    expressions."""

    def __init__(self, folder, expressions: list[str]):
        folder = Path(folder)
        if not folder.is_dir():
            raise LadsError(f"--input {folder}: no such folder")
        if not expressions:
            raise LadsError("--input FOLDER needs --expr (the expressions to ground on every image)")
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.expressions = list(expressions)

    def __iter__(self) -> Iterator[Query]:
        for n, path in enumerate(self.files):
            yield query(n, (str(path), self.expressions))

    def __len__(self) -> int:
        return len(self.files)


class ListQueries:
    """Queries from Python items (``query``'s forms), re-iterable."""

    def __init__(self, items):
        self.items = list(items)

    def __iter__(self) -> Iterator[Query]:
        return (query(n, item) for n, item in enumerate(self.items))

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Loaded:
    """A query with its image letterboxed (``meta`` for ``box_to_original``), or its error."""

    query: Query
    image: torch.Tensor | None = None
    pixel_mask: torch.Tensor | None = None
    meta: dict | None = None


class _LoadImages(IterableDataset):
    """The queries from line ``start`` on, each with its image read; with several workers, the
    k-th query goes to worker k mod W, so that the loader's round robin keeps the input order."""

    def __init__(self, queries, size: int, start: int):
        self.queries, self.size, self.start = queries, size, start

    def __iter__(self) -> Iterator[Loaded]:
        from lads.datasets.images import open_rgb
        from lads.datasets.records import RecordError
        from lads.util.image import letterbox

        worker = get_worker_info()
        step, offset = (1, 0) if worker is None else (worker.num_workers, worker.id)
        k = 0
        for q in self.queries:
            if q.line < self.start:
                continue
            k, mine = k + 1, k % step == offset
            if not mine:
                continue
            if q.error is not None:
                yield Loaded(q)
                continue
            try:
                pil = open_rgb(q.image)
            except RecordError as e:
                yield Loaded(Query(q.line, q.image, q.expressions, e.reason))
                continue
            image, mask, meta = letterbox(pil, self.size)
            yield Loaded(q, torch.from_numpy(image), torch.from_numpy(mask), meta)


def default_workers(model) -> int:
    """Image-reading processes beside a model: on the CPU the cores its threads leave free
    (none on 2 cores with torch's 2 threads: measured faster, benchmarks/README.md), on an
    accelerator ``lads.util.dist.loader_workers``."""
    from lads.util.dist import MAX_LOADER_WORKERS, available_cores, loader_workers

    if next(model.parameters()).device.type != "cpu":
        return loader_workers(None)
    return max(0, min(MAX_LOADER_WORKERS, available_cores() - torch.get_num_threads()))


def _as_is(item):
    return item


def as_queries(queries) -> Iterable[Query]:
    """``queries`` as an iterable of :class:`Query`: the reader classes above as they are, a
    list or tuple of items as :class:`ListQueries`, any other iterable as a one-pass stream."""
    if isinstance(queries, (JsonlQueries, FolderQueries, ListQueries)):
        return queries
    if isinstance(queries, (list, tuple)):
        return ListQueries(queries)
    return (q if isinstance(q, Query) else query(n, q) for n, q in enumerate(queries))


def predict_many(model, queries, batch_size: int = 64, num_workers: int | None = None, mode: str = "subnet",
                 amp: str = "none", after: dict | None = None) -> Iterator[dict]:
    """Answers for ``queries`` (``as_queries``' forms), in input order (the module's docstring).

    A generator: nothing runs, and no error is raised, until it is iterated. The model is put in
    eval mode and keeps its ``SubnetRunner`` (``lads.inference.model_runner``).

    Args:
        model: a :class:`~lads.models.lads.LADS`, on the device it should run on.
        queries: ``(image, expressions)`` pairs or ``{"image": …, "expressions": [...]}`` dicts
            (an image: a path or a PIL image; an expression alone stands for a list of one), as
            a list or any iterable, or a :class:`JsonlQueries`, :class:`FolderQueries` or
            :class:`ListQueries`.
        batch_size: expressions grounded together, across images (default 64).
        num_workers: image-reading processes (default None: the cores that torch's threads
            leave free for a model on the CPU, else ``lads.util.dist.loader_workers``; a
            one-pass stream is read in this process).
        mode: "subnet" (default), "masked" or "dense", as ``SubnetRunner``'s.
        amp: "none" (float32, the default), "bf16" or "fp16", as ``SubnetRunner``'s.
        after: the last answer already written (``{"line", "index", "image"}``, ``index``
            None for an error; default None): everything up to it is skipped, and a different
            image at its line is an error (the answers were for other input).

    Returns:
        An iterator of dicts in input order, one per expression: ``line`` (the query's place,
        from 0), ``index`` (the expression's place in it), ``image`` (its path, None for a PIL
        image) and ``lads.inference.describe``'s fields: ``expression``, ``box`` [x1, y1, x2,
        y2] in the original image's pixels, the subnet's size and ``flops``, ``cache_hit``;
        and one ``{"line", "image", "error"}`` for a query that cannot be used.

    Raises:
        LadsError: for ``batch_size`` below 1, an unknown ``mode`` or ``amp``, or an ``after``
            whose image differs from the input's at its line.
    """
    from lads.inference import describe, model_runner, tokenize

    if batch_size < 1:
        raise LadsError(f"batch_size must be >= 1, got {batch_size}")
    queries = as_queries(queries)
    workers = default_workers(model) if num_workers is None else num_workers
    workers = workers if hasattr(queries, "__len__") else 0
    start = after["line"] if after else 0
    loader = DataLoader(_LoadImages(queries, model.config.image_size, start), batch_size=None,
                        num_workers=workers, collate_fn=_as_is)
    runner, device = model_runner(model, amp), next(model.parameters()).device

    def ground(entries):
        """The answers of ``entries`` (a Loaded and an expression index, or an error answer)."""
        rows = [e for e in entries if isinstance(e, tuple)]
        answers = {}
        if rows:
            items = list({id(item): item for item, _ in rows}.values())
            place = {id(item): i for i, item in enumerate(items)}
            expressions = [item.query.expressions[j] for item, j in rows]
            tokens = tokenize(model.tokenizer, expressions, model.config.text.max_tokens)
            result = runner(torch.stack([item.image for item in items]).to(device),
                            torch.stack([item.pixel_mask for item in items]).to(device),
                            tokens["input_ids"].to(device), tokens["attention_mask"].to(device), mode=mode,
                            image_index=torch.tensor([place[id(item)] for item, _ in rows], device=device))
            described = describe(model, result, [item.meta for item, _ in rows], expressions,
                                 tokens["attention_mask"])
            for (item, j), d in zip(rows, described):
                answers[id(item), j] = {"line": item.query.line, "index": j, "image": item.query.name, **d}
        return [answers[id(e[0]), e[1]] if isinstance(e, tuple) else e for e in entries]

    entries, pending = [], 0
    for item in loader:
        q = item.query
        skip = -1
        if after and q.line == after["line"]:
            if q.name != after["image"]:
                raise LadsError(f"the answers already written end at line {q.line} with image "
                                f"{after['image']!r}, but the input has {q.name!r} there: they were "
                                "written for another input")
            skip = len(q.expressions) if after["index"] is None else after["index"]
        if q.error is not None:
            if skip < 0:
                entries.append({"line": q.line, "image": q.name, "error": q.error})
            continue
        for j in range(skip + 1, len(q.expressions)):
            entries.append((item, j))
            pending += 1
            if pending >= batch_size:
                yield from ground(entries)
                entries, pending = [], 0
    yield from ground(entries)


def resume_point(path) -> dict | None:
    """The last complete answer of a file ``predict_to_file`` wrote (None when there is none);
    a line cut short by a killed run is removed from the file. Reads the file's tail only."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb+") as f:
        size = start = f.seek(0, os.SEEK_END)
        tail = b""
        while start > 0 and tail.count(b"\n") < 2:  # the last complete line, whole
            start = max(0, start - (1 << 16))
            f.seek(start)
            tail = f.read(size - start)
        end = tail.rfind(b"\n") + 1
        if start + end < size:
            f.truncate(start + end)
    last = tail[:end].rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if not last:
        return None
    try:
        answer = json.loads(last)
        return {"line": int(answer["line"]), "index": answer.get("index"), "image": answer.get("image")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise LadsError(f"--out {path}: its last line is not an answer of lads predict; "
                        "choose another --out or remove the file") from None


def predict_to_file(model, queries, out, progress: bool = True, **options) -> dict:
    """Write ``predict_many``'s answers to ``out`` as JSON lines, as they come, with a progress
    bar; a file left by an earlier run is resumed (its answers are skipped). Returns counts:
    ``answers`` and ``errors`` written now, ``skipped`` queries already answered (lines)."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    after = resume_point(out)
    queries = as_queries(queries)
    total = len(queries) if hasattr(queries, "__len__") else None
    done = 0 if after is None else after["line"]
    counts = {"answers": 0, "errors": 0, "skipped": done}
    with open(out, "a", encoding="utf-8") as f, \
            tqdm(total=total, initial=done, unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for answer in predict_many(model, queries, after=after, **options):
            f.write(json.dumps(answer) + "\n")
            counts["errors" if "error" in answer else "answers"] += 1
            if answer["line"] + 1 > bar.n:
                f.flush()
                bar.update(answer["line"] + 1 - bar.n)
    return counts
