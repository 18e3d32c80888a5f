"""One engine for training and evaluation, from one CPU process to many GPUs (docs/design.md §5).

Determinism is by construction, so that a resumed run and a run on more processes retrace
the same steps: the data order of an epoch is a permutation seeded by (seed, epoch); a global
batch is split into ``world × accumulation`` micro-batches, micro-batch ``m`` going to rank
``m // accumulation``; every micro-batch reseeds the RNG from (seed, step, m), so gate noise,
the soft/hard choice and dropout do not depend on how the batch is spread over processes; the
augmentation of a sample is seeded by (seed, epoch, index).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lads import __version__
from lads.config import Config, config_from_dict, to_dict
from lads.errors import LadsError
from lads.models.provenance import check_eval_overlap
from lads.util import dist
from lads.util.amp import autocast, grad_scaler, resolve_amp
from lads.util.checkpoint import (
    init_weights,
    load_training_state,
    load_weights,
    read_meta,
    restored_model_config,
    save_checkpoint,
)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


EPOCH_ORDER = 7  # salts the seed of an epoch's order apart from its samples' (seed, epoch, index)


class SeededSamples(Dataset):
    """Items are ``(epoch, index)``; the augmentation of each is seeded by (seed, epoch, index)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def order(self, epoch: int):
        """The indices of ``epoch``: a permutation seeded by (seed, epoch), or a mixture's
        weighted draw (``Mixture.epoch_order``)."""
        records = getattr(self.dataset, "records", None)
        if hasattr(records, "epoch_order"):
            return records.epoch_order(mix_seed(self.seed, EPOCH_ORDER), epoch)
        return epoch_permutation(len(self), self.seed, epoch)

    def __getitem__(self, item):
        epoch, index = item
        s = mix_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        torch.manual_seed(s)
        return self.dataset[index]


SOFT_HARD = 1 << 40  # salts the soft/hard draw's seed apart from every micro-batch's (seed, step, index)


def soft_hard_draw(seed: int, step: int) -> float:
    """Eq. 5's ``n_s ~ U(0, 1)`` of optimizer step ``step``: one for the whole global batch (its
    micro-batches and ranks alike), as the paper draws one per training batch."""
    return torch.rand((), generator=torch.Generator().manual_seed(mix_seed(seed, step, SOFT_HARD))).item()


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, EPOCH_ORDER))
    return torch.randperm(n, generator=g).tolist()


def rank_micro_batches(perm, batch, step_in_epoch, micro, accumulation, rank):
    """This rank's micro-batches of global batch ``step_in_epoch`` (lists of indices)."""
    start = step_in_epoch * batch
    indices = perm[start : start + batch]
    first = rank * accumulation
    return [indices[(first + a) * micro : (first + a + 1) * micro] for a in range(accumulation)]


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW with the paper's groups: ``lr_backbone`` for both backbones, ``lr`` for the rest
    (``lr_visual``, when set, for the visual backbone; ``lr_gating``, when set, for the gating network)."""
    groups = {"rest": [], "visual_backbone": [], "text_backbone": [], "gating": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.get(name.split(".")[0], groups["rest"]).append(p)
    lrs = {"rest": cfg.lr, "text_backbone": cfg.lr_backbone,
           "visual_backbone": cfg.lr_backbone if cfg.lr_visual is None else cfg.lr_visual,
           "gating": cfg.lr if cfg.lr_gating is None else cfg.lr_gating}
    groups = [{"params": params, "lr": lrs[name]} for name, params in groups.items()]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay, foreach=True)


def lr_factor(step: int, warmup_steps: int, drop_step: int) -> float:
    """Linear warm-up, then ×0.1 from ``drop_step`` on."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * (0.1 if step >= drop_step else 1.0)


# ----------------------------------------------------------------------------- data


