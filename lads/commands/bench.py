"""``lads bench``: time and count the FLOPs of dense, masked and extracted subnets (``lads.bench``)."""

from __future__ import annotations

import torch

from lads.util.amp import DTYPES


def add_arguments(parser):
    from lads.config import add_config_arguments

    add_config_arguments(parser, default="lads-r50", data=False)
    parser.add_argument("--checkpoint", metavar="DIR", help="a trained model: DIR/config.json + DIR/model.safetensors")
    parser.add_argument("--random-text", action="store_true",
                        help="random text weights with --expr too (no download); with --keep they are "
                             "always random, since they do not change the timing")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="keep rates of random hard gates (each gate open with this probability)")
    parser.add_argument("--patterns", type=int, default=1, help="random gate patterns per keep rate (default 1)")
    parser.add_argument("--expr", nargs="+", metavar="TEXT",
                        help="gate patterns from these expressions (gating network) instead of --keep")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="fp32 (default), or bf16/fp16 autocast (folded weights stored in that dtype)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--image-size", type=int, help="square input size (default: the config's)")
    parser.add_argument("--text-len", type=int, default=20, help="tokens per expression with --keep (default 20)")
    parser.add_argument("--fold-bn", action="store_true", help="fold batch norm into the subnet's convolutions")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC memory format for the convolutions (the supernet's and the subnets' new weights)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement (default 2)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="dense, masked and subnet timed in this many alternating rounds (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random gates and inputs (default 0)")
    parser.add_argument("--out", default="bench-out", metavar="DIR", help="output folder (default bench-out)")


def run(args):
    from dataclasses import fields

    from lads.bench import BenchSettings, run_bench

    run_bench(BenchSettings(**{f.name: getattr(args, f.name) for f in fields(BenchSettings)}))
