"""A bounded load test of ``lads serve`` on localhost: latency percentiles, errors, memory.

Starts ``lads serve --checkpoint DIR`` on a free port, sends ``--warmup`` requests, then
``--requests`` requests from ``--concurrency`` threads (each a mixed batch of 1-3 expressions on
one of the server's example images, multipart), and stops. Prints and writes (``--out``) the
latency p50 / p95 / max, requests per second, errors, and the server's resident memory after
warm-up and at the end (``/proc/PID/status``, Linux). The server runs with an API key (a random
one unless ``--api-key``), sent with every request; its per-client rate limit is off
(``serve.requests_per_minute=0``: this one client is all the load), its bound on concurrent work
as configured.

    python benchmarks/serve_load.py --checkpoint runs/demo/lads/checkpoint \
        --out benchmarks/results/serve-load/<machine>-<date>-<commit>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "star", "cross", "diamond", "triangle"]
WHERE = ["", "leftmost ", "rightmost ", "small ", "large "]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(checkpoint: str, port: int, key: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LADS_API_KEY": key}
    proc = subprocess.Popen([sys.executable, "-m", "lads.cli", "serve", "--checkpoint", checkpoint, "--port", str(port),
                             "--set", "serve.requests_per_minute=0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", headers={"X-API-Key": key},
                         timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit(f"lads serve exited with {proc.returncode}")
    proc.kill()
    raise SystemExit("lads serve did not answer within 180 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/lads/checkpoint")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=secrets.token_urlsafe(16), help="the server's key (default: a random one)")
    parser.add_argument("--out", help="folder for serve_load.md and serve_load.json")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(args.checkpoint, port, args.api_key)
    try:
        client = httpx.Client(timeout=120, headers={"X-API-Key": args.api_key})
        if client.get(url + "/v1/model", headers={"X-API-Key": ""}).status_code != 401:
            raise SystemExit("the server answered a call without its API key")
        examples = [client.get(url + e["url"]).content for e in client.get(url + "/v1/examples").json()["examples"]]
        if not examples:
            raise SystemExit("the checkpoint's dataset has no test images to send")
        rng = random.Random(args.seed)
        jobs = [(rng.choice(examples), [f"the {rng.choice(WHERE)}{rng.choice(COLOURS)} {rng.choice(SHAPES)}"
                                        for _ in range(rng.randint(1, 3))])
                for _ in range(args.warmup + args.requests)]
        lock, memory = threading.Lock(), []

        def send(job):
            image, expressions = job
            began = time.perf_counter()
            answer = client.post(url + "/v1/predict", files={"image": ("x.png", image, "image/png")},
                                 data={"expression": expressions})
            seconds = time.perf_counter() - began
            ok = answer.status_code == 200 and len(answer.json()["predictions"]) == len(expressions)
            with lock:
                memory.append(rss_mb(proc.pid))  # after each request, in order of completion
            return seconds, ok

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(send, jobs[: args.warmup]))
            after_warmup = rss_mb(proc.pid)
            memory.clear()
            began = time.perf_counter()
            results = list(pool.map(send, jobs[args.warmup :]))
            wall = time.perf_counter() - began
        end = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    latencies = sorted(1000 * s for s, _ in results)
    quantiles = statistics.quantiles(latencies, n=20)
    summary = {
        "requests": len(results), "concurrency": args.concurrency, "errors": sum(not ok for _, ok in results),
        "p50_ms": statistics.median(latencies), "p95_ms": quantiles[18], "max_ms": latencies[-1],
        "requests_per_s": len(results) / wall, "rss_mb_after_warmup": after_warmup, "rss_mb_max": max(memory),
        "rss_mb_end": end, "threads": os.cpu_count(),
        "rss_mb_by_quarter": [max(memory[: len(memory) * q // 4]) for q in (1, 2, 3, 4)],
    }
    lines = [f"`python benchmarks/serve_load.py --checkpoint {args.checkpoint} --requests {args.requests}`: "
             f"{summary['requests']} requests "
             f"({args.warmup} before them to warm up), {args.concurrency} concurrent, 1-3 expressions each, "
             f"with the API key, localhost, {os.cpu_count()} CPU cores.", "",
             "| errors | p50 | p95 | max | requests/s | RSS after warm-up | RSS max by quarter of the run "
             "| RSS at the end |",
             "|---|---|---|---|---|---|---|---|",
             f"| {summary['errors']} | {summary['p50_ms']:.0f} ms | {summary['p95_ms']:.0f} ms "
             f"| {summary['max_ms']:.0f} ms "
             f"| {summary['requests_per_s']:.1f} | {after_warmup:.0f} MB | "
             + " / ".join(f"{m:.0f}" for m in summary["rss_mb_by_quarter"]) + f" MB | {end:.0f} MB |"]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_load.md").write_text("\n".join(lines) + "\n")
        (out / "serve_load.json").write_text(json.dumps(summary, indent=2))
    if summary["errors"]:
        raise SystemExit(f"{summary['errors']} request(s) failed")


if __name__ == "__main__":
    main()
