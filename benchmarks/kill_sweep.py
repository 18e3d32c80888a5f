"""Killed at any moment: SIGKILL ``lads train`` at many points, resume, compare (docs/design.md §5d).

A kill point is a moment of a run: right after optimizer step N (``step:N``), or inside its K-th
checkpoint write: before, halfway through (the file cut to half its bytes) or after writing the
weights, the optimizer state or the metadata (``weights:during:K``, ``state:after:K``,
``meta:before:K`` …), right after the old checkpoint is renamed away or the new one into place
(``renamed:old:K``, ``renamed:new:K``), or while the old one is deleted (``prev:during:K``).

For each point a run is started with the point armed and killed there (SIGKILL: no handler runs),
then resumed with ``lads train --resume`` (or started again when it had written no checkpoint
yet) and run to the end. Checked every time: the resume read a complete checkpoint, lost at most
``train.checkpoint_every`` steps, and ended with weights equal, bit for bit, to those of a run
that was never killed; no temporary or previous checkpoint folder is left behind.

    python benchmarks/kill_sweep.py --data runs/demo/data --out benchmarks/results/kill-sweep/<machine>-<date>-<commit>

``--points`` names points; by default ``--kills`` of them spread over every kind. The worker mode
(``--worker POINT -- ARGS``) is ``lads ARGS`` with the point armed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STEPS, EVERY = 12, 3  # steps of each run, train.checkpoint_every: checkpoints at 3, 6, 9 and 12
FILES = ("weights", "state", "meta")
WHEN = ("before", "during", "after")


def all_points() -> list[str]:
    """Every kill point: each step, and each moment of the first three checkpoint writes (the
    first has no old checkpoint to rename or delete)."""
    steps = [f"step:{n}" for n in range(1, STEPS + 1)]
    writes = []
    for k in (1, 2, 3):  # in the order they happen
        writes += [f"{f}:{w}:{k}" for f in FILES for w in WHEN]
        writes += [f"renamed:new:{k}"] if k == 1 else [f"renamed:old:{k}", f"renamed:new:{k}", f"prev:during:{k}"]
    return steps + writes


def spread(points: list[str], n: int) -> list[str]:
    """``n`` points, alternating steps and checkpoint moments, evenly spaced within each."""
    steps = [p for p in points if p.startswith("step:")]
    writes = [p for p in points if not p.startswith("step:")]
    take_steps = min(len(steps), n // 3)
    pick = [steps[round(i * (len(steps) - 1) / max(1, take_steps - 1))] for i in range(take_steps)]
    rest = n - len(pick)
    pick += [writes[round(i * (len(writes) - 1) / max(1, rest - 1))] for i in range(min(rest, len(writes)))]
    return list(dict.fromkeys(pick))


# ----------------------------------------------------------------------------- the worker


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Make this process SIGKILL itself at ``point``, by wrapping what the engine calls."""
    import shutil

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import lads.engine as engine

    kind, *rest = point.split(":")
    n = int(rest[-1])
    if kind == "step":
        steps = [0]

        def after_step(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == n:
                die()

        register_optimizer_step_post_hook(after_step)
        return
    writes = [0]
    save = engine.save_checkpoint

    def counted(*args, **kwargs):
        writes[0] += 1
        return save(*args, **kwargs)

    engine.save_checkpoint = counted
    when = rest[0]

    def armed(moment: str) -> bool:
        return writes[0] == n and when == moment

    def wrap_writer(owner, name: str, target=lambda args: args[1]):
        original = getattr(owner, name)

        def writer(*args, **kwargs):
            path = Path(target(args))
            if ".tmp-" not in str(path):  # only the files of a checkpoint being written
                return original(*args, **kwargs)
            if armed("before"):
                die()
            result = original(*args, **kwargs)
            if armed("during"):
                os.truncate(path, path.stat().st_size // 2)
                die()
            if armed("after"):
                die()
            return result

        setattr(owner, name, writer)

    if kind == "weights":
        import safetensors.torch

        wrap_writer(safetensors.torch, "save_file")
    elif kind == "state":
        wrap_writer(torch, "save")
    elif kind == "meta":
        wrap_writer(Path, "write_text", target=lambda args: args[0] if args[0].name == "meta.json" else "")
    elif kind == "renamed":
        replace = os.replace

        def renamed(src, dst):
            replace(src, dst)
            moved_old = str(dst).endswith(".prev")
            if writes[0] == n and ((when == "old" and moved_old) or (when == "new" and ".tmp-" in str(src))):
                die()

        os.replace = renamed
    elif kind == "prev":
        rmtree = shutil.rmtree

        def removing(path, *args, **kwargs):
            path = Path(path)
            if writes[0] == n and path.name.endswith(".prev") and path.exists():
                next(f for f in sorted(path.rglob("*")) if f.is_file()).unlink()  # some of it is gone
                die()
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = removing
    else:
        raise SystemExit(f"unknown kill point {point!r}")


# ----------------------------------------------------------------------------- the sweep


def train_args(args, out: Path) -> list[str]:
    sets = [f"data.path={args.data}", f"train.out={out}", f"train.max_steps={STEPS}", "train.epochs=1000",
            f"train.checkpoint_every={EVERY}", "train.batch_size=4", "train.micro_batch=4", "train.eval_every=0",
            "train.log_every=1", "train.amp=none", "train.warmup_epochs=0", "data.num_workers=0",
            "model.image_size=64", "model.visual.width=8", "model.fusion.d_model=32", "model.fusion.num_heads=2",
            "model.fusion.ffn_dim=64", "model.fusion.num_layers=2", "model.gating.hidden=8",
            "model.text.num_layers=2", *(f"model.text.name={args.text}" for _ in [0] if args.text), *args.set]
    return ["train", "--config", "tiny", *(a for s in sets for a in ("--set", s))]


def run(args, lads_args: list[str], point: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__] + (["--worker", point] if point else ["--worker", "none"]) + ["--", *lads_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def last_logged_step(run_dir: Path) -> int:
    steps = [0]
    for line in (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line cut by the kill
    return max(steps)


def leftovers(run_dir: Path) -> tuple[list[str], int]:
    stale = [p for p in run_dir.iterdir() if ".tmp-" in p.name or p.name.endswith(".prev")]
    return [p.name for p in stale], sum(f.stat().st_size for p in stale for f in p.rglob("*") if f.is_file())


def sweep_point(args, point: str, reference: dict) -> dict:
    import torch

    out = Path(args.work) / re.sub(r"\W", "-", point)
    killed = run(args, train_args(args, out), point)
    row = {"point": point, "killed": killed.returncode == -signal.SIGKILL, "killed_after_step": last_logged_step(out)}
    written = any((out / name / "meta.json").exists() for name in ("checkpoint", "checkpoint.prev"))
    began = time.time()
    resumed = run(args, ["train", "--resume", str(out)] if written else train_args(args, out))
    row["resume_s"] = round(time.time() - began, 1)
    row["resume_ok"] = resumed.returncode == 0
    if not row["resume_ok"]:
        row["error"] = resumed.stderr.strip().splitlines()[-1:] or ["?"]
        return row
    found = re.search(r"resuming from (\S+) at step (\d+)", resumed.stdout)
    row["resumed_from"] = Path(found.group(1)).name if found else None
    row["resumed_at_step"] = int(found.group(2)) if found else 0
    row["lost_steps"] = row["killed_after_step"] - row["resumed_at_step"]
    got = weights(out)
    row["weights_equal"] = set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in reference)
    row["left"], row["left_bytes"] = leftovers(out)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| kill point | killed | after step | resumed from | at step | lost steps | weights equal | left |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['point']}` | {r['killed']} | {r['killed_after_step']} "
                     f"| {r.get('resumed_from') or '(new run)'} "
                     f"| {r.get('resumed_at_step', '–')} | {r.get('lost_steps', '–')} "
                     f"| {r.get('weights_equal', r.get('error'))} "
                     f"| {r.get('left_bytes', '–')} B |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    return {"kills": len(rows), "killed": sum(r["killed"] for r in rows),
            "resumed": sum(r["resume_ok"] for r in rows),
            "weights_equal": sum(bool(r.get("weights_equal")) for r in rows),
            "max_lost_steps": max((r.get("lost_steps", 0) for r in rows), default=0),
            "checkpoint_every": EVERY, "left_bytes": sum(r.get("left_bytes", 0) for r in rows)}


def main():
    if "--worker" in sys.argv:  # kill_sweep.py --worker POINT -- lads arguments
        point, lads_args = sys.argv[sys.argv.index("--worker") + 1], sys.argv[sys.argv.index("--") + 1:]
        if point != "none":
            arm(point)
        from lads.cli import main as lads

        sys.exit(lads(lads_args))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a REFER-format folder (e.g. runs/demo/data)")
    parser.add_argument("--text", help="text backbone (default: the preset's, 2 layers of it)")
    parser.add_argument("--kills", type=int, default=len(all_points()), help="how many points, spread over the kinds")
    parser.add_argument("--points", nargs="*", help="these kill points instead")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides for every run")
    parser.add_argument("--work", default="runs/kill-sweep")
    parser.add_argument("--out", default="benchmarks/results/kill-sweep/latest",
                        help="folder for kill_sweep.md and kill_sweep.json "
                             "(benchmarks/results/kill-sweep/MACHINE-DATE-COMMIT)")
    args = parser.parse_args()
    points = args.points or spread(all_points(), args.kills)
    reference_run = Path(args.work) / "uninterrupted"
    done = run(args, train_args(args, reference_run))
    if done.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed: {done.stderr[-2000:]}")
    reference, rows = weights(reference_run), []
    for point in points:
        rows.append(sweep_point(args, point, reference))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"summary": summary(rows), "rows": rows, "steps": STEPS, "cpu": platform.processor() or platform.machine()}
    (out / "kill_sweep.json").write_text(json.dumps(result, indent=2))
    (out / "kill_sweep.md").write_text(f"{json.dumps(result['summary'])}\n\n{markdown(rows)}\n")
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
