"""Faults a long run meets (docs/design.md §5d): weights behind an unreachable or failing URL,
a full disk at a checkpoint, a training process killed at any moment, a corrupt image mid-epoch,
more loader workers than cores."""

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lads.errors import LadsError
from lads.util.download import fetch

# ----------------------------------------------------------------------------- weights by URL


class Files(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (name -> bytes); ``/short/...`` announces more bytes than it sends,
    ``/silent/...`` never answers; counts the requests."""

    files, requests = {}, []

    def do_GET(self):
        Files.requests.append(self.path)
        if self.path.startswith("/silent/"):
            time.sleep(5)
            return
        body = Files.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if self.path.startswith("/short/") else 0)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Files.files, Files.requests = {}, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def weights_file(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.visual_backbone.state_dict(), buffer)
    return buffer.getvalue()


def test_weights_by_url_are_checked_and_cached(server, tmp_path):
    from lads.models import build_model

    model = build_model("tiny", ["model.text.pretrained=false"])
    body = weights_file(model)
    name = f"w-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    Files.files = {name: body, "w-0123abcd.pth": body, "plain.pth": body, "cut.pth": body}
    url = f"{server}/{name}"
    loaded = build_model("tiny", ["model.text.pretrained=false", f"model.visual.pretrained={url}"])
    torch.testing.assert_close(loaded.visual_backbone.state_dict(), model.visual_backbone.state_dict())
    build_model("tiny", ["model.text.pretrained=false", f"model.visual.pretrained={url}"])
    assert Files.requests == [f"/{name}"]  # the second model read the cached copy
    assert fetch(f"{server}/plain.pth", "x").read_bytes() == body  # no hash in the name: size only

    with pytest.raises(LadsError, match=r"model\.visual\.pretrained=.*SHA-256 does not start with 0123abcd"):
        build_model("tiny", ["model.text.pretrained=false", f"model.visual.pretrained={server}/w-0123abcd.pth"])
    with pytest.raises(LadsError, match="stopped at|cannot download"):
        fetch(f"{server}/short/cut.pth", "model.visual.pretrained")
    with pytest.raises(LadsError, match="cannot download it .*404"):
        fetch(f"{server}/missing.pth", "model.visual.pretrained")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert sorted(p.name for p in cache.iterdir()) == sorted([name, "plain.pth"])  # nothing partial kept


def test_a_silent_server_is_waited_for_a_bounded_time(server):
    began = time.monotonic()
    with pytest.raises(LadsError, match=r"setting=.*/silent/w\.pth: cannot download it .*timed out"):
        fetch(f"{server}/silent/w.pth", "setting", timeout=1.0)
    assert time.monotonic() - began < 4


def test_unreachable_url_is_one_line_from_the_cli(tmp_path):
    """A port nobody listens on: ``lads info`` exits 2 with one line naming the setting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    url = f"http://127.0.0.1:{port}/w.pth"
    done = subprocess.run([sys.executable, "-m", "lads.cli", "info", "--config", "tiny", "--set",
                           f"model.visual.pretrained={url}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCH_HOME": str(tmp_path)})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"lads info: error: model.visual.pretrained={url}: cannot download it")
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- killed at any moment

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_sweep.py"


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_uninterrupted(tmp_path, tiny_text_dir, synth_data):
    """benchmarks/kill_sweep.py at a handful of points (the full sweep is the benchmark): after a
    step, halfway through the weights and after the optimizer state of a checkpoint, between its
    two renames. Every resume reads a complete checkpoint (the previous one, renamed away, too),
    loses at most ``checkpoint_every`` steps, ends bit for bit at the uninterrupted weights and
    leaves no partial checkpoint behind."""
    points = ["step:5", "weights:during:2", "state:after:3", "renamed:old:2"]
    done = subprocess.run([sys.executable, str(SWEEP), "--data", synth_data, "--text", tiny_text_dir,
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--points", *points],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(SWEEP.parents[1]), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "kill_sweep.json").read_text())
    rows = {r["point"]: r for r in result["rows"]}
    assert list(rows) == points
    for point, r in rows.items():
        assert r["killed"] and r["resume_ok"] and r["weights_equal"], r
        assert 0 <= r["lost_steps"] <= result["summary"]["checkpoint_every"], r
        assert r["left"] == [] and r["left_bytes"] == 0, r
    assert rows["step:5"]["killed_after_step"] == 4 and rows["step:5"]["resumed_at_step"] == 3
    assert rows["weights:during:2"]["resumed_at_step"] == 3  # the half-written checkpoint 6 was not read
    assert rows["renamed:old:2"]["resumed_from"] == "checkpoint.prev"


# ----------------------------------------------------------------------------- a full disk

FULL_DISK = """
import resource, signal, sys
import lads.engine as engine
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
save, writes = engine.save_checkpoint, []
def limited(*args, **kwargs):
    writes.append(1)
    if len(writes) == 2:  # the disk is full from the second checkpoint on
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
    return save(*args, **kwargs)
engine.save_checkpoint = limited
from lads.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_text_dir, synth_data):
    """A checkpoint write that fails for lack of space (a file-size limit: EFBIG from the kernel)
    stops the run with one line naming the folder and the cause; the previous checkpoint is
    intact and loads, and nothing partial is left."""
    from helpers import engine_overrides

    from lads.models.pretrained import load_model
    from lads.util.checkpoint import read_meta

    out = tmp_path / "run"
    sets = engine_overrides(tiny_text_dir, synth_data, out) + [
        "train.max_steps=6", "train.epochs=100", "train.checkpoint_every=2", "train.batch_size=4",
        "train.micro_batch=4"]
    done = subprocess.run([sys.executable, "-c", FULL_DISK, "train", "--config", "tiny",
                           *(a for s in sets for a in ("--set", s))], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"lads train: error: checkpoint {out / 'checkpoint'}: cannot write it (File too large); "
                    "the previous checkpoint is kept")
    assert "Traceback" not in done.stderr
    _, _, meta = read_meta(out / "checkpoint")
    assert meta["step"] == 2
    load_model(out / "checkpoint")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


# ----------------------------------------------------------------------------- loader workers


def test_loader_workers_fit_the_cores_unless_set(monkeypatch):
    """The REFER presets leave ``data.num_workers`` unset: 2 cores give one worker (not the 8
    that made torch warn), a share of the cores per torchrun process, at most 8; a set value stays."""
    from lads.config import load_config
    from lads.util.dist import loader_workers

    assert all(load_config(p).data.num_workers is None for p in ("refcoco", "refcocog", "referit", "pretrain-mixture"))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, expected in ((1, 0), (2, 1), (16, 8), (128, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert loader_workers(None) == expected
        assert loader_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers(None) == 3


# ----------------------------------------------------------------------------- a corrupt image mid-epoch


def test_corrupt_image_mid_epoch_is_skipped_and_counted(tmp_path, tiny_text_dir, synth_data, capsys):
    """An image that turns unreadable after the data was loaded (its bytes cut) is skipped
    where the epoch meets it, named on stderr and in the log, and the run goes on; past
    ``data.max_bad_images`` the run stops with one error that names it, after a checkpoint."""
    import shutil

    from helpers import engine_overrides

    from lads.config import load_config
    from lads.datasets import load_records
    from lads.engine import train

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    records, _ = load_records(data, "train")
    bad = records[0].image
    common = engine_overrides(tiny_text_dir, str(data), tmp_path / "run") + [
        "train.epochs=1", "train.batch_size=4", "train.micro_batch=4", "train.checkpoint_every=1000"]
    cfg = load_config("tiny", common)
    Path(bad).write_bytes(Path(bad).read_bytes()[:200])  # cut after the records were read: mid-epoch
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    noted = [r for r in log if "skipped_image" in r]
    assert [r["skipped_image"] for r in noted] == [bad] and "unreadable image" in noted[0]["reason"]
    assert f"skipped an unreadable training image (1 so far; data.max_bad_images=100): {bad}" in capsys.readouterr().err
    assert max(r["step"] for r in log) == len(records) // 4  # the epoch was trained to its end

    with pytest.raises(LadsError, match=rf"1 training images could not be read, more than data.max_bad_images=0 "
                                        rf"\(the first: {bad}: unreadable image"):
        train(load_config("tiny", common + [f"train.out={tmp_path / 'strict'}", "data.max_bad_images=0"]))
    assert (tmp_path / "strict" / "checkpoint" / "meta.json").exists()