def load_split(cfg: Config, split: str, train: bool, tokenizer):
    from lads.datasets import read_dataset
    from lads.datasets.dataset import RecDataset
    from lads.datasets.transforms import Augment

    if train and cfg.data.mixture:
        from lads.datasets.mixture import load_mixture

        records = load_mixture(cfg.data)
    else:
        if not cfg.data.path:
            raise LadsError("data.path is not set: give --data PATH (a REFER folder, TransVG split folder "
                            "or JSONL file)")
        contents = read_dataset(cfg.data.path, [split], image_root=cfg.data.image_root, split_by=cfg.data.split_by,
                                strict=cfg.data.strict)
        records, skipped = contents.records, contents.skipped_by_reason()
        if dist.is_main() and contents.image_root is not None and contents.image_root.how not in ("given", "default"):
            print(f"{cfg.data.path} [{split}]: {contents.image_root.describe()}")
        if skipped and dist.is_main():
            reasons = ", ".join(f"{n} {why}" for why, n in skipped.items())
            print(f"{cfg.data.path} [{split}]: skipped {sum(skipped.values())} records ({reasons})")
        if not records:
            raise LadsError(f"{cfg.data.path}: split {split!r} holds no usable expression")
    return RecDataset(
        records, tokenizer, cfg.model.image_size, cfg.model.text.max_tokens,
        train=train and cfg.data.augment, augment=Augment(crop=cfg.data.crop, hue=cfg.data.hue), skip_bad=train,
    )


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- training


