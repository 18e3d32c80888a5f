"""Latency and FLOPs of the dense network, the masked supernet and extracted subnets
(docs/design.md §3), forward only and end to end: ``run_bench(BenchSettings(...))``, which
``lads bench`` calls (the fields of ``BenchSettings`` are its options).

Forward only, what the gates affect: visual backbone + fusion + head, ``model.ground`` for
dense (all gates open) and masked, ``Subnet.forward`` for the subnet. End to end, what a user
pays per expression: text backbone + gating network + extraction + subnet for a gate pattern
never seen (the backbone plan, made once per set of weights, is warm; the subnet cache is not),
the same with the subnet cached, and text backbone + dense network; the text backbone always
runs (a frozen one's feature cache is emptied: the expression is new). Medians from
``torch.utils.benchmark.Timer.blocked_autorange`` (it synchronises CUDA), after warm-up, under
``torch.inference_mode`` and, for ``dtype`` bf16/fp16, autocast (the dtype the commands
use); every measurement of a pattern is timed in alternating rounds and each speedup is over
the dense time measured beside it. Writes ``bench.md``, ``bench.json`` and ``speedup.png``
into ``out``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lads.errors import LadsError
from lads.models.gating import Gates
from lads.util import dist
from lads.util.amp import DTYPES, amp_dtype, autocast


@dataclass
class BenchSettings:
    """What ``run_bench`` measures and where it writes; the fields are ``lads bench``'s options,
    with the same defaults."""

    config: str = "lads-r50"  # preset name or JSON config file
    overrides: list[str] = field(default_factory=list)  # config overrides, "key=value"
    checkpoint: str | None = None  # a trained model: DIR/config.json + DIR/model.safetensors (instead of config)
    random_text: bool = False  # random text weights with expr too (no download); without expr always
    keep: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # keep rates of random hard gates
    patterns: int = 1  # random gate patterns per keep rate
    expr: list[str] | None = None  # gate patterns from these expressions (gating network) instead of keep
    batch: list[int] = field(default_factory=lambda: [1, 8])  # batch sizes
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "fp32"  # "fp32", or "bf16"/"fp16" autocast (folded weights stored in that dtype)
    threads: int = field(default_factory=torch.get_num_threads)  # CPU threads
    image_size: int | None = None  # square input size in pixels (None: the config's)
    text_len: int = 20  # tokens of the random expression with keep
    fold_bn: bool = False  # fold batch norm into the subnets' convolutions
    channels_last: bool = False  # NHWC convolutions (the supernet's and the subnets' new weights)
    min_time: float = 2.0  # seconds per measurement
    rounds: int = 4  # dense, masked and subnet timed in this many alternating rounds
    seed: int = 0  # seed of the random gates and inputs
    out: str | Path = "bench-out"  # output folder of bench.md, bench.json and speedup.png


# ----------------------------------------------------------------------------- the model


def build(settings: BenchSettings):
    """The model to time, in eval mode on ``settings.device``."""
    from lads.models import build_model

    overrides = list(settings.overrides)
    if settings.random_text or not settings.expr:  # random gates: the text weights do not change the timing
        overrides.append("model.text.pretrained=false")
    if settings.checkpoint:
        from lads.models.pretrained import load_model

        model = load_model(settings.checkpoint)[0]
    else:
        model = build_model(settings.config, overrides)
    model = model.eval().to(settings.device)
    if settings.channels_last:
        model.visual_backbone.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------- measurement


def interleaved_medians(fns: dict, threads: int, min_time: float, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds, so that a load
    change on a shared machine affects every function alike."""
    from torch.utils.benchmark import Timer

    for fn in fns.values():
        fn()
        fn()  # warm-up: allocator, kernel selection
    timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=threads) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name] += timer.blocked_autorange(min_run_time=min_time / rounds).times
    return {name: statistics.median(times) for name, times in samples.items()}


