"""Bad input is refused with messages that say what was expected; the CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_batch

from lads import __version__
from lads.config import ConfigError, known_presets, load_config
from lads.errors import LadsError
from lads.models import Gates


def test_presets_and_overrides():
    assert known_presets() == ["lads-r50", "pretrain-coco", "pretrain-mixture", "refcoco", "refcoco+", "refcoco+-ft",
                               "refcoco-ft", "refcocog", "refcocog-ft", "referit", "referit-ft", "tiny", "tiny-paper"]
    assert load_config("refcoco").model.image_size == 512  # a dataset preset builds on lads-r50
    cfg = load_config("tiny", ["model.fusion.num_layers=2", "model.loss.mi=0"])
    assert cfg.model.fusion.num_layers == 2 and cfg.model.loss.mi == 0.0
    assert cfg.model.visual.width == 16 and cfg.model.text.max_tokens == 40  # from the base chain


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError,
                       match=r"'nope'.*known presets: lads-r50, pretrain-coco, pretrain-mixture, refcoco, .*, tiny"):
        load_config("nope")


def test_unknown_override_key_names_the_known_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) heads; known keys: d_model, num_layers, num_heads"):
        load_config("tiny", ["model.fusion.heads=4"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) opt"):
        load_config("tiny", ["model.opt.lr=1"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.fusion.num_layers=two", "model.fusion.num_layers: expected int"),
        ("model.fusion.num_layers=true", "model.fusion.num_layers: expected int"),
        ("model.dense=1", "model.dense: expected bool"),
        ("model.visual=3", "model.visual: expected a section"),
        ("model.loss.giou=high", "model.loss.giou: expected float"),
    ],
)
def test_wrong_type_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("tiny", [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["model.dense"])


@pytest.mark.parametrize(
    "position, bad, message",
    [
        (0, torch.randn(2, 1, 64, 64), r"images: expected a float tensor \(B, 3, H, W\)"),
        (0, torch.zeros(2, 3, 64, 64, dtype=torch.uint8), r"images: expected a float tensor"),
        (1, torch.zeros(2, 64, 64), r"pixel_mask: expected a bool tensor \(2, 64, 64\)"),
        (1, torch.zeros(2, 32, 64, dtype=torch.bool), r"pixel_mask: expected a bool tensor \(2, 64, 64\)"),
        (2, torch.zeros(2, 7), r"input_ids: expected a long tensor \(2, L\)"),
        (2, torch.zeros(3, 7, dtype=torch.long), r"input_ids: expected a long tensor \(2, L\)"),
        (3, torch.ones(2, 6, dtype=torch.long), r"attention_mask: expected a tensor \(2, 7\)"),
    ],
)
def test_bad_input_tensors_are_refused(tiny_model, position, bad, message):
    inputs = list(make_batch(batch=2, length=7))
    inputs[position] = bad
    with pytest.raises(LadsError, match=message):
        tiny_model(*inputs)


def test_bad_gates_are_refused(tiny_model):
    inputs = make_batch(batch=2)
    n_layer, n_filter = tiny_model.layout.num_layer_gates, tiny_model.layout.num_filter_gates
    with pytest.raises(LadsError, match=rf"gates.layer: expected shape \(2, {n_layer}\)"):
        tiny_model(*inputs, gates=Gates(torch.ones(2, n_layer + 1), torch.ones(2, n_filter)))
    with pytest.raises(LadsError, match=rf"gates.filter: expected shape \(2, {n_filter}\)"):
        tiny_model(*inputs, gates=Gates(torch.ones(2, n_layer), torch.ones(1, n_filter)))
    with pytest.raises(LadsError, match="gates.filter: hard gates must be 0 or 1"):
        tiny_model(*inputs, gates=Gates(torch.ones(2, n_layer), torch.full((2, n_filter), 0.5)))


ROOT = Path(__file__).resolve().parents[1]


def lads(*args: str) -> subprocess.CompletedProcess:
    """``lads ARGS`` as a subprocess, running this checkout's package."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "lads.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def test_cli_version_and_help():
    version = lads("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"lads {__version__}"
    help_ = lads("--help")
    assert help_.returncode == 0 and "info" in help_.stdout and "data" in help_.stdout


def test_every_option_of_every_command_has_a_help_text():
    import argparse
    import importlib

    from lads.cli import COMMANDS

    def silent(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, p in a.choices.items():
                    yield from silent(p, f"{name} {sub}")
            elif not a.help:
                yield name, a.option_strings or a.dest

    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        missing = list(silent(parser, name))
        assert not missing, f"no help text for {missing}"


def test_the_library_never_imports_a_command():
    """Models, datasets, engine, inference, analysis and util stand below the commands."""
    import re

    root = Path(__file__).parents[1] / "lads"
    for path in root.rglob("*.py"):
        if path.parent.name == "commands" or path.name == "cli.py":
            continue
        found = re.findall(r"^\s*(?:from|import) lads\.(?:commands|cli)\b.*$", path.read_text(), re.M)
        assert not found, f"{path.relative_to(root.parent)}: {found}"


def test_errors_name_the_whole_command(tmp_path):
    result = lads("data", "stats", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and result.stderr.startswith("lads data stats: error: ")


def test_cli_info_tiny():
    """``lads info --config tiny`` builds the preset as shipped (the MiniLM text model)."""
    result = lads("info", "--config", "tiny")
    assert result.returncode == 0, result.stderr
    assert "20 layer gates, 944 filter gates, 24 candidate layers" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("total")


def test_cli_error_is_one_line_and_exit_2():
    result = lads("info", "--config", "nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lads info: error: unknown preset or config file 'nope'; "
        "known presets: lads-r50, pretrain-coco, pretrain-mixture, refcoco, refcoco+, refcoco+-ft, refcoco-ft, "
        "refcocog, refcocog-ft, referit, referit-ft, tiny, tiny-paper"
    ]