class StopFlag:
    """Set by SIGINT/SIGTERM; the run writes a checkpoint at the next step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class MetricLog:
    """JSON lines on rank 0, and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, out: Path, enabled: bool):
        self.file = open(out / "log.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def write(self, record: dict):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class TrainClock:
    """Training seconds: wall time since the start, less the time validation took; a resumed
    run starts from the seconds it had trained. Also the samples since the last log line."""

    def __init__(self, trained_s: float = 0.0):
        self.start, self.last_log, self.samples_since = time.time() - trained_s, time.time(), 0

    def seconds(self) -> float:
        return time.time() - self.start

    @contextmanager
    def paused(self):
        began = time.time()
        yield began - self.start
        self.start += time.time() - began
        self.last_log += time.time() - began


@dataclass
class Run:
    """What ``train`` builds once (``prepare_run``): the model and its optimisation, the data,
    the schedule in steps, the step reached, the clock and the log."""

    cfg: Config
    out: Path
    device: torch.device
    rank: int
    world: int
    accumulation: int  # micro-batches per rank and optimizer step
    amp: str
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, wrapped in DistributedDataParallel with more than one process
    tokenizer: object
    dataset: SeededSamples
    val: Dataset | None
    steps_per_epoch: int
    total_steps: int
    eval_steps: int  # validate every this many steps (0: never)
    optimizer: torch.optim.Optimizer
    scaler: object
    drop_step: int  # the first step whose learning rates are × 0.1
    scheduler: object = None
    step: int = 0
    clock: TrainClock = field(default_factory=TrainClock)
    log: MetricLog | None = None
    bad_images: BadImages | None = None
    bar: _Progress | None = None
    last_validation: dict = field(default_factory=dict)  # for the checkpoint's model card


def prepare_run(cfg: Config, resume: str | None = None, model=None) -> Run:
    """Checks, the process group, the model (new, from ``model.init``, or given), the data, the
    optimizer and schedule, and, with ``resume``, the state of the run at its checkpoint."""
    from lads.models import LADS
    from lads.models.text import load_tokenizer

    t = cfg.train
    device = dist.local_device()
    rank, world = dist.init_distributed(device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.batch_size % (world * t.micro_batch):
        raise LadsError(
            f"train.batch_size {t.batch_size} is not a multiple of processes × train.micro_batch "
            f"= {world} × {t.micro_batch}"
        )
    if t.max_steps is not None and t.max_steps < 1:
        raise LadsError(f"train.max_steps must be at least 1, got {t.max_steps}")
    amp = resolve_amp(t.amp, device)
    if t.amp == "auto" and dist.is_main():
        print(f"train.amp=auto: {amp} on {device.type} ({'native' if amp == 'bf16' else 'no native'} bf16)")
    torch.manual_seed(t.seed)
    built = cfg.model
    if not resume:
        check_eval_overlap(cfg.model, cfg.data, read_meta(cfg.model.init)[1] if cfg.model.init else None,
                           say=print if dist.is_main() else lambda _: None)
    if model is None:
        origin = resume or cfg.model.init
        built = restored_model_config(cfg.model, origin) if origin else cfg.model
        model = LADS(built)
        if cfg.model.init and not resume:
            init_weights(model, cfg.model.init)
    model = model.to(device)
    if t.channels_last:
        model.visual_backbone.to(memory_format=torch.channels_last)
    tokenizer = load_tokenizer(built.text.name)
    dataset = SeededSamples(load_split(cfg, cfg.data.train_split, True, tokenizer), t.seed)
    val = load_split(cfg, cfg.data.eval_splits[0], False, tokenizer) if t.eval_every > 0 else None
    steps_per_epoch = len(dataset) // t.batch_size
    if steps_per_epoch == 0:
        raise LadsError(f"{cfg.data.path}: {len(dataset)} training expressions, fewer than one global batch "
                        f"({t.batch_size})")
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(t.max_steps, total_steps)
    eval_steps = max(1, round(t.eval_every * steps_per_epoch)) if val is not None else 0
    run = Run(cfg=cfg, out=Path(t.out), device=device, rank=rank, world=world,
              accumulation=t.batch_size // (world * t.micro_batch), amp=amp, model=model, ddp=model,
              tokenizer=tokenizer, dataset=dataset, val=val, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, eval_steps=eval_steps,
              optimizer=build_optimizer(model, t), scaler=grad_scaler(device, amp),
              drop_step=_drop_step(t, steps_per_epoch))
    warmup = round(t.warmup_epochs * steps_per_epoch)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: lr_factor(s, warmup, run.drop_step))
    trained_s = 0.0
    if resume:
        run.step, trained_s, run.drop_step = _resume(resume, cfg, model, run.optimizer, run.scheduler, run.scaler,
                                                     run.drop_step)
    if world > 1:
        run.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if dist.is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        if resume:
            _forget_steps_after(run.out / "log.jsonl", run.step)
    run.log = MetricLog(run.out, dist.is_main())
    run.bad_images = BadImages(cfg.data.max_bad_images)
    run.bar = _Progress(total_steps, run.step, None if t.max_steps else t.max_minutes, trained_s,
                        enabled=dist.is_main())
    run.clock = TrainClock(trained_s)
    return run


def train(cfg: Config, resume: str | None = None, model=None) -> Path:
    """Train ``cfg``; returns the checkpoint folder. ``resume``: a checkpoint or run folder;
    ``model``: a model built from ``cfg.model`` to train in place (default: a new one)."""
    run = prepare_run(cfg, resume, model)
    t, status = cfg.train, "finished"
    run.model.train()
    try:
        with StopFlag() as stop:
            batches = micro_batches(run)
            while run.step < run.total_steps:
                terms, gate_rates = accumulate_gradients(run, batches)
                if _max_over_ranks(float(run.bad_images.too_many()), run.device) > 0:  # every rank stops
                    status = f"stopped: {run.bad_images.summary()}"
                    save(run, "unreadable images")
                    break
                if not _all_finite(terms["loss"], run.device):
                    status = f"stopped: non-finite loss at step {run.step}; the last good checkpoint is kept"
                    break
                optimizer_step(run)
                log_step(run, terms, gate_rates)
                out_of_time = t.max_minutes is not None and run.clock.seconds() > 60 * t.max_minutes
                reason = _agree_to_stop(stop.signal, out_of_time, run.device)
                if run.eval_steps and (run.step % run.eval_steps == 0 or run.step == run.total_steps
                                       or reason == "time budget"):
                    validate(run)
                if reason:
                    status = f"stopped by {reason} at step {run.step}"
                    save(run, reason)
                    break
                if run.step % t.checkpoint_every == 0 and run.step < run.total_steps:
                    save(run, "periodic")
            else:
                save(run, "finished")
    finally:  # a failed checkpoint write ends the bar before its error is printed
        run.bar.close()
        run.log.close()
    if dist.is_main():
        print(f"training {status}; checkpoint: {run.out / 'checkpoint'}")
    if status.startswith("stopped: "):
        raise LadsError(f"training {status}")
    return run.out / "checkpoint"


def micro_batches(run: Run):
    """This rank's micro-batches from ``run.step`` on, epoch after epoch; each optimizer step
    takes ``run.accumulation`` of them."""
    epoch, in_epoch = divmod(run.step, run.steps_per_epoch)
    while True:
        yield from _epoch_loader(run.dataset, run.cfg, epoch, in_epoch, run.steps_per_epoch, run.accumulation,
                                 run.rank)
        epoch, in_epoch = epoch + 1, 0


def accumulate_gradients(run: Run, batches) -> tuple[dict, list]:
    """Forward and backward of one optimizer step's micro-batches, with one Eq. 5 draw for all of
    them; returns the loss terms averaged over them and the open-gate rates of each."""
    t, model = run.cfg.train, run.model
    terms_sum, gate_rates = {}, []
    n_s = soft_hard_draw(t.seed, run.step)
    for a in range(run.accumulation):
        batch = to_device(next(batches), run.device)
        run.bad_images.note(batch["meta"], run.step, run.log)
        torch.manual_seed(mix_seed(t.seed, run.step, run.rank * run.accumulation + a))
        sync = nullcontext() if (run.world == 1 or a == run.accumulation - 1) else run.ddp.no_sync()
        with sync, autocast(run.device, run.amp):
            outputs = run.ddp(batch["image"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"],
                              n_s=n_s)
            terms = model.loss(outputs, batch["box"])
            run.scaler.scale(terms["loss"] / run.accumulation).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / run.accumulation
        if outputs["gates"] is not None:
            gate_rates.append((outputs["gates"].layer.mean().item(), outputs["gates"].filter.mean().item()))
    return terms_sum, gate_rates


def optimizer_step(run: Run) -> None:
    """Clip, step (skipped for fp16 when a gradient overflowed), the learning-rate schedule;
    ``run.step`` moves on."""
    t = run.cfg.train
    run.scaler.unscale_(run.optimizer)
    if t.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if _time_to_drop(t, run.clock.seconds(), run.device) and run.step + 1 < run.drop_step:
        run.drop_step = run.step + 1  # the learning rates of the next step on are × 0.1
    with warnings.catch_warnings():  # the schedule counts steps, skipped (fp16) or not
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1


def log_step(run: Run, terms: dict, gate_rates: list) -> None:
    """The progress bar, and every ``train.log_every`` steps a line of the log: the loss terms,
    the learning rate, samples per second and the open-gate rates."""
    t, clock = run.cfg.train, run.clock
    clock.samples_since += t.batch_size
    run.bar.update(run.step, clock.seconds())
    if dist.is_main() and (run.step % t.log_every == 0 or run.step == run.total_steps):
        now = time.time()
        record = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 3), **terms,
                  "lr": run.optimizer.param_groups[0]["lr"],
                  "samples_per_s": clock.samples_since / (now - clock.last_log), "train_s": round(now - clock.start, 1)}
        if gate_rates:
            record["open_layers"] = float(np.mean([r[0] for r in gate_rates]))
            record["open_filters"] = float(np.mean([r[1] for r in gate_rates]))
        run.log.write(record)
        run.bar.postfix(step=run.step, loss=f"{terms['loss']:.3f}")
        clock.last_log, clock.samples_since = now, 0


