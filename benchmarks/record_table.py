"""Records at the paper's scale: build a record table of N generated expressions, then open it
in a fresh process and read it from 4 DataLoader workers; time and memory of each step.

    python benchmarks/record_table.py --records 6000000 --out benchmarks/results/record-table/<machine>-<date>-<commit>

Build: ``Record`` objects through ``TableBuilder`` (what the readers do), then ``save``. Load, in
a new process: ``RecordTable.open`` (memory-mapped), every column read once (all pages resident:
the worst case), a ``Mixture`` over it, and 4 DataLoader workers (fork) that each read every
column again and then draw records at random. Memory from ``/proc/<pid>/smaps_rollup`` while
the workers live: RSS counts a shared page in every process that maps it, PSS divides it among
them, USS is what a process holds alone; the sum of PSS is what the processes take in all.
For comparison, the same records as a Python list of ``Record`` (tracemalloc, 100 k of them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lads.datasets.records import Record  # noqa: E402
from lads.datasets.table import RecordTable, TableBuilder  # noqa: E402

WORDS = ("the man woman dog cat car left right red blue small large white black shirt table chair "
         "person standing sitting behind front next to on in with a of near far top bottom middle").split()
PER_IMAGE = 35  # the corpus: ~6.1 M expressions on ~174 k images


def generate(n: int, seed: int = 0):
    """``n`` records like the pre-training corpus: 3 to 12 words, ~35 an image, a few COCO images."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 13, n)
    words = rng.integers(0, len(WORDS), int(lengths.sum()))
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(8, 200, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).round(2)
    start = 0
    for i in range(n):
        image = i // PER_IMAGE
        expression = " ".join(WORDS[w] for w in words[start : start + lengths[i]])
        start += lengths[i]
        yield Record(f"/data/vg/VG_100K/{image}.jpg", expression, tuple(boxes[i]), "generated", "train",
                     ann_id=i, image_id=image, coco_id=image if image % 3 == 0 else None)


