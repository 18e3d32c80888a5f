"""Offline: a text model that cannot be had fails at once with one message naming the ways out;
what does not need its weights (shapes, ``lads bench``) needs no download; ``dir(lads)``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import lads
from lads.errors import LadsError

ROOT = Path(__file__).resolve().parents[1]


def no_network(*args, **kwargs):
    raise OSError("no network in this test")


@pytest.mark.parametrize("offline_flag", [True, False])
def test_a_missing_text_model_fails_at_once_naming_the_ways_out(monkeypatch, offline_flag):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_flag)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # an empty cache
    with pytest.raises(LadsError) as error:
        lads.build_model("lads-r50")
    message = str(error.value)
    assert "'bert-base-uncased'" in message and "model.text.name" in message
    assert "model.text.pretrained=false" in message and "--random-text" in message


def test_random_text_weights_need_no_file(monkeypatch):
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = lads.build_model("lads-r50", ["model.text.pretrained=false", "model.fusion.num_layers=1"])
    assert model.text_backbone.hidden_size == 768 and len(model.text_backbone.bert.encoder.layer) == 6


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lads.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_info_offline_is_one_line(tmp_path):
    result = cli("info", "--config", "lads-r50", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("lads info: error: text model 'bert-base-uncased'")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bench_of_the_paper_preset_needs_no_download(tmp_path):
    result = cli("bench", "--config", "lads-r50", "--image-size", "64", "--batch", "1", "--keep", "0.5",
                 "--min-time", "0.05", "--rounds", "1", "--threads", "1", "--out", tmp_path / "b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert bench["meta"]["config"] == "lads-r50"


def test_tab_completion_finds_the_api():
    assert {"LADS", "build_model", "load_records", "load_config", "__version__"} <= set(dir(lads))
    assert callable(lads.load_records)