def validate(run: Run) -> None:
    """Prec@0.5 on the first eval split, logged; its time is not training time."""
    split, model = run.cfg.data.eval_splits[0], run.model
    with run.clock.paused() as trained_s:
        result = evaluate(model, run.val, 64, "dense" if model.gating is None else "masked", progress=False,
                          amp=run.amp)
        model.train()
        record = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 3), "train_s": round(trained_s, 1),
                  f"{split}/prec@0.5": result["prec@0.5"], f"{split}/expressions": result["expressions"]}
        for head, prec in result.get("prec@0.5_by_head", {}).items():
            record[f"{split}/prec@0.5_{head}"] = prec
        for kind, prec in result.get("prec@0.5_by_type", {}).items():
            record[f"{split}/prec@0.5_{kind}"] = prec
        run.log.write(record)
        run.last_validation.update(step=run.step, split=split, **{"prec@0.5": result["prec@0.5"]})


def save(run: Run, reason: str) -> None:
    """The run's checkpoint (rank 0 writes it; every rank waits): weights, config, metadata,
    the optimizer, schedule, scaler and RNG state, the tokenizer."""
    if dist.is_main():
        seconds = run.clock.seconds()
        save_checkpoint(
            run.out / "checkpoint", run.model, to_dict(run.cfg),
            {"step": run.step, "epoch": run.step / run.steps_per_epoch, "total_steps": run.total_steps,
             "reason": reason, "lads_version": __version__, "torch_version": torch.__version__,
             "world_size": run.world, "amp": run.amp, "train_s": round(seconds, 1),
             "validation": dict(run.last_validation) or None},
            {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "step": run.step,
             "rng": torch.get_rng_state(), "train_s": seconds, "lr_drop_step": run.drop_step,
             "scaler": run.scaler.state_dict()},
            tokenizer=run.tokenizer,
        )
    dist.barrier()


