"""The main job on the embedded default, the synthetic REC benchmark: ``run_demo``, which
``lads demo`` calls.

Generate the benchmark, fit the step budgets to this machine's speed (a probe of a few training
steps), pre-train the visual backbone on its boxes (``lads.pretrain``, the role of the paper's
DETR weights), train with the ``tiny`` preset in two stages (docs/design.md §5a): the dense
network first, once, for every model (with LayerDrop on its fusion sublayers, so that the subnets
LADS cuts start from weights that work without some of them); then, from it and for the same
steps each, LADS (the gating network joins), the static control (the same, with gates that do
not read the expression; §5c) and the dense baseline; every stage has a cap in minutes as well.
Evaluate the three on the test and held-out-combination splits, run ``predict`` on a few test
images, draw what the subnets do (``lads.analysis.collect``) and the learning curves, and write
a report. A rerun reuses what is done and resumes what is not; SIGINT/SIGTERM stops the whole
demo after the running stage's checkpoint.

With ``demo.cls_steps`` (the ``tiny-paper`` preset: the paper's model, docs/design.md §5e) a dense
stage with Eq. 9 alone comes between the two, stage 2 starts from it, and ``demo.models`` picks
the models of stage 2.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SPLITS = ["test", "heldout"]
STAGE2 = {  # run folder: what it is, its overrides on top of stage 2's
    "lads": ("LADS (the gating network joins)", ["model.dense=false"]),
    "static": ("the static control (gates that do not read the expression)",
               ["model.dense=false", "model.gating.static=true"]),
    "dense": ("the dense baseline", ["model.dense=true"]),
}
CLS_STAGE = "eq9"  # the run folder of the dense stage with Eq. 9 alone (demo.cls_steps)


def run_demo(config: str = "tiny", overrides: list[str] = (), out="runs/demo", seed: int = 0) -> Path:
    """The whole demo in ``out`` with the preset or config file ``config`` and ``overrides``
    (``key=value``) on top, the synthetic benchmark generated with ``seed``; the report's path."""
    from lads.config import load_config
    from lads.datasets import synth
    from lads.evaluation import evaluate_checkpoints, markdown_table
    from lads.pretrain import WEIGHTS, pretrain

    overrides = list(overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    demo = load_config(config, overrides).demo
    _check_models(demo.models)
    step = _Counter(4 + bool(demo.cls_steps) + len(demo.models) + 4)
    data = out / "data"
    if not (data / "instances.json").exists():
        print(f"{step()} generating the synthetic benchmark ({demo.images} images) in {data}")
        synth.generate(data, seed=seed, images=demo.images)
    else:
        print(f"{step()} reusing the synthetic benchmark in {data}")
    budget = step_budget(out, config, [*overrides, f"data.path={data}"], step())
    overrides = [*overrides, *budget["overrides"]]
    demo = load_config(config, overrides).demo
    visual = out / "pretrain" / WEIGHTS
    if not (out / "pretrain" / "meta.json").exists():
        print(f"{step()} pre-training the visual backbone on the boxes of the training images, in {visual.parent}")
        pretrain(load_config(config, [*overrides, f"data.path={data}", f"pretrain.out={visual.parent}"]))
    else:
        print(f"{step()} reusing the pre-trained visual backbone {visual}")
    common = [*overrides, f"data.path={data}", f"model.visual.pretrained={visual}"]
    start = _stage(step(), "stage 1: the dense network, shared by the models of stage 2", out / "shared", config, [
        *common, "model.dense=true", f"train.max_steps={demo.shared_steps}", f"train.max_minutes={demo.shared_minutes}",
        "train.lr_drop_epoch=1000000", "train.epochs=1000000", f"model.layer_drop_fusion={demo.layer_drop_fusion}",
        *demo.shared_overrides])
    checkpoints = {}
    if demo.cls_steps:
        start = checkpoints[CLS_STAGE] = _stage(step(), "stage 1b: the dense network with Eq. 9 alone",
                                                out / CLS_STAGE, config, [
            *stage2_overrides(common, demo, start, demo.cls_steps, demo.cls_minutes), "model.dense=true"])
    branch = stage2_overrides(common, demo, start)
    for name in demo.models:
        what, more = STAGE2[name]
        checkpoints[name] = _stage(step(), f"stage 2: {what}", out / name, config, [*branch, *more])
    print(f"{step()} evaluating {len(checkpoints)} models on", ", ".join(SPLITS))
    rows = evaluate_checkpoints(list(checkpoints.values()), str(data), SPLITS)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    print(table)
    print(f"{step()} predicting on a few test images")
    pictures = _predict_examples(checkpoints["lads"], data, out / "predictions")
    print(f"{step()} drawing the subnets of the test expressions")
    analysis, static = _analyze(checkpoints["lads"], checkpoints.get("static"), data, out / "analysis")
    print(f"{step()} learning curves and the report")
    curves = _curves(out, list(checkpoints))
    report = _report(out, config, table, rows, pictures, analysis, static, curves, _stages(out, list(checkpoints)),
                     budget, time.time() - started)
    print(f"report: {report}")
    return report


class _Counter:
    """``[k/N]``, the demo's step numbers as it prints them."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self) -> str:
        self.done += 1
        return f"[{self.done}/{self.total}]"


def _check_models(models: list[str]) -> None:
    from lads.errors import LadsError

    if "lads" not in models or not set(models) <= set(STAGE2) or len(set(models)) != len(models):
        raise LadsError(f"demo.models must name LADS and any of {', '.join(STAGE2)} once each, got {models}")


def stage2_overrides(common: list[str], demo, start: Path, steps: int | None = None,
                     minutes: float | None = None) -> list[str]:
    """The overrides of every run that starts from another's weights ``start``: no LayerDrop,
    ``steps`` (default ``demo.steps``) steps within ``minutes`` (``demo.minutes``), with a short
    warm-up and the learning rates × 0.1 after ``demo.lr_drop_fraction`` of them."""
    steps, minutes = steps or demo.steps, minutes or demo.minutes
    return [*common, f"model.init={start}", "model.layer_drop_fusion=0", f"train.max_steps={steps}",
            f"train.max_minutes={minutes}",
            "train.epochs=1000000", f"train.warmup_epochs={demo.warmup_epochs}",
            f"train.lr_drop_fraction={demo.lr_drop_fraction}"]


MIN_SCALE, MAX_SCALE = 0.25, 8.0  # bounds of the step budgets' factor


def step_budget(out: Path, config: str, overrides: list[str], number: str = "[2]") -> dict:
    """The steps of every stage (docs/design.md §5a, "A main job that uses its time"): with
    ``demo.fit_to_machine``, the preset's steps × (``demo.reference_step_s`` / this machine's
    seconds per training step, from a probe of a few steps; the factor rounded to a twentieth,
    so that runs on one kind of machine mostly get the same steps, and kept within
    [``MIN_SCALE``, ``MAX_SCALE``]), so that the job takes about as long on every machine as on
    the reference one; else the steps as configured. Kept in ``budget.json``, so that a rerun
    resumes with the same steps; the report gives the ``--set`` that repeats them. ``number``: how
    the demo numbers this step when it prints."""
    from lads.config import load_config
    from lads.engine import step_seconds

    path = out / "budget.json"
    if path.exists():
        budget = json.loads(path.read_text())
        print(f"{number} reusing the step budget of {path}: {_steps_line(budget)}")
        return budget
    cfg = load_config(config, overrides)
    d, steps = cfg.demo, {"pretrain.steps": cfg.pretrain.steps, "demo.shared_steps": cfg.demo.shared_steps,
                          "demo.steps": cfg.demo.steps}
    if d.cls_steps:
        steps["demo.cls_steps"] = d.cls_steps
    budget = {"fitted": d.fit_to_machine, "reference_step_s": d.reference_step_s}
    if d.fit_to_machine:
        print(f"{number} timing a few training steps to fit the step budgets to this machine")
        budget["probe_step_s"] = step_seconds(cfg)
        scale = round(d.reference_step_s / budget["probe_step_s"] * 20) / 20  # probes jitter by a few %
        budget["scale"] = min(MAX_SCALE, max(MIN_SCALE, scale))
        steps = {k: max(1, round(v * budget["scale"])) for k, v in steps.items()}
    budget["steps"] = steps
    budget["overrides"] = ["demo.fit_to_machine=false", *(f"{k}={v}" for k, v in steps.items())]
    tmp = path.with_suffix(".tmp")  # a run killed here leaves no half-written budget to reuse
    tmp.write_text(json.dumps(budget, indent=2))
    os.replace(tmp, path)
    print(f"{number} step budget: {_steps_line(budget)}")
    return budget


def _steps_line(budget: dict) -> str:
    s = budget["steps"]
    line = (f"{s['pretrain.steps']} pre-training steps, {s['demo.shared_steps']} in stage 1, "
            + (f"{s['demo.cls_steps']} in stage 1b (Eq. 9 alone), " if "demo.cls_steps" in s else "")
            + f"{s['demo.steps']} for each model of stage 2")
    if "probe_step_s" in budget:
        line += (f" ({budget['probe_step_s']:.3f} s per training step here against "
                 f"{budget['reference_step_s']:.3f} on the reference machine: × {budget['scale']:.2f})")
    return line


def _stage(number: str, what: str, run_dir: Path, config: str, overrides: list[str]) -> Path:
    """Train one stage into ``run_dir`` (resuming it if it was cut); its checkpoint."""
    from lads.config import load_config
    from lads.engine import train
    from lads.errors import LadsError

    if _finished(run_dir):
        print(f"{number} {what}: done already ({run_dir})")
        return run_dir / "checkpoint"
    print(f"{number} {what}, in {run_dir}")
    cfg = load_config(config, [*overrides, f"train.out={run_dir}"])
    checkpoint = train(cfg, resume=str(run_dir) if (run_dir / "checkpoint").exists() else None)
    if not _finished(run_dir):
        reason = json.loads((checkpoint / "meta.json").read_text()).get("reason")
        raise LadsError(f"stopped by {reason} during {what}; run the demo again to resume it")
    return checkpoint


def _finished(run_dir: Path) -> bool:
    """The stage ran to its end (its time budget or its epochs), not to a signal."""
    meta = run_dir / "checkpoint" / "meta.json"
    return meta.exists() and json.loads(meta.read_text()).get("reason") in ("finished", "time budget")


def _predict_examples(checkpoint, data: Path, out: Path, images: int = 4) -> list[Path]:
    """Every expression (four at most) of the first few test images, drawn on the image beside
    its ground-truth box."""
    from collections import defaultdict

    from lads.analysis.draw import draw
    from lads.datasets import load_records
    from lads.models import LADS

    model = LADS.from_pretrained(checkpoint)
    records, _ = load_records(data, "test")
    by_image = defaultdict(list)
    for r in records:
        by_image[r.image].append(r)
    pictures = []
    for image in sorted(by_image)[:images]:
        chosen = by_image[image][:4]
        predictions = model.predict(image, [r.expression for r in chosen])
        pictures.append(draw(image, predictions, out / (Path(image).stem + ".png"), truths=[r.box for r in chosen]))
        (out / (Path(image).stem + ".json")).write_text(json.dumps(predictions, indent=2))
    return pictures


def _analyze(lads_checkpoint, static_checkpoint, data: Path, out: Path) -> tuple[dict, dict | None]:
    """``lads analyze`` of LADS on the test split, and the static control's subnet statistics
    there (its dynamicity: none), if it was trained."""
    from lads.analysis.collect import analyze, subnet_statistics
    from lads.datasets import load_records
    from lads.models import LADS

    records, _ = load_records(data, "test")
    expressions, types = [r.expression for r in records], [r.expr_type for r in records]
    analysis = analyze(LADS.from_pretrained(lads_checkpoint), expressions, types, out_dir=out, force=True,
                       title="LADS subnets, synthetic test split")
    if static_checkpoint is None:
        return analysis, None
    return analysis, subnet_statistics(LADS.from_pretrained(static_checkpoint), expressions, types, progress=False)[0]


RUNS = {"shared": "stage 1: dense, shared", CLS_STAGE: "stage 1b: dense, Eq. 9 alone", "lads": "stage 2: LADS",
        "static": "stage 2: static control", "dense": "stage 2: dense"}


def _stages(out: Path, runs: list[str]) -> list[dict]:
    """Steps (done and budgeted), samples, minutes and samples/s of the pre-training and of each
    training stage (stage 1 and ``runs``), from their checkpoints."""
    pre = json.loads((out / "pretrain" / "meta.json").read_text())
    rows = [_stage_row("pretrain", "pre-training of the visual backbone", pre["steps"], pre.get("max_steps"),
                       pre.get("batch_size", 32), 60 * pre["minutes"], pre.get("amp"))]
    for name, what in RUNS.items():
        if name != "shared" and name not in runs:
            continue
        meta = json.loads((out / name / "checkpoint" / "meta.json").read_text())
        batch = json.loads((out / name / "checkpoint" / "config.json").read_text())["train"]["batch_size"]
        rows.append(_stage_row(name, what, meta["step"], meta.get("total_steps"), batch, meta.get("train_s", 0.0),
                               meta.get("amp")))
    return rows


def _stage_row(run: str, what: str, steps: int, budget, batch: int, seconds: float, amp) -> dict:
    seconds = max(seconds, 1e-9)
    return {"run": run, "what": what, "steps": steps, "budget": budget or steps, "samples": steps * batch,
            "minutes": seconds / 60, "samples_per_s": steps * batch / seconds,
            "precision": {"none": "float32", None: "?"}.get(amp, amp)}


def _curves(out: Path, runs: list[str]) -> Path:
    """Val Prec@0.5 against the samples seen: stage 1, then the stages that start from it, each
    shifted by the samples of the stage it starts from."""
    from lads.analysis.curves import plot_curves

    def seen(run: str) -> tuple[float, int]:  # thousands of samples at the run's end, its batch
        meta = json.loads((out / run / "checkpoint" / "meta.json").read_text())
        batch = json.loads((out / run / "checkpoint" / "config.json").read_text())["train"]["batch_size"]
        return meta["step"] * batch / 1000, batch

    shared, batch = seen("shared")
    branch = shared + (seen(CLS_STAGE)[0] if CLS_STAGE in runs else 0.0)
    logs = {"stage 1 (dense)": (out / "shared" / "log.jsonl", 0.0)}
    logs.update({RUNS[name].split(": ", 1)[1]: (out / name / "log.jsonl", shared if name == CLS_STAGE else branch)
                 for name in runs})
    return plot_curves(logs, out / "curves.png", title="lads demo: val Prec@0.5 while training", batch=batch)


def _report(out: Path, config: str, table: str, rows, pictures, analysis, static: dict | None, curves: Path, stages,
            budget: dict, seconds) -> Path:
    from lads.analysis.report import dynamicity_table, markdown
    from lads.util.dist import device_name, local_device

    lines = [
        "# lads demo: the synthetic REC benchmark",
        "",
        f"Everything here took {seconds / 60:.1f} minutes on {device_name(local_device())}, with the config "
        f"`{config}`.",
        "",
        "## Prec@0.5",
        "",
        table,
        "",
        "Checkpoints: " + ", ".join(f"`{r['checkpoint']}`" for r in rows),
        "",
        "## Training",
        "",
        f"Step budget: {_steps_line(budget)}. To repeat these steps: `lads demo "
        + (f"--config {config} " if config != "tiny" else "")
        + " ".join(f"--set {o}" for o in budget["overrides"]) + "`.",
        "",
        "| stage | steps | samples | minutes | samples/s | precision |",
        "|---|---|---|---|---|---|",
        *(f"| {s['what']} | {s['steps']:,} | {s['samples']:,} | {s['minutes']:.1f} | {s['samples_per_s']:.0f} "
          f"| {s['precision']} |" for s in stages),
        "",
        *(f"- **warning**: {s['what']} reached its time cap after {s['steps']:,} of its {s['budget']:,} steps "
          f"({s['samples_per_s']:.0f} samples/s): a slower or busy machine, so fewer steps and figures that differ "
          "from a run that had them all." for s in stages if s["steps"] < s["budget"]),
        "",
        f"![learning curves]({curves.relative_to(out)})",
        "",
    ]
    for r in rows:
        for split, res in r["splits"].items():
            if "prec@0.5_by_type" in res:
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in res["prec@0.5_by_type"].items())
                lines.append(f"- {r['name']}, {split}, by expression type: {kinds}")
    lines += ["", "## Predictions (LADS, extracted subnets)", ""]
    lines += [f"![{p.stem}]({p.relative_to(out)})" for p in pictures]
    lines += ["", "## Do the subnets follow the expression? (test split)", "",
              markdown(*dynamicity_table({"LADS": analysis["stats"], **({"static control": static} if static else {})
                                          })), "",
              "Per expression type (LADS): " + "; ".join(
                  f"{t}: {d['layers_varying']} layers varying, FLOPs {d['flops']['mean']:.2f} ± {d['flops']['std']:.2f}"
                  for t, d in analysis["stats"].get("dynamicity_by_type", {}).items()) + "."]
    lines += ["", "## The subnets (test split)", "",
              f"Full report: `{Path(analysis['report']).relative_to(out)}`; numbers: "
              f"`{Path(analysis['stats_path']).relative_to(out)}`.", ""]
    by_type = analysis["stats"].get("by_type", {})
    if by_type:
        lines += ["| expression type | " + " | ".join(next(iter(by_type.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(by_type.values())))]
        lines += [f"| {k} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
                  for k, row in by_type.items()]
        lines.append("")
    lines += [f"![{key}]({Path(path).relative_to(out)})" for key, path in analysis["figures"].items()]
    lines += [f"- note: {n}" for n in analysis["notes"]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
