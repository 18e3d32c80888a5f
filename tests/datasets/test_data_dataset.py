"""RecDataset and collate: shapes, dtypes, tokens, boxes; ``lads data stats``."""

from __future__ import annotations

import torch

from lads.cli import main as lads_main
from lads.datasets import load_records
from lads.datasets.dataset import RecDataset, collate
from lads.datasets.records import Record
from lads.datasets.transforms import Augment, box_to_original


def test_items_and_batches(refer_dir, tokenizer):
    records, _ = load_records(refer_dir, "train")
    long_text = " ".join(["word"] * 60)
    records.append(Record(records[0].image, long_text, (4, 6, 24, 16), "refcoco", "train"))
    dataset = RecDataset(records, tokenizer, image_size=48)
    item = dataset[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert item["pixel_mask"].shape == (48, 48) and item["pixel_mask"].dtype == torch.bool
    assert item["pixel_mask"][36:].all() and not item["pixel_mask"][:36].any()  # 64x48 -> 48x36
    assert item["input_ids"].dtype == item["attention_mask"].dtype == torch.long
    assert item["input_ids"][0] == tokenizer.cls_token_id
    assert tokenizer.decode(item["input_ids"][1:-1]) == "the left cup"
    assert item["box"].dtype == torch.float32
    assert torch.allclose(item["box"], torch.tensor([14, 11, 20, 10]) * 0.75 / 48)
    assert item["meta"]["record"] is records[0] and item["meta"]["index"] == 0
    assert torch.allclose(box_to_original(item["box"], item["meta"]), torch.tensor([4.0, 6, 24, 16]))

    assert len(dataset[3]["input_ids"]) == 40  # truncated, [SEP] kept last
    assert dataset[3]["input_ids"][-1] == tokenizer.sep_token_id

    batch = collate([dataset[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 48, 48) and batch["pixel_mask"].shape == (4, 48, 48)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 40)
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 35
    assert batch["input_ids"][0, 5:].eq(0).all() and batch["box"].shape == (4, 4)
    assert len(batch["meta"]) == 4


def test_train_items_flip_text_with_image(refer_dir, tokenizer):
    records, _ = load_records(refer_dir, "train")
    dataset = RecDataset(records[:1], tokenizer, 32, train=True, augment=Augment(flip=1.0))
    item = dataset[0]
    assert item["meta"]["flipped"] and item["meta"]["text"] == "the right cup"
    assert item["image"].shape == (3, 32, 32) and 0 < item["box"].min() and item["box"].max() <= 1
    assert torch.allclose(box_to_original(item["box"], item["meta"]), torch.tensor([4.0, 6, 24, 16]), atol=1e-3)


def test_training_split_takes_the_config_augmentation(refer_dir, tokenizer):
    from lads.config import load_config
    from lads.engine import load_split

    cfg = load_config("tiny", [f"data.path={refer_dir}", "data.crop=0.3", "data.hue=0.7"])
    train, val = load_split(cfg, "train", True, tokenizer), load_split(cfg, "val", False, tokenizer)
    assert train.train and (train.augment.crop, train.augment.hue) == (0.3, 0.7)
    assert not val.train


def test_stats_table(refer_dir, tmp_path, capsys):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"image": "a.jpg", "expression": "a b c", "box": [0, 0, 2, 2]}\nnot json\n')
    assert lads_main(["data", "stats", str(refer_dir), str(jsonl)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["dataset", "split", "images", "objects", "expressions", "mean",
                              "words", "max", "words", "skipped", "missing", "images"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out[1:8]}
    assert rows[(str(refer_dir), "train")] == ["1", "2", "3", "3.0", "3", "0", "0"]
    assert rows[(str(refer_dir), "val")] == ["1", "1", "1", "2.0", "2", "1", "0"]
    assert rows[(str(refer_dir), "testB")] == ["1", "1", "1", "4.0", "4", "2", "0"]
    assert rows[(str(jsonl), "test")] == ["1", "1", "1", "3.0", "3", "0", "1"]  # a.jpg is not there
    assert rows[(str(jsonl), "-")] == ["0", "0", "0", "-", "0", "1", "0"]
    notes = "\n".join(out[8:])
    assert "skipped 1: empty expression (first: " in notes and "ref 3 sentence 104" in notes
    assert f"{jsonl}: skipped 1: not valid JSON (first: {jsonl}:2" in notes
    assert f"{jsonl}: 1 image file(s) missing (first: {tmp_path / 'a.jpg'})" in notes


def test_stats_checks_the_image_root(refer_dir, tmp_path, capsys):
    assert lads_main(["data", "stats", str(refer_dir), "--image-root", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"lads data stats: error: --image-root {tmp_path / 'nowhere'}: "
                                              "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lads_main(["data", "stats", str(refer_dir), "--image-root", str(empty), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[-1] == "1" and "1 image file(s) missing" in out
    assert lads_main(["data", "stats", str(refer_dir), "--image-root", str(empty), "--split", "train",
                      "--no-image-check"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[-1] == "-" and "missing (first" not in out