def memory(pid) -> dict:
    """RSS, PSS and USS (private pages) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss_mb": fields["Rss"], "pss_mb": fields["Pss"],
            "uss_mb": fields["Private_Clean"] + fields["Private_Dirty"]}


def children(pid) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def touch(table) -> int:
    """Read every page of every column (what a long run ends up doing)."""
    return int(sum(int(np.asarray(c).view(np.uint8).sum(dtype=np.uint64) & 0xFF) for c in table.columns.values()))


def build(n: int, folder: Path) -> dict:
    t0 = time.perf_counter()
    builder = TableBuilder()
    for record in generate(n):
        builder.append(record)
    table = builder.table(origin="generated")
    t1 = time.perf_counter()
    table.save(folder)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in folder.iterdir())
    return {"records": n, "images": len(builder.images), "build_s": round(t1 - t0, 1), "save_s": round(t2 - t1, 1),
            "table_mb": round(size / 2**20, 1), "bytes_per_record": round(size / n, 1),
            "build_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


class Draws:
    """A dataset over a mixture that returns what a record gives the model (text length, box)."""

    def __init__(self, mixture, table):
        self.mixture, self.table = mixture, table

    def __len__(self):
        return len(self.mixture)

    def __getitem__(self, i):
        r = self.mixture[i]
        return len(r.expression), r.box[2] - r.box[0]


def _worker_init(worker_id):
    import torch.utils.data as tud

    touch(tud.get_worker_info().dataset.table)


def load(folder: Path, workers: int, draws: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from lads.datasets.mixture import Mixture

    t0 = time.perf_counter()
    table = RecordTable.open(folder)
    mixture = Mixture([table], [table.rows("train")], [1.0], ["generated"])
    t1 = time.perf_counter()
    touch(table)
    t2 = time.perf_counter()
    dataset = Draws(mixture, table)
    sampler = RandomSampler(dataset, num_samples=draws, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=256, sampler=sampler, num_workers=workers, persistent_workers=True,
                        collate_fn=len, worker_init_fn=_worker_init, multiprocessing_context="fork")
    it = iter(loader)
    t3 = time.perf_counter()
    seen = sum(it)
    t4 = time.perf_counter()
    pids = children(os.getpid())
    main = memory(os.getpid())
    each = [memory(p) for p in pids]
    result = {
        "open_s": round(t1 - t0, 3), "touch_all_pages_s": round(t2 - t1, 2),
        "draws": seen, "draw_s": round(t4 - t3, 2), "records_per_s": round(seen / (t4 - t3)),
        "workers": len(each), "main": main, "worker_mean": {k: float(np.mean([m[k] for m in each])) for k in main},
        "pss_total_mb": main["pss_mb"] + sum(m["pss_mb"] for m in each),
        "rss_sum_mb": main["rss_mb"] + sum(m["rss_mb"] for m in each),
    }
    del it
    return result


def python_objects(n: int = 100_000) -> float:
    """Bytes a ``Record`` object takes in a list (with its strings and tuple)."""
    tracemalloc.start()
    records = list(generate(n))
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del records
    return size / n


def report(result: dict) -> str:
    b, loaded = result["build"], result["load"]
    n = b["records"]
    lines = [
        f"# Record table: {n:,} generated records",
        "",
        f"Machine: {result['machine']}; {result['date']}. Command: `{result['command']}`",
        "",
        "| step | figure |", "|---|---:|",
        f"| build (Record objects through TableBuilder) | {b['build_s']} s |",
        f"| save (.npy files) | {b['save_s']} s |",
        f"| build process, peak RSS | {b['build_peak_rss_mb']:.0f} MB |",
        f"| table on disk | {b['table_mb']:.0f} MB ({b['bytes_per_record']} bytes a record, {b['images']:,} images) |",
        f"| open (memory-mapped) + mixture | {loaded['open_s']} s |",
        f"| read every page once (page cache warm: the table was just written) | {loaded['touch_all_pages_s']} s |",
        f"| {loaded['workers']} workers: {loaded['draws']:,} random records | {loaded['draw_s']} s "
        f"({loaded['records_per_s']:,} records/s) |",
        f"| main process: RSS / PSS / USS | {loaded['main']['rss_mb']:.0f} / {loaded['main']['pss_mb']:.0f} / "
        f"{loaded['main']['uss_mb']:.0f} MB |",
        f"| a worker (mean): RSS / PSS / USS | {loaded['worker_mean']['rss_mb']:.0f} / "
        f"{loaded['worker_mean']['pss_mb']:.0f} / {loaded['worker_mean']['uss_mb']:.0f} MB |",
        f"| **main + {loaded['workers']} workers, PSS in all** | **{loaded['pss_total_mb']:.0f} MB** "
        f"(RSS summed: {loaded['rss_sum_mb']:.0f} MB) |",
        f"| the same records as Python `Record` objects | {result['python_bytes_per_record']:.0f} bytes a record "
        f"= {result['python_bytes_per_record'] * n / 2**30:.2f} GB, in every worker that touches them |",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=6_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--draws", type=int, default=200_000, help="records the workers read at random")
    parser.add_argument("--dir", help="where the table is written (default: a temporary folder, removed)")
    parser.add_argument("--out", help="folder for record_table.json and record_table.md")
    parser.add_argument("--phase", choices=["all", "load"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "load":  # in a fresh process: no pages of the build
        print(json.dumps(load(Path(args.dir), args.workers, args.draws)))
        return
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="record-table-"))
    folder = work / "table"
    shutil.rmtree(folder, ignore_errors=True)
    built = build(args.records, folder)
    print("build:", json.dumps(built), flush=True)
    done = subprocess.run([sys.executable, __file__, "--phase", "load", "--dir", str(folder), "--workers",
                           str(args.workers), "--draws", str(args.draws)], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    from lads.util.dist import device_name

    result = {"build": built, "load": loaded, "python_bytes_per_record": python_objects(),
              "machine": f"{device_name('cpu')}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/record_table.py " + " ".join(sys.argv[1:])}
    text = report(result)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "record_table.json").write_text(json.dumps(result, indent=2))
        (Path(args.out) / "record_table.md").write_text(text)
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
