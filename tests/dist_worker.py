"""Run by the distributed test, as ``torchrun --nproc_per_node 2`` and as one plain process:
train a few steps with the engine, save this rank's parameters, evaluate 7 expressions."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lads.config import load_config
from lads.datasets import load_records
from lads.datasets.dataset import RecDataset
from lads.engine import evaluate, train
from lads.models import LADS
from lads.models.text import load_tokenizer
from lads.util import dist

overrides_file, out = sys.argv[1], Path(sys.argv[2])
cfg = load_config("tiny", json.loads(Path(overrides_file).read_text()))
torch.manual_seed(0)
model = LADS(cfg.model)
train(cfg, model=model)
rank = dist.get_rank()
model.eval()
params = {k: v.detach().contiguous() for k, v in model.named_parameters()}
save_file(params, str(out / f"rank{rank}.safetensors"))
records, _ = load_records(cfg.data.path, "train")
dataset = RecDataset(records[:7], load_tokenizer(model.config.text.name), cfg.model.image_size)
summary = evaluate(model, dataset, batch_size=2, mode="masked", progress=False)
(out / f"eval{rank}.json").write_text(json.dumps({"expressions": summary["expressions"],
                                                  "world": dist.get_world_size()}))
dist.cleanup()
