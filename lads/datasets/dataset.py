"""``RecDataset``: records -> model-ready tensors; ``collate`` batches them."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch.utils.data import Dataset

from lads.datasets.images import open_rgb
from lads.datasets.records import Record, RecordError, fit_box, short_reason
from lads.datasets.table import Records
from lads.datasets.transforms import Augment, eval_transform, train_transform

log = logging.getLogger(__name__)


class RecDataset(Dataset):
    """Item: ``image`` (3, S, S) float, ``pixel_mask`` (S, S) bool (True = padding),
    ``input_ids`` / ``attention_mask`` (T,) long (``[CLS]`` first, T <= ``max_tokens``),
    ``box`` (4,) normalised ``(cx, cy, w, h)`` in the padded square, and ``meta``
    (the record, its index, and what ``box_to_original`` needs).

    An image that is missing or unreadable, or a box outside its image, raises
    ``RecordError`` (a ``LadsError``) naming the record and the file; ``check_images``
    finds them all up front. With ``skip_bad`` (training) the item is the next readable one
    instead, and ``meta["skipped"]`` lists the unreadable ones as ``(image, reason)``: a file
    that breaks in the middle of an epoch is counted by the engine, not fatal.
    """

    SKIP_TRIES = 16  # unreadable items in a row before skip_bad gives up

    def __init__(self, records: list[Record] | Records, tokenizer, image_size: int, max_tokens: int = 40,
                 train: bool = False, augment: Augment | None = None, skip_bad: bool = False):
        self.records = records if isinstance(records, Records) else list(records)  # a table stays one
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_tokens = max_tokens
        self.train = train
        self.augment = augment or Augment()
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int):
        """The record's image (RGB) and its box checked against the image."""
        record = self.records[index]
        img = open_rgb(record.image, record.source)
        try:
            return img, fit_box(record.box, img.size)
        except ValueError as e:
            raise RecordError(f"{record.source}, image {record.image}", str(e)) from None

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for tries in range(self.SKIP_TRIES if self.skip_bad else 1):
            try:
                return self.item(index, skipped)
            except RecordError as e:
                if not self.skip_bad or tries == self.SKIP_TRIES - 1:
                    raise
                skipped.append((self.records[index].image, e.reason))
                index = (index + 1) % len(self.records)

    def item(self, index: int, skipped: list | None = None) -> dict:
        record = self.records[index]
        img, box = self.load(index)
        if self.train:
            out = train_transform(img, box, record.expression, self.image_size, self.augment)
        else:
            out = eval_transform(img, box, record.expression, self.image_size)
        image, pixel_mask, target, text, meta = out
        tokens = self.tokenizer(text, max_length=self.max_tokens, truncation=True)
        meta.update(index=index, record=record, text=text, skipped=skipped or [])
        return {
            "image": image,
            "pixel_mask": pixel_mask,
            "input_ids": torch.tensor(tokens["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(tokens["attention_mask"], dtype=torch.long),
            "box": target,
            "meta": meta,
        }

    def check_images(self, drop: bool = False) -> Counter:
        """Open every image (a full decode) and check every box; count the problems by
        reason and log the first of each. ``drop=True`` removes the bad records."""
        problems, bad = Counter(), set()
        for i in range(len(self.records)):
            try:
                self.load(i)
            except RecordError as e:
                key = short_reason(e.reason)
                if not problems[key]:
                    log.warning("%s", e)
                problems[key] += 1
                bad.add(i)
        if drop:
            self.records = [r for i, r in enumerate(self.records) if i not in bad]
        return problems


def collate(samples: list[dict]) -> dict:
    """Stack a list of items; text is padded (id 0, mask 0) to the longest in the batch."""
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, : len(s["input_ids"])] = s["input_ids"]
        attention_mask[i, : len(s["attention_mask"])] = s["attention_mask"]
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "pixel_mask": torch.stack([s["pixel_mask"] for s in samples]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "box": torch.stack([s["box"] for s in samples]),
        "meta": [s["meta"] for s in samples],
    }