def tokens(settings: BenchSettings, model):
    """(input_ids, attention_mask) of the ``expr`` expressions, or of one random expression
    of ``text_len`` tokens."""
    if settings.expr:
        from lads.models.text import load_tokenizer

        tok = load_tokenizer(model.config.text.name)(
            settings.expr, padding=True, truncation=True, max_length=model.config.text.max_tokens, return_tensors="pt"
        )
        return tok["input_ids"].to(settings.device), tok["attention_mask"].to(settings.device)
    input_ids = torch.randint(1000, 2000, (1, settings.text_len),
                              generator=torch.Generator().manual_seed(settings.seed))
    return input_ids.to(settings.device), torch.ones_like(input_ids, device=settings.device)


def gate_patterns(settings: BenchSettings, model, input_ids, attention_mask):
    """(label, keep rate or open fraction, Gates of one expression) for each pattern."""
    from lads.models.subnet import random_gates

    if settings.expr:
        if model.gating is None:
            raise LadsError("--expr needs a LADS model with a gating network (this one is dense)")
        gates = model.gates(*model.encode_text(input_ids, attention_mask))[0].map(lambda g: g.float().cpu())
        for i, expr in enumerate(settings.expr):
            one = gates.map(lambda g: g[i:i + 1])
            yield expr, float(torch.cat((one.layer, one.filter), 1).mean()), one
        return
    g = torch.Generator().manual_seed(settings.seed)
    for keep in settings.keep:
        if not 0 <= keep <= 1:
            raise LadsError(f"--keep: rates must lie in [0, 1], got {keep}")
        for j in range(settings.patterns):
            yield f"keep {keep:g} #{j}", keep, random_gates(model.layout, keep, generator=g)


