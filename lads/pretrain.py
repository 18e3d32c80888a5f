"""Detection pre-training of the visual backbone on a dataset's own boxes (``lads pretrain``).

The paper starts from DETR's COCO-trained ResNet-50 (docs/design.md §2). Where no such weights can be
downloaded, or the backbone is narrower than ResNet-50 (the ``tiny`` preset), a short detection
pre-training on the boxes of a REFER folder's ``instances.json`` plays that role: every object of
the training images (not only the referred ones) is a target of a CenterNet-style head on C5
(Zhou et al., "Objects as Points", 2019):

- a centre heatmap, one channel for all objects: penalty-reduced focal loss on Gaussian bumps;
- at the centre cell, the box: offset in the cell and (w, h) of the padded square, L1;
- at the centre cell, the classes: the category and every string attribute the annotations
  carry (the synthetic benchmark's colour and size), cross-entropy.

With ``pretrain.hue`` a training image has its hue turned at random (``rotate_hue``) with that
probability, and its objects' colour is then not a target: shapes are seen in every colour,
as ``data.hue`` shows them to the REC training (docs/design.md §5a).

From a REFER folder, only images with a ref in the training split are used. From a COCO
``instances_train2014.json`` (COCO's own format), every image with an object, less the images of
the evaluation splits of the REFER datasets in ``data.exclude``: leak-free weights for them
(docs/design.md §4a), started from ``pretrain.init`` if given (ImageNet weights). The backbone
trains with batch norm (its statistics load into frozen batch norm as well). Writes
``OUT/visual.safetensors`` in torchvision's layout, which ``model.visual.pretrained`` loads, with
what its images left out in the file's metadata, and ``OUT/meta.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lads.config import Config
from lads.datasets import refer
from lads.datasets.image_roots import find_image_root
from lads.datasets.images import open_rgb
from lads.datasets.mixture import eval_coco_ids
from lads.datasets.transforms import eval_transform, rotate_hue
from lads.errors import LadsError
from lads.models.backbone import VisualBackbone, load_visual_weights
from lads.models.provenance import Provenance, evaluation_key, image_collection, provenance_of
from lads.util.amp import autocast, grad_scaler, resolve_amp
from lads.util.dist import loader_workers, local_device

WEIGHTS, META = "visual.safetensors", "meta.json"
COLOUR_KEYS = ("colour", "color")  # attributes that a hue rotation makes untrue


class ObjectScenes(Dataset):
    """The training images of a REFER folder, or of a COCO ``instances.json``, with all their objects.

    An item is ``(image, objects)``: the letterboxed image (3, S, S) and a (n, 4 + K) tensor,
    per object its (cx, cy, w, h) normalised to the padded square and its K class indices
    (category first, then the attributes in ``self.heads`` order; -100 where not annotated, and
    for the colour of an image whose hue was turned, with probability ``hue``).

    From a REFER folder, the images with a ref in ``split``; from a COCO file, every image with an
    object that is not a crowd, less those of the evaluation splits of the ``exclude`` datasets
    (``EvalSet``s). ``provenance`` says what the weights trained on them will have seen.
    """

    def __init__(self, source, split: str, image_size: int, image_root=None, split_by=None, hue: float = 0.0,
                 exclude=None):
        source = Path(source)
        if source.is_file() and source.suffix == ".json":
            annotations, images, wanted, self.provenance, self.excluded_images = _coco_scenes(source, exclude)
            default_root, start, collections = (source.parent.parent / source.stem.split("_")[-1], source.parent,
                                                ("coco",))
        else:
            annotations, images, wanted, self.provenance = _refer_scenes(source, split, split_by)
            default_root, start, collections = source / "images", source, refer.collections(source.name)
            self.excluded_images = 0
        by_image = {}
        for a in annotations.values():
            if a["image_id"] in wanted and not a.get("iscrowd"):
                by_image.setdefault(a["image_id"], []).append(a)
        attributes = sorted({k for a in annotations.values() for k, v in a.get("attributes", {}).items()
                             if isinstance(v, str)})
        self.heads = {"category": sorted({a["category_id"] for a in annotations.values()})}
        for key in attributes:
            values = sorted({a["attributes"][key] for a in annotations.values() if key in a.get("attributes", {})})
            if len(values) > 1:
                self.heads[key] = values
        first = images[min(by_image)]["file_name"] if by_image else None
        self.image_root = find_image_root(image_root or None, default_root, start, collections, first)
        self.items = [(self.image_root.path / images[i]["file_name"], by_image[i]) for i in sorted(by_image)]
        self.image_size = image_size
        self.hue = hue

    @property
    def num_classes(self) -> list[int]:
        return [len(v) for v in self.heads.values()]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, anns = self.items[index]
        img = open_rgb(str(path))
        turned = self.hue > 0 and torch.rand(()).item() < self.hue
        if turned:
            img = rotate_hue(img, torch.rand(()).item())
        image, _, _, _, meta = eval_transform(img, None, "", self.image_size)
        (sx, sy), s = meta["scale"], self.image_size
        rows = []
        for a in anns:
            x, y, w, h = a["bbox"]
            given = {"category": a["category_id"], **a.get("attributes", {})}
            classes = [values.index(given[key]) if key in given and not (turned and key in COLOUR_KEYS) else -100
                       for key, values in self.heads.items()]
            rows.append([(x + w / 2) * sx / s, (y + h / 2) * sy / s, w * sx / s, h * sy / s, *classes])
        return image, torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 4 + len(self.heads))


def _refer_scenes(folder: Path, split: str, split_by):
    """(annotations, images, wanted image ids, provenance) of a REFER folder."""
    if not folder.is_dir() or not refer.split_bys(folder):
        raise LadsError(
            f"data.path {folder}: lads pretrain needs a REFER folder (refs(<splitBy>).p and "
            "instances.json) or a COCO instances file (instances_train2014.json), for the boxes of every object"
        )
    _, refs = refer.read_refs(folder, split_by)
    wanted = {r["image_id"] for r in refs if str(r.get("split")) == split}
    if not wanted:
        raise LadsError(f"data.path {folder}: no ref in split {split!r}")
    annotations, images = refer.read_instances(folder / "instances.json")
    key = evaluation_key(folder, split_by)
    provenance = Provenance(image_collection(key) or key, frozenset({key}),
                            f"lads pretrain on the {split} images of {folder}")
    return annotations, images, wanted, provenance


def _coco_scenes(path: Path, exclude):
    """The same of a COCO instances file, without the evaluation images of ``exclude``, and their count."""
    if exclude is None:
        raise LadsError(f"data.exclude: name the REFER datasets whose val and test images leave {path} (the "
                        "pretrain-coco preset names RefCOCO, RefCOCO+ and RefCOCOg), or [] to keep them on purpose")
    annotations, images = refer.read_instances(path)
    left_out = set(eval_coco_ids(exclude).tolist()) & set(images)
    keys = sorted({evaluation_key(s.path, s.split_by) for s in exclude})
    provenance = Provenance("coco", frozenset(keys), f"lads pretrain on {path.name} without the val and test "
                                                     f"images of {', '.join(keys) or 'no dataset'}")
    return annotations, images, set(images) - left_out, provenance, len(left_out)


def collate_objects(items):
    """A pre-training batch: the images stacked, each image's objects (boxes and class labels) as
    a list, since their number differs (``lads.datasets.dataset.collate`` batches REC samples)."""
    return torch.stack([image for image, _ in items]), [objects for _, objects in items]


class CentreHead(nn.Module):
    """C5 -> 3×3 conv, ReLU -> 1×1 conv: 1 heatmap + 4 box + Σ classes channels per cell."""

    def __init__(self, in_channels: int, num_classes: list[int], hidden: int = 128, prior: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(hidden, 5 + sum(num_classes), 1)
        nn.init.constant_(self.out.bias[:1], -torch.log(torch.tensor((1 - prior) / prior)).item())

    def forward(self, features):
        return self.out(self.body(features))


def centre_targets(objects: list[torch.Tensor], grid: int, num_heads: int):
    """Heatmap (B, G, G), box (B, 4, G, G) and classes (B, K, G, G) (-100 where no centre).

    The heatmap is the maximum of one Gaussian per object (σ = max(w, h)·G/6 + 0.3 cells), 1 at
    the cell holding its centre; a cell shared by two centres keeps the last object's box.
    """
    b = len(objects)
    heat = torch.zeros(b, grid, grid)
    box = torch.zeros(b, 4, grid, grid)
    classes = torch.full((b, num_heads, grid, grid), -100, dtype=torch.long)
    centres = torch.arange(grid) + 0.5
    for i, rows in enumerate(objects):
        for cx, cy, w, h, *labels in rows.tolist():
            gx, gy = cx * grid, cy * grid
            sigma = max(w, h) * grid / 6 + 0.3
            bump = torch.exp(-((centres[None, :] - gx) ** 2 + (centres[:, None] - gy) ** 2) / (2 * sigma**2))
            heat[i] = torch.maximum(heat[i], bump)
            r, c = min(int(gy), grid - 1), min(int(gx), grid - 1)
            heat[i, r, c] = 1.0
            box[i, :, r, c] = torch.tensor([gx - c, gy - r, w, h])
            classes[i, :, r, c] = torch.tensor(labels, dtype=torch.long)
    return heat, box, classes


def centre_loss(pred, heat, box, classes, num_classes: list[int]) -> dict[str, torch.Tensor]:
    """Focal loss on the heatmap (α = 2, β = 4), L1 on the box and cross-entropy on each class
    head at the centre cells that have its label; the total and, per class head with labels in
    the batch, its accuracy at those cells."""
    p = pred[:, 0].sigmoid().clamp(1e-4, 1 - 1e-4)
    centre = heat.eq(1)
    n = centre.sum().clamp(min=1)
    focal = -(centre * (1 - p) ** 2 * p.log() + ~centre * (1 - heat) ** 4 * p**2 * (1 - p).log()).sum() / n
    l1 = ((pred[:, 1:5] - box).abs() * centre[:, None]).sum() / n
    terms = {"heatmap": focal, "box": l1}
    total = focal + l1
    start = 5
    for k, size in enumerate(num_classes):
        logits, target = pred[:, start:start + size], classes[:, k]
        kept = target >= 0
        start += size
        if not kept.any():  # e.g. the colour of a batch whose every image had its hue turned
            continue
        total = total + F.cross_entropy(logits, target, ignore_index=-100)
        with torch.no_grad():
            terms[f"acc_{k}"] = (logits.argmax(1)[kept] == target[kept]).float().mean()
    terms["loss"] = total
    return terms


def pretrain(cfg: Config, progress: bool = True) -> Path:
    """Pre-train ``cfg.model.visual`` on ``cfg.data.path``; returns ``OUT/visual.safetensors``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from lads.engine import MetricLog, lr_factor

    p, v = cfg.pretrain, cfg.model.visual
    out = Path(p.out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if not 0 <= p.hue <= 1:
        raise LadsError(f"pretrain.hue must be a probability from 0 to 1, got {p.hue!r}")
    torch.manual_seed(p.seed)
    dataset = ObjectScenes(cfg.data.path, cfg.data.train_split, cfg.model.image_size,
                           cfg.data.image_root, cfg.data.split_by, hue=p.hue, exclude=cfg.data.exclude)
    if len(dataset) < p.batch_size:
        raise LadsError(f"{cfg.data.path}: {len(dataset)} training images, fewer than pretrain.batch_size "
                        f"{p.batch_size}")
    print(f"{cfg.data.path}: {len(dataset):,} images, {dataset.image_root.describe()}; left out "
          f"{dataset.excluded_images:,} images of evaluation splits")
    backbone = VisualBackbone(v.width, "batch", v.dilation, frozen_stages=0)
    provenance = dataset.provenance
    if p.init:
        load_visual_weights(backbone, p.init)
        before = provenance_of(p.init)
        if before is not None and before.images == provenance.images:  # what the start saw, the result saw
            provenance = dataclasses.replace(provenance, excluded=provenance.excluded & before.excluded)
    head = CentreHead(backbone.num_channels, dataset.num_classes)
    if cfg.train.channels_last:
        backbone.to(memory_format=torch.channels_last)
        head.to(memory_format=torch.channels_last)
    device = local_device()
    amp = resolve_amp(cfg.train.amp, device)
    backbone.to(device)
    head.to(device)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    no_drop = p.steps + 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, p.warmup_steps, no_drop))
    scaler = grad_scaler(device, amp)
    loader = DataLoader(dataset, p.batch_size, shuffle=True, drop_last=True, collate_fn=collate_objects,
                        num_workers=loader_workers(cfg.data.num_workers),
                        generator=torch.Generator().manual_seed(p.seed))
    out.mkdir(parents=True, exist_ok=True)
    log = MetricLog(out, enabled=True)
    names = {f"acc_{k}": f"acc_{name}" for k, name in enumerate(dataset.heads)}
    bar = tqdm(total=p.steps, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    step, start, record = 0, time.time(), {}

    def done() -> bool:
        return step >= p.steps or time.time() - start >= 60 * p.max_minutes

    backbone.train()
    while not done():
        for images, objects in loader:
            with autocast(device, amp):
                features = backbone(images.to(device))
                prediction = head(features)
            targets = [t.to(device) for t in centre_targets(objects, features.shape[-1], len(dataset.heads))]
            terms = centre_loss(prediction.float(), *targets, dataset.num_classes)
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scaler.scale(terms["loss"]).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0:
                record = {"step": step, **{names.get(k, k): round(t.item(), 4) for k, t in terms.items()},
                          "lr": lr, "elapsed_s": round(time.time() - start, 1)}
                log.write(record)
                bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
            if done():
                break
    bar.close()
    log.close()
    weights = out / WEIGHTS
    tmp = out / (WEIGHTS + ".tmp")
    save_file({k: t.detach().cpu().contiguous() for k, t in backbone.state_dict().items()}, str(tmp),
              metadata=provenance.to_metadata())
    os.replace(tmp, weights)
    meta = {"steps": step, "max_steps": p.steps, "batch_size": p.batch_size, "lr": p.lr, "warmup_steps": p.warmup_steps,
            "minutes": round((time.time() - start) / 60, 2), "data": str(cfg.data.path),
            "images": len(dataset), "amp": amp, "width": v.width, "dilation": v.dilation,
            "image_size": cfg.model.image_size,
            "heads": dataset.heads, "init": p.init, "excluded_images": dataset.excluded_images,
            "excluded_datasets": sorted(provenance.excluded), "last": record}
    (out / META).write_text(json.dumps(meta, indent=2))
    print(f"pre-trained visual backbone: {weights} ({step} steps); use it with "
          f"--set model.visual.pretrained={weights}")
    return weights

