"""Why the paper's head learns slowly: probes on cached features (README, "The main job").

The visual backbone (pre-trained, frozen) and the text backbone (frozen) run once over the train
and val splits; then, for ``--seconds`` each, on the cached features:

- ``box``: the fusion + box head trained with L1 + GIoU (Eq. 9, dense): what the main job does,
  without the backbones;
- ``oracle``: the box head on the one visual token holding the target's centre (the fusion's
  input projection, positions and final LayerNorm): how well one token gives the box;
- ``cells``: which cell holds the target's centre, learnt directly (cross-entropy on
  ``MLP(mean text) · (Linear(cell) + Linear(position))``): whether the features hold the answer.

Also printed: how much the text ``[CLS]`` output varies across expressions.

    python benchmarks/head_probe.py --data runs/demo/data \
        --pretrained runs/demo/pretrain/visual.safetensors \
        --out benchmarks/results/head-probe/<machine>-<date>-<commit>
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lads.config import add_config_arguments, config_overrides, load_config
from lads.datasets.dataset import collate
from lads.engine import load_split
from lads.models import LADS
from lads.models.backbone import downsample_mask
from lads.models.fusion import input_sequence, sine_position_embedding
from lads.models.losses import centre_cell, giou_loss, l1_loss
from lads.models.text import load_tokenizer
from lads.util.box_ops import box_iou, cxcywh_to_xyxy


@torch.no_grad()
def cache(model, cfg, split, tokenizer, batch=64):
    """(C5, cell padding mask, text features, text mask, boxes) of every expression of a split."""
    dataset = load_split(cfg, split, False, tokenizer)
    parts = []
    for i in range(0, len(dataset), batch):
        b = collate([dataset[j] for j in range(i, min(len(dataset), i + batch))])
        visual = model.visual_backbone(b["image"])
        text, text_mask = model.encode_text(b["input_ids"], b["attention_mask"])
        parts.append([visual, downsample_mask(b["pixel_mask"], visual.shape[-2:]), text, text_mask, b["box"]])
    length = max(p[2].shape[1] for p in parts)
    for p in parts:  # pad the text to one length
        pad = length - p[2].shape[1]
        p[2], p[3] = F.pad(p[2], (0, 0, 0, pad)), F.pad(p[3], (0, pad))
    return [torch.cat(x) for x in zip(*parts)]


class Probe(torch.nn.Module):
    """One of the three probes; ``forward`` gives (loss, training score) on a batch."""

    def __init__(self, kind, model):
        super().__init__()
        self.kind, self.fusion, self.head = kind, copy.deepcopy(model.fusion), copy.deepcopy(model.head)
        if kind == "cells":
            d, d_l, c = model.fusion.d_model, model.text_backbone.hidden_size, model.visual_backbone.num_channels
            self.query = torch.nn.Sequential(torch.nn.Linear(d_l, 2 * d), torch.nn.ReLU(), torch.nn.Linear(2 * d, d))
            self.key, self.key_pos = torch.nn.Linear(c, d), torch.nn.Linear(d, d)

    def predict(self, visual, visual_mask, text, text_mask, box):
        """Boxes (box, oracle) or cell scores (cells)."""
        h, w = visual.shape[-2:]
        if self.kind == "box":
            return self.head(self.fusion(visual, visual_mask, text, text_mask)[0][:, 0])
        if self.kind == "oracle":
            x, _, _ = input_sequence(self.fusion, visual, visual_mask, text, text_mask)
            cell = text.shape[1] + centre_cell(box, (h, w))
            return self.head(self.fusion.norm(x[torch.arange(len(x)), cell]))
        sentence = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
        pos = sine_position_embedding(visual_mask, self.fusion.d_model)
        keys = self.key(visual.flatten(2).transpose(1, 2)) + self.key_pos(pos)
        scores = torch.einsum("bd,bnd->bn", self.query(sentence), keys) / keys.shape[-1] ** 0.5
        return scores.masked_fill(visual_mask.flatten(1), -1e4)

    def score(self, out, box, hw) -> torch.Tensor:
        if self.kind == "cells":
            return (out.argmax(1) == centre_cell(box, tuple(hw))).float().mean()
        return (box_iou(cxcywh_to_xyxy(out), cxcywh_to_xyxy(box)) >= 0.5).float().mean()

    def forward(self, *batch):
        out, box, hw = self.predict(*batch), batch[-1], batch[0].shape[-2:]
        if self.kind == "cells":
            loss = F.cross_entropy(out, centre_cell(box, tuple(hw)))
        else:
            loss = l1_loss(out, box) + giou_loss(out, box)
        return loss, self.score(out.detach(), box, hw)


def run_probe(kind, model, train, val, seconds, batch, lr):
    """Train a probe on fresh copies of ``model``'s fusion and head."""
    torch.manual_seed(0)
    probe = Probe(kind, model)
    params = [p for p in probe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    probe.train()
    start, step, recent = time.time(), 0, []
    while time.time() - start < seconds:
        idx = torch.randint(0, len(train[0]), (batch,))
        loss, score = probe(*(t[idx] for t in train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        recent = (recent + [score.item()])[-100:]
    probe.eval()
    with torch.no_grad():
        val_score = probe.score(probe.predict(*val), val[-1], val[0].shape[-2:]).item()
    return {"probe": kind, "steps": step, "batch": batch, "seconds": seconds,
            "train_last_100": sum(recent) / len(recent), "val": val_score}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, None)
    parser.add_argument("--pretrained", default="runs/demo/pretrain/visual.safetensors",
                        help="visual.safetensors from lads pretrain; 'none' for a random backbone")
    parser.add_argument("--seconds", type=float, default=120, help="training time of each probe")
    parser.add_argument("--out", default="benchmarks/results/head-probe/latest",
                        help="folder for probe.md and probe.json (benchmarks/results/head-probe/MACHINE-DATE-COMMIT)")
    args = parser.parse_args()
    pretrained = "null" if args.pretrained == "none" else args.pretrained
    cfg = load_config(args.config, [f"model.visual.pretrained={pretrained}", "model.dense=true",
                                    "data.augment=false", *config_overrides(args, None)])
    torch.manual_seed(0)
    model = LADS(cfg.model).eval()
    tokenizer = load_tokenizer(cfg.model.text.name)
    started = time.time()
    train, val = (cache(model, cfg, s, tokenizer) for s in (cfg.data.train_split, "val"))
    print(f"cached {len(train[0])} train and {len(val[0])} val expressions in {time.time() - started:.0f} s")
    cls = F.normalize(train[2][:, 0], dim=1)
    text = {"cls_mean_cosine": (cls @ cls.T).mean().item(),
            "cls_std_over_norm": (train[2][:, 0].std(0).mean() / train[2][:, 0].norm(dim=1).mean()).item()}
    print(f"text [CLS] across expressions: mean cosine {text['cls_mean_cosine']:.5f}")
    results = []
    for kind, batch in (("box", cfg.train.batch_size), ("oracle", 32), ("cells", 32)):
        results.append(run_probe(kind, model, train, val, args.seconds, batch, cfg.train.lr if kind == "box" else 1e-3))
        print(json.dumps(results[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"text": text, "probes": results, "config": args.config,
                                                "data": cfg.data.path, "threads": torch.get_num_threads()}, indent=2))
    lines = ["| probe | steps × batch | train (last 100 steps) | val |", "|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['steps']} × {r['batch']} | {100 * r['train_last_100']:.1f} % "
              f"| {100 * r['val']:.1f} % |"
              for r in results]
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