def images(settings: BenchSettings, model, batch: int):
    """Random images (batch, 3, S, S) and an all-valid pad mask."""
    size = settings.image_size or model.config.image_size
    x = torch.randn(batch, 3, size, size, device=settings.device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.zeros(batch, size, size, dtype=torch.bool, device=settings.device)


def measure(settings: BenchSettings, model) -> dict:
    """Every pattern at every batch size: ``batch`` images, one expression (the first of ``expr``
    or the random one) repeated, so that the subnet runs one forward per batch."""
    from lads.models.subnet import BackbonePlan, extract_subnet
    from lads.util.flops import count_flops

    rows, text_rows = [], []
    all_ids, all_mask = tokens(settings, model)
    patterns = list(gate_patterns(settings, model, all_ids, all_mask))
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    plan = BackbonePlan(model.visual_backbone, settings.fold_bn, memory_format, amp_dtype(DTYPES[settings.dtype]))
    for batch in settings.batch:
        image, pixel_mask = images(settings, model, batch)
        input_ids, attention_mask = all_ids[:1].expand(batch, -1), all_mask[:1].expand(batch, -1)
        text, text_mask = model.encode_text(input_ids, attention_mask)
        size = image.shape[-1]

        def text_cost():
            model.text_backbone.cache.clear()  # a frozen text backbone's cache: every expression is new
            t, m = model.encode_text(input_ids, attention_mask)
            if model.gating is not None:
                model.gates(t, m)
            return t, m

        def timed(**fns):
            return interleaved_medians(fns, settings.threads, settings.min_time, settings.rounds)

        text_rows.append({"batch": batch, "ms_per_expr": 1e3 * timed(text=text_cost)["text"] / batch,
                          "gflops_per_expr": count_flops(text_cost) / batch / 1e9})
        dense_flops = count_flops(model.ground, image, pixel_mask, text, text_mask, None)
        ones = Gates(torch.ones(1, model.layout.num_layer_gates), torch.ones(1, model.layout.num_filter_gates))
        dense_subnet = extract_subnet(model, ones.map(lambda g: g.to(settings.device)), plan=plan)
        batch_rows, dense_times = [], []
        for label, keep, gates in patterns:
            gates = gates.map(lambda g: g.to(settings.device))
            batch_gates = gates.map(lambda g: g.expand(batch, -1))
            subnet = extract_subnet(model, gates, plan=plan)
            flops = count_flops(subnet, image, pixel_mask, text, text_mask)
            analytic = subnet.analytic_flops(batch, size, size, text.shape[1])["total"]
            if flops != analytic:
                raise LadsError(f"FLOPs measured ({flops}) and analytic ({analytic}) differ for {label}")

            def end_to_end(cached: bool):
                t, m = text_cost()
                (subnet if cached else extract_subnet(model, gates, plan=plan))(image, pixel_mask, t, m)

            def dense_end_to_end():
                model.text_backbone.cache.clear()
                model.ground(image, pixel_mask, *model.encode_text(input_ids, attention_mask), None)

            t = timed(
                dense=lambda: model.ground(image, pixel_mask, text, text_mask, None),
                masked=lambda: model.ground(image, pixel_mask, text, text_mask, batch_gates),
                subnet=lambda: subnet(image, pixel_mask, text, text_mask),
                dense_subnet=lambda: dense_subnet(image, pixel_mask, text, text_mask),
                extract=lambda: extract_subnet(model, gates, plan=plan),
                e2e_unseen=lambda: end_to_end(cached=False),
                e2e_cached=lambda: end_to_end(cached=True),
                e2e_dense=dense_end_to_end,
            )
            dense_times.append(t["dense"])
            batch_rows.append(_row("masked", label, keep, batch, t["masked"], dense_flops, t["dense"], dense_flops))
            row = _row("subnet", label, keep, batch, t["subnet"], flops, t["dense"], dense_flops)
            row.update(extract_ms=1e3 * t["extract"], blocks=len(subnet.blocks), sublayers=len(subnet.sublayers),
                       new_mb=subnet.new_bytes / 2**20,
                       speedup_vs_extracted_dense=t["dense_subnet"] / t["subnet"],
                       e2e_unseen_ms_per_expr=1e3 * t["e2e_unseen"] / batch,
                       e2e_cached_ms_per_expr=1e3 * t["e2e_cached"] / batch,
                       e2e_dense_ms_per_expr=1e3 * t["e2e_dense"] / batch)
            row["efficiency_vs_extracted_dense"] = row["speedup_vs_extracted_dense"] / row["flops_ratio"]
            batch_rows.append(row)
            print(f"batch {batch} {label}: dense {1e3 * t['dense'] / batch:.2f}, subnet {row['ms_per_expr']:.2f} "
                  f"ms/expr, speedup {row['speedup']:.2f}x for a FLOPs ratio {row['flops_ratio']:.2f} "
                  f"({100 * row['efficiency']:.0f} %); end to end: unseen {row['e2e_unseen_ms_per_expr']:.2f}, "
                  f"cached {row['e2e_cached_ms_per_expr']:.2f}, dense {row['e2e_dense_ms_per_expr']:.2f} ms/expr "
                  f"(extraction {row['extract_ms']:.2f} ms)", flush=True)
        dense_s = statistics.median(dense_times)
        rows += [_row("dense", "all open", 1.0, batch, dense_s, dense_flops, dense_s, dense_flops), *batch_rows]
    return {"rows": rows, "text": text_rows}


def _row(mode, label, keep, batch, seconds, flops, dense_s, dense_flops) -> dict:
    speedup, ratio = dense_s / seconds, dense_flops / flops
    return {"mode": mode, "pattern": label, "keep": keep, "batch": batch, "ms_per_expr": 1e3 * seconds / batch,
            "gflops_per_expr": flops / batch / 1e9, "speedup": speedup, "flops_ratio": ratio,
            "efficiency": speedup / ratio}


# ----------------------------------------------------------------------------- reporting


def markdown(meta: dict, result: dict) -> str:
    lines = [
        f"# lads bench: {meta['config']}, {meta['image_size']} px, {meta['dtype']}, {meta['device']}",
        "",
        f"Device: {meta['device_name']} ({meta['device']}), dtype {meta['dtype']}, {meta['threads']} threads, "
        f"torch {meta['torch']}, fold_bn={meta['fold_bn']}, channels_last={meta['channels_last']}, "
        f"text length {meta['text_len']}. Timed: visual backbone + fusion + head (median, per expression). "
        "Speedups are over the dense supernet (all gates open, `model.ground`) timed beside each pattern; "
        "the extracted all-open subnet (same BN folding) is a second, stricter reference.",
        "",
        "| batch | mode | pattern | ms / expr | GFLOPs / expr | speedup | FLOPs ratio | speedup / ratio "
        "| speedup (/ ratio) over the extracted all-open subnet | extract ms | new MB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        subnet = "extract_ms" in r
        vs_extracted = (f"{r['speedup_vs_extracted_dense']:.2f} ({100 * r['efficiency_vs_extracted_dense']:.0f} %)"
                        if subnet else "")
        lines.append(
            f"| {r['batch']} | {r['mode']} | {r['pattern']} | {r['ms_per_expr']:.2f} | {r['gflops_per_expr']:.2f} | "
            f"{r['speedup']:.2f} | {r['flops_ratio']:.2f} | {100 * r['efficiency']:.0f} % | {vs_extracted} | "
            + (f"{r['extract_ms']:.2f} | {r['new_mb']:.1f} |" if subnet else " | |")
        )
    lines += ["", "End to end, per expression (text backbone + gating + extraction + subnet; ms): a gate pattern "
              "never seen, the same pattern with its subnet cached, and text backbone + the dense network.", "",
              "| batch | pattern | unseen | cached | dense | unseen / dense |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['pattern']} | {r['e2e_unseen_ms_per_expr']:.2f} | "
              f"{r['e2e_cached_ms_per_expr']:.2f} | {r['e2e_dense_ms_per_expr']:.2f} | "
              f"{r['e2e_unseen_ms_per_expr'] / r['e2e_dense_ms_per_expr']:.2f} |"
              for r in result["rows"] if "extract_ms" in r]
    lines += ["", "Shared cost, every mode (text backbone + gating network):", ""]
    lines += [f"- batch {t['batch']}: {t['ms_per_expr']:.1f} ms / expr, {t['gflops_per_expr']:.2f} GFLOPs / expr"
              for t in result["text"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    top = max(r["flops_ratio"] for r in result["rows"]) * 1.1
    ax.plot([1, top], [1, top], "k--", lw=1, label="speedup = FLOPs ratio")
    ax.plot([1, top], [1, 0.9 * top], "k:", lw=1, label="90 % of the FLOPs ratio")
    for mode, marker in (("masked", "x"), ("subnet", "o")):
        for batch in sorted({r["batch"] for r in result["rows"]}):
            pts = [r for r in result["rows"] if r["mode"] == mode and r["batch"] == batch]
            ax.scatter([r["flops_ratio"] for r in pts], [r["speedup"] for r in pts], marker=marker,
                       label=f"{mode}, batch {batch}")
    ax.set_xlabel("FLOPs ratio dense / subnet")
    ax.set_ylabel("speedup over dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(settings: BenchSettings) -> dict:
    """Measure (``measure``), write ``bench.json``, ``bench.md`` and ``speedup.png`` into
    ``settings.out`` and print the table; what ``bench.json`` holds: ``meta``, ``rows``, ``text``."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise LadsError("--device cuda: no CUDA device here")
    if settings.threads < 1:
        raise LadsError(f"--threads must be at least 1, got {settings.threads}")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        model = build(settings)
        with autocast(torch.device(settings.device), DTYPES[settings.dtype]):
            result = measure(settings, model)
    meta = {
        "config": settings.checkpoint or settings.config, "device": settings.device,
        "device_name": dist.device_name(settings.device), "dtype": settings.dtype, "threads": settings.threads,
        "torch": torch.__version__, "fold_bn": settings.fold_bn,
        "channels_last": settings.channels_last, "image_size": settings.image_size or model.config.image_size,
        "text_len": "tokenised" if settings.expr else settings.text_len,
    }
    report = {"meta": meta, **result}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    table = markdown(meta, result)
    (out / "bench.md").write_text(table)
    plot(result, out / "speedup.png")
    print(table)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'speedup.png'}")
    return report
