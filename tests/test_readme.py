"""The README's code runs as written: every Python block, and every shell block marked
``<!-- test: run -->``, in a folder holding the files the README names (a trained checkpoint at
``runs/demo/lads/checkpoint``, the data in ``runs/demo/data``, ``photo.jpg``, ``my_config.json``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(<!-- test: run -->\s*\n)?```(\w+)[^\n]*\n(.*?)```", re.S)


def blocks(language: str, marked_only: bool) -> list[str]:
    found = FENCE.findall((ROOT / "README.md").read_text())
    return [code for mark, lang, code in found if lang == language and (mark or not marked_only)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, trained, synth_data):
    from lads.datasets import load_records

    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(trained[0], folder / "runs" / "demo" / "lads" / "checkpoint")
    shutil.copytree(synth_data, folder / "runs" / "demo" / "data")
    record = load_records(synth_data, "test")[0][0]
    Image.open(record.image).convert("RGB").save(folder / "photo.jpg")
    (folder / "my_config.json").write_text(json.dumps({"base": "tiny", "model": {"fusion": {"num_layers": 2}}}))
    return folder


def test_the_readme_has_blocks_to_run():
    assert len(blocks("python", False)) >= 1 and len(blocks("bash", True)) >= 1


@pytest.mark.parametrize("index", range(len(blocks("python", False))))
def test_python_block_runs(workdir, index, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(blocks("python", False)[index], f"README.md python block {index + 1}", "exec"), namespace)


@pytest.mark.parametrize("index", range(len(blocks("bash", True))))
def test_marked_shell_block_runs(workdir, index):
    """Each line (continuations joined, comments dropped) runs with ``lads`` as this Python's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    code = blocks("bash", True)[index].replace("\\\n", " ")
    for line in filter(None, (ln.split(" #")[0].strip() for ln in code.splitlines())):
        argv = shlex.split(line)
        assert argv[0] == "lads", f"a runnable README line must call lads: {line}"
        result = subprocess.run([sys.executable, "-m", "lads.cli", *argv[1:]], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{line}\n{result.stderr}"
