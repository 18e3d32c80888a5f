"""``lads demo`` end to end on a minute budget: stages, report, learning curves, rerun."""

from __future__ import annotations

import json

import pytest

from lads.cli import main as lads_main

SMALL = ["demo.images=24", "demo.shared_minutes=0.03", "demo.minutes=0.03", "pretrain.max_minutes=0.02",
         "pretrain.batch_size=4", "model.image_size=64", "model.visual.width=8", "model.fusion.d_model=32",
         "model.fusion.num_heads=2", "model.fusion.ffn_dim=64", "model.fusion.num_layers=2",
         "model.gating.hidden=8", "model.text.num_layers=2", "train.batch_size=4", "train.micro_batch=4",
         "train.eval_every=0.5"]


@pytest.mark.slow
def test_demo_end_to_end_then_rerun_reuses(tmp_path, tiny_text_dir, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out)]
    for o in [*SMALL, f"model.text.name={tiny_text_dir}"]:
        args += ["--set", o]
    assert lads_main(args) == 0
    report = (out / "report.md").read_text()
    for row in ("LADS (lads), token head", "LADS (lads), [CLS] head (paper)", "dense (dense), token head"):
        assert row in report
    assert "| stage 1: dense, shared |" in report and "| stage 2: LADS |" in report
    assert (out / "curves.png").stat().st_size > 0 and "curves.png" in report
    rows = json.loads((out / "results.json").read_text())
    assert [set(r["splits"]) for r in rows] == [{"test", "heldout"}] * 2
    lads_meta = json.loads((out / "lads" / "checkpoint" / "config.json").read_text())
    assert lads_meta["model"]["init"] == str(out / "shared" / "checkpoint")  # stage 2 starts from stage 1
    capsys.readouterr()

    assert lads_main(args) == 0  # a rerun trains nothing again
    printed = capsys.readouterr().out
    assert printed.count("done already") == 3 and "reusing the synthetic benchmark" in printed
