"""``lads serve``: a web page to try a model and an HTTP API to call it (``lads.serve``)."""

from __future__ import annotations


def add_arguments(parser):
    from lads.serve import DEMO_CHECKPOINT

    parser.add_argument("--checkpoint", metavar="DIR",
                        help=f"a trained model's checkpoint folder (default: {DEMO_CHECKPOINT}, the demo's LADS)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only; "
                                       "0.0.0.0 makes the server reachable from the network)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding beyond localhost without an API key (LADS_API_KEY)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a serve setting, e.g. serve.max_expressions=32 (repeatable)")


def run(args):
    from lads.serve import serve

    serve(args.checkpoint, args.overrides, args.host, args.port, args.insecure)
