"""``lads data synth``, ``lads data stats``, ``lads data index`` and ``lads data check``."""

from __future__ import annotations

SUBCOMMANDS = {
    "synth": "generate the synthetic REC benchmark (REFER format)",
    "stats": "per-split statistics of one or more datasets",
    "index": "build the record tables of a config's mixture (once, before training)",
    "check": "compare a copy of a dataset with its published counts and look for every image",
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    adders = {"synth": _synth_arguments, "stats": _stats_arguments, "index": _index_arguments,
              "check": _check_arguments}
    for name, help_text in SUBCOMMANDS.items():
        adders[name](sub.add_parser(name, help=help_text, description=help_text))


def run(args):
    return {"synth": _synth, "stats": _stats, "index": _index, "check": _check}[args.data_command](args)


def _synth_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--images", type=int, default=1000, help="train/val/test images (default 1000)")
    parser.add_argument("--size", type=int, default=128, help="nominal long side in pixels (default 128)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="extra heldout images, as a fraction of --images (default 0.1)")
    parser.add_argument("--force", action="store_true", help="overwrite a dataset already in --out")


def _synth(args):
    from lads.datasets.synth import generate

    out = generate(args.out, args.seed, args.images, args.size, args.heldout_fraction, args.force)
    print(f"wrote the synthetic benchmark to {out}")


def _stats_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a REFER folder, a TransVG split file or folder, a Flickr30k Entities or "
                             "Visual Genome folder, or a .jsonl file")
    parser.add_argument("--split", nargs="+", help="only these splits (default: all)")
    parser.add_argument("--split-by", help="REFER refs(<splitBy>).p to read (default: unc, "
                        "then umd, berkeley, google)")
    parser.add_argument("--image-root", help="folder the image paths are relative to (default: the "
                        "dataset's images/ folder; the JSONL file's folder)")
    parser.add_argument("--no-image-check", action="store_true",
                        help="do not check that every image file exists (for huge sets)")


def _stats(args):
    from pathlib import Path

    from lads.datasets import read_dataset
    from lads.datasets.summary import format_table, split_rows
    from lads.errors import LadsError

    if args.image_root and not Path(args.image_root).is_dir():
        raise LadsError(f"--image-root {args.image_root}: no such folder")
    rows, notes = [], []
    for path in args.paths:
        dataset = read_dataset(path, args.split, image_root=args.image_root, split_by=args.split_by)
        missing = None if args.no_image_check else {i for i in {r.image for r in dataset.records}
                                                     if not Path(i).is_file()}
        rows += split_rows(path, dataset, missing)
        if dataset.image_root is not None:
            notes.append(f"{path}: {dataset.image_root.describe()}")
        if missing:
            notes.append(f"{path}: {len(missing)} image file(s) missing (first: {min(missing)}); "
                         "--image-root names the folder the images are in")
        for reason, n in dataset.skipped_by_reason().most_common():
            notes.append(f"{path}: skipped {n}: {reason} (first: {dataset.examples[reason]})")
    print(format_table(rows))
    if notes:
        print("\n" + "\n".join(notes))


def _index_arguments(parser):
    from lads.config import add_config_arguments

    add_config_arguments(parser)


def _index(args):
    """Build the record tables of a config's ``data.mixture`` in ``data.index_dir`` once, before a
    run on many processes or machines, and say what each source holds, skips and loses to the
    leak-free exclusion."""
    from lads.config import config_overrides, load_config
    from lads.datasets.mixture import load_mixture, table_folder
    from lads.errors import LadsError

    cfg = load_config(args.config, config_overrides(args))
    if not cfg.data.mixture:
        raise LadsError(f"{args.config}: no data.mixture to index")
    load_mixture(cfg.data)
    for source in cfg.data.mixture:
        print(f"{source.path}: {table_folder(source, cfg.data.index_dir)}")


def _check_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a REFER folder, a TransVG split folder or file, "
                        "a Flickr30k Entities folder, ... (as for lads data stats)")
    parser.add_argument("--split-by",
                        help="REFER refs(<splitBy>).p to read (default: unc, then umd, berkeley, google)")
    parser.add_argument("--image-root",
                        help="folder the image paths are relative to (default: found, see docs/data.md)")
    parser.add_argument("--expect", metavar="FILE.json",
                        help="counts to compare with instead of the published ones: "
                             "{split: {expressions, objects, images}}")
    parser.add_argument("--no-image-check", action="store_true", help="compare the counts only")


def _check(args) -> int:
    """Exit status 1 when a count differs from the published one or an image is missing."""
    from lads.datasets.check import check, read_expected

    expected = read_expected(args.expect) if args.expect else None
    failed, compared = [], set()
    for path in args.paths:
        report = check(path, image_root=args.image_root, split_by=args.split_by, expected=expected,
                       images=not args.no_image_check)
        print("\n".join(report.lines()))
        compared.add(report.against)
        if not report.ok:
            failed.append(path)
    if failed:
        print(f"\nmismatch: {', '.join(failed)} (docs/data.md says where to get each dataset and how it is laid out)")
        return 1
    counts = " and ".join(f"every count as {a}" for a in sorted(compared - {None})) or "no counts to compare with"
    print(f"\n{counts}" + ("" if args.no_image_check else ", every image present"))
    return 0
