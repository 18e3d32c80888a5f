"""The dynamic model deployed: a bank folder (``lads export --bank``) run with onnxruntime,
NumPy, Pillow and the ``tokenizers`` library, without torch (docs/design.md §3a).

``Deployment(folder).predict(image, expressions)`` reads the expressions first: the gating
file gives ``F_l`` and each expression's gate pattern. An expression runs the subnet of its own
pattern when the bank has it (``served: "own"``), else the smallest banked subnet (by FLOPs)
whose open gates include all of its own (``"superset"``: the same layers and filters and more),
else the dense network (``"dense"``). Expressions that land on the same file run together, the
image once through its visual backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lads.errors import LadsError
from lads.util.image import box_to_original, letterbox, read_rgb

BANK_INDEX = "bank.json"  # as lads.export writes it
BANK_FORMAT = "lads-bank/1"
PIP = "pip install onnxruntime tokenizers"


class Deployment:
    """A bank folder, ready to answer. ``threads``: onnxruntime's intra-op threads (default:
    its own choice, the machine's cores).

    Args:
        folder: a bank folder written by ``lads export --bank`` (``lads.export.export_bank``):
            ``bank.json``, ``gating.onnx``, the subnet files, ``dense.onnx`` and ``text/``.
        threads: intra-op threads of each onnxruntime session (default None: onnxruntime's
            choice).

    Raises:
        LadsError: without onnxruntime or tokenizers, for a folder without a readable
            ``bank.json``, or a bank of another format.
    """

    def __init__(self, folder, threads: int | None = None):
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as e:
            raise LadsError(f"a deployment runs with onnxruntime and tokenizers ({e}): {PIP}") from None
        self.folder = Path(folder)
        index_path = self.folder / BANK_INDEX
        try:
            self.index = json.loads(index_path.read_text())
        except OSError:
            raise LadsError(f"{folder}: no {BANK_INDEX}; write a bank with lads export --bank") from None
        except json.JSONDecodeError as e:
            raise LadsError(f"{index_path}: not a JSON file ({e})") from None
        if self.index.get("format") != BANK_FORMAT:
            raise LadsError(f"{index_path}: format {self.index.get('format')!r}, this runtime reads {BANK_FORMAT!r}")
        self._ort, self._options = onnxruntime, onnxruntime.SessionOptions()
        # each file has its own thread pool: threads that spin-wait after a run would take the
        # cores from the next file's run (measured 3x slower on 2 cores, benchmarks/README.md)
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            self._options.intra_op_num_threads = threads
        self._sessions: dict[str, object] = {}
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.index["tokenizer"]))
        self.tokenizer.enable_truncation(self.index["max_tokens"])
        self._pad = self.tokenizer.token_to_id("[PAD]") or 0
        self.subnets = self.index["subnets"]
        self._files = {entry["pattern"]: entry["file"] for entry in self.subnets}
        width = self.index["layer_gates"] + self.index["filter_gates"]
        self._open = np.stack([_bits(e["pattern"], width) for e in self.subnets]) if self.subnets \
            else np.zeros((0, width), dtype=bool)
        self._by_flops = np.argsort([e["flops"] for e in self.subnets], kind="stable")

    def session(self, name: str):
        """The onnxruntime session of one file of the folder (opened once)."""
        if name not in self._sessions:
            path = self.folder / name
            if not path.is_file():
                raise LadsError(f"{path}: missing from the deployment (named in {BANK_INDEX})")
            self._sessions[name] = self._ort.InferenceSession(str(path), self._options,
                                                              providers=["CPUExecutionProvider"])
        return self._sessions[name]

    def tokens(self, expressions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask (int64, (B, L)), ``[CLS]`` first, truncated and padded as
        the model's tokenizer does."""
        for e in expressions:
            if not isinstance(e, str) or not e.strip():
                raise LadsError(f"expression {e!r} is empty")
        rows = [self.tokenizer.encode(e).ids for e in expressions]  # encode_batch's threads cost more here
        length = max(map(len, rows))
        ids = np.full((len(rows), length), self._pad, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return ids, mask

    def route(self, layer: np.ndarray, filt: np.ndarray) -> list[tuple[str, str]]:
        """Per expression (rows of the hard gates): the file that serves it and how (``own``,
        ``superset``, ``dense``)."""
        bits = np.concatenate([layer > 0.5, filt > 0.5], axis=1)
        out = []
        for row in bits:
            key = np.packbits(row).tobytes().hex()
            if key in self._files:
                out.append((self._files[key], "own"))
                continue
            covers = ~np.any(row & ~self._open, axis=1)  # every open gate of the row is open there
            found = [i for i in self._by_flops if covers[i]]
            out.append((self.subnets[found[0]]["file"], "superset") if found
                       else (self.index["dense"]["file"], "dense"))
        return out

    def predict(self, image, expressions: list[str] | str) -> list[dict]:
        """Boxes ``[x1, y1, x2, y2]`` in the image's pixels, one dict per expression, with the
        file that ran it (``subnet``) and how it was chosen (``served``). ``image``: a path (EXIF
        orientation honoured) or a PIL image, read as ``model.predict`` reads it.

        Args:
            image: a path or a PIL image.
            expressions: one expression or a list of them, each grounded on ``image``.

        Returns:
            One dict per expression, in order: ``expression``; ``box``, [x1, y1, x2, y2] in the
            original image's pixels (rounded to 0.01); ``subnet``, the file that ran it;
            ``served``: "own" (the subnet of its own gate pattern), "superset" (the smallest
            banked subnet whose open gates include its own) or "dense".

        Raises:
            LadsError: for no expression or an empty one, an image that cannot be read, or a
                file that ``bank.json`` names and the folder lacks.
        """
        expressions = [expressions] if isinstance(expressions, str) else list(expressions)
        if not expressions:
            raise LadsError("give at least one expression")
        try:
            image = read_rgb(image)
        except (OSError, ValueError) as e:
            raise LadsError(f"image {image}: cannot read it ({e})") from None
        pixels, pixel_mask, meta = letterbox(image, self.index["image_size"])
        ids, mask = self.tokens(expressions)
        text, layer, filt = self.session(self.index["gating"]).run(None, {"input_ids": ids, "attention_mask": mask})
        routes = self.route(layer, filt)
        boxes = np.zeros((len(expressions), 4), dtype=np.float32)
        for name in dict.fromkeys(file for file, _ in routes):
            rows = [i for i, (file, _) in enumerate(routes) if file == name]
            feeds = {"images": pixels[None], "pixel_mask": pixel_mask[None], "text": text[rows],
                     "attention_mask": mask[rows], "image_index": np.zeros(len(rows), dtype=np.int64)}
            boxes[rows] = self.session(name).run(["boxes"], feeds)[0]
        pixels_boxes = box_to_original(boxes, meta)
        return [{"expression": e, "box": [round(float(v), 2) for v in box], "subnet": file, "served": served}
                for e, box, (file, served) in zip(expressions, pixels_boxes, routes)]


def _bits(pattern: str, width: int) -> np.ndarray:
    """The open gates of a pattern key (hex of the packed layer and filter bits)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(pattern), dtype=np.uint8))[:width].astype(bool)