def step_seconds(cfg: Config, steps: int = 5, warmup: int = 2) -> float:
    """Median seconds of one training step of ``cfg`` on this machine (loading its batch, forward,
    backward, AdamW), over ``steps`` steps after ``warmup``: a probe of the machine's speed. The
    model is a new one and its weights are thrown away."""
    from lads.datasets.dataset import collate
    from lads.models import LADS
    from lads.models.text import load_tokenizer

    t = cfg.train
    device = dist.local_device()
    amp = resolve_amp(t.amp, device)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    model = LADS(cfg.model).to(device).train()
    if t.channels_last:
        model.visual_backbone.to(memory_format=torch.channels_last)
    dataset = load_split(cfg, cfg.data.train_split, True, load_tokenizer(cfg.model.text.name))
    optimizer = build_optimizer(model, t)
    times, index = [], 0
    for _ in range(warmup + steps):
        began = time.perf_counter()
        for _ in range(max(1, t.batch_size // t.micro_batch)):
            batch = to_device(collate([dataset[(index + i) % len(dataset)] for i in range(t.micro_batch)]), device)
            index += t.micro_batch
            with autocast(device, amp):
                outputs = model(batch["image"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"])
                model.loss(outputs, batch["box"])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return float(np.median(times[warmup:]))


def _forget_steps_after(log: Path, step: int) -> None:
    """Drop the log records of steps after ``step`` (a resumed run trains them again), and a
    line cut short by a kill."""
    if not log.exists():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:
            return False

    lines = [line for line in log.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)


def _drop_step(t, steps_per_epoch: int) -> int:
    """The first step whose learning rates are × 0.1: ``train.lr_drop_fraction`` of
    ``train.max_steps`` when both are set, else ``train.lr_drop_epoch`` (which ``_time_to_drop``
    moves earlier once that fraction of ``train.max_minutes`` has passed)."""
    if t.lr_drop_fraction is not None and t.max_steps is not None:
        return round(t.lr_drop_fraction * t.max_steps)
    return t.lr_drop_epoch * steps_per_epoch


def _time_to_drop(t, seconds: float, device) -> bool:
    """``train.lr_drop_fraction`` of ``train.max_minutes`` has passed (on any rank) in a run
    without ``train.max_steps``; with it the drop is at a step, so a run does not depend on the
    machine's speed."""
    if t.lr_drop_fraction is None or t.max_minutes is None or t.max_steps is not None:
        return False
    return _max_over_ranks(float(seconds >= 60 * t.max_minutes * t.lr_drop_fraction), device) > 0


def _resume(path, cfg: Config, model, optimizer, scheduler, scaler, drop_step: int):
    folder, saved, _ = read_meta(path)
    if to_dict(config_from_dict(saved))["model"] != to_dict(cfg)["model"]:  # defaults of newer keys filled in
        raise LadsError(f"checkpoint {folder} was written for another model config; resume with its own config.json")
    load_weights(folder, model)
    state = load_training_state(folder)
    saved_groups, groups = len(state["optimizer"]["param_groups"]), len(optimizer.param_groups)
    if saved_groups != groups:  # the gating network has had its own group since train.lr_gating
        raise LadsError(f"checkpoint {folder}: its optimizer state has {saved_groups} parameter groups where this "
                        f"version trains {groups}; resume it with the lads version that wrote it, or start a new "
                        f"run from its weights (model.init={folder})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if dist.is_main():
        print(f"resuming from {folder} at step {state['step']}")
    return int(state["step"]), float(state.get("train_s", 0.0)), int(state.get("lr_drop_step", drop_step))


def _epoch_loader(dataset, cfg, epoch, first_step, steps_per_epoch, accumulation, rank):
    """This rank's micro-batches for the rest of ``epoch``, in order."""
    from lads.datasets.dataset import collate

    t = cfg.train
    plan = EpochPlan(dataset.order(epoch), epoch, range(first_step, steps_per_epoch), t.batch_size, t.micro_batch,
                     accumulation, rank)
    workers = dist.loader_workers(cfg.data.num_workers)
    return DataLoader(dataset, batch_sampler=plan, collate_fn=collate, num_workers=workers,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


class EpochPlan:
    """A rank's micro-batches of ``(epoch, index)`` for ``steps`` of an epoch, made as they are
    drawn: an epoch of a 6 M-sample mixture is never held as Python lists."""

    def __init__(self, order, epoch, steps, batch, micro, accumulation, rank):
        self.order, self.epoch, self.steps = order, epoch, steps
        self.batch, self.micro, self.accumulation, self.rank = batch, micro, accumulation, rank

    def __len__(self):
        return len(self.steps) * self.accumulation

    def __iter__(self):
        for s in self.steps:
            for micro in rank_micro_batches(self.order, self.batch, s, self.micro, self.accumulation, self.rank):
                yield [(self.epoch, int(i)) for i in micro]


def _all_finite(value: float, device) -> bool:
    flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    if dist.is_distributed():
        torch.distributed.all_reduce(flag)
    return flag.item() == 0


def _agree_to_stop(signal_name, out_of_time, device) -> str | None:
    """Every rank stops at the same step: a signal or the time budget on any rank stops all."""
    code = 2.0 if signal_name else (1.0 if out_of_time else 0.0)
    return {0.0: None, 1.0: "time budget", 2.0: signal_name or "signal"}[_max_over_ranks(code, device)]


def _max_over_ranks(value: float, device) -> float:
    """The largest ``value`` of all ranks (itself in one process)."""
    flag = torch.tensor([value], device=device)
    if dist.is_distributed():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item()


class BadImages:
    """Training images that could not be read mid-epoch (``RecDataset(skip_bad=True)`` served
    the next one): each named once on stderr and in the log; more than ``limit`` stop the run."""

    def __init__(self, limit: int):
        self.limit, self.seen = limit, {}

    def note(self, metas: list[dict], step: int, log: "MetricLog"):
        for image, reason in (s for meta in metas for s in meta.get("skipped", ())):
            if image not in self.seen:
                self.seen[image] = reason
                print(f"skipped an unreadable training image ({len(self.seen)} so far; data.max_bad_images="
                      f"{self.limit}): {image}: {reason}", file=sys.stderr)
                log.write({"step": step, "skipped_image": image, "reason": reason})

    def too_many(self) -> bool:
        return len(self.seen) > self.limit

    def summary(self) -> str:
        first = next(iter(self.seen.items()))
        return (f"{len(self.seen)} training images could not be read, more than data.max_bad_images="
                f"{self.limit} (the first: {first[0]}: {first[1]}); fix or remove them, or raise the limit")


class _Progress:
    """A progress bar in steps, or in training seconds when the run has only a time budget
    (the step count then stands beside it)."""

    def __init__(self, total_steps, step, max_minutes, trained_s, enabled):
        from tqdm.auto import tqdm

        self.timed = max_minutes is not None
        total, initial = (round(60 * max_minutes), round(trained_s)) if self.timed else (total_steps, step)
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train",
                        unit="s" if self.timed else "step", dynamic_ncols=True)

    def update(self, step: int, seconds: float):
        done = round(seconds) if self.timed else step
        self.bar.update(min(done, self.bar.total) - self.bar.n)

    def postfix(self, **values):
        self.bar.set_postfix(**values)

    def close(self):
        self.bar.close()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 32, mode: str = "subnet", num_workers: int = 0, progress=True,
             amp: str = "none") -> dict:
    """Prec@0.5 on ``dataset`` in original image pixels, each expression counted exactly once
    (every rank takes indices ``rank::world``; results are gathered by index, no padding);
    ``amp`` as ``train.amp`` (boxes are computed in float32 either way)."""
    from lads.datasets.dataset import collate
    from lads.datasets.transforms import box_to_original
    from lads.inference import SubnetRunner
    from lads.util.box_ops import box_iou

    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    model.eval()
    runner = SubnetRunner(model, amp=amp)
    mine = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size, collate_fn=collate,
                        num_workers=num_workers)
    from tqdm.auto import tqdm

    rows, seconds, extraction = [], 0.0, 0.0
    cursor = 0
    for batch in tqdm(loader, disable=not (progress and dist.is_main()), desc="eval", unit="batch", leave=False):
        batch = to_device(batch, device)
        result = runner(batch["image"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"], mode=mode)
        seconds += result["times"]["total"]
        extraction += result["times"]["extract"]
        for j, meta in enumerate(batch["meta"]):
            truth = torch.tensor(meta["record"].box, dtype=torch.float32)
            ious = {head: box_iou(box_to_original(boxes[j].float().cpu(), meta), truth).item()
                    for head, boxes in result["heads"].items()}
            iou = ious[model.config.head]
            kept = _kept(model, result["gates"], j, int(batch["attention_mask"][j].sum()))
            rows.append({"index": mine[cursor], "iou": iou, "correct": iou >= 0.5, "ious": ious,
                         "expr_type": meta["record"].expr_type, **kept})
            cursor += 1
    gathered = {r["index"]: r for part in dist.all_gather_objects(rows) for r in part}
    times = dist.all_gather_objects((seconds, extraction, len(rows)))
    n = len(gathered)
    total_time = sum(s for s, _, _ in times)
    summary = {
        "expressions": n,
        "correct": sum(r["correct"] for r in gathered.values()),
        "prec@0.5": 100.0 * sum(r["correct"] for r in gathered.values()) / max(n, 1),
        "mean_iou": float(np.mean([r["iou"] for r in gathered.values()])) if n else 0.0,
        "ms_per_expression": 1000.0 * total_time / max(n, 1),
        "extraction_ms_per_expression": 1000.0 * sum(e for _, e, _ in times) / max(n, 1),
        "layers_kept": float(np.mean([r["layers"] for r in gathered.values()])) if n else 0.0,
        "filters_kept": float(np.mean([r["filters"] for r in gathered.values()])) if n else 0.0,
        "flops_kept": float(np.mean([r["flops"] for r in gathered.values()])) if n else 0.0,
    }
    heads = sorted({h for r in gathered.values() for h in r["ious"]})
    summary["prec@0.5_by_head"] = {
        h: 100.0 * sum(r["ious"][h] >= 0.5 for r in gathered.values()) / max(n, 1) for h in heads}
    by_type = {}
    for r in gathered.values():
        if r["expr_type"]:
            by_type.setdefault(r["expr_type"], []).append(r["correct"])
    if by_type:
        summary["prec@0.5_by_type"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())}
    return summary


def _kept(model, gates, j, text_len: int) -> dict:
    """Layers (bottlenecks and sublayers), filters and FLOPs (a fraction of the dense network's,
    at the expression's length) of expression ``j``'s subnet."""
    kept = model.layout.summary(gates, j)
    flops = model.subnet_flops(gates, j, text_len)
    return {"layers": kept["visual_layers"] + kept["fusion_sublayers"], "filters": kept["filters"], "flops": flops}
