"""``lads info``: build a model and print its structure and parameter counts."""

from __future__ import annotations


def add_arguments(parser):
    from lads.config import add_config_arguments

    add_config_arguments(parser, data=False)
    parser.add_argument("--structure", action="store_true", help="also print the module tree")


def run(args):
    from lads.config import config_overrides
    from lads.models import build_model

    model = build_model(args.config, config_overrides(args))
    if args.structure:
        print(model)
    layout = model.layout
    print(f"preset {args.config}: image {model.config.image_size} px, dense={model.config.dense}")
    print(f"gates: {layout.num_layer_gates} layer gates, {layout.num_filter_gates} filter gates, "
          f"{len(layout.candidates)} candidate layers")
    counts = model.parameter_counts()
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in model.named_children()}
    width = max(map(len, counts))
    print(f"{'component':<{width}}  {'parameters':>12}  {'trainable':>12}")
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>12,}  {trainable[name]:>12,}")
    print(f"{'total':<{width}}  {sum(counts.values()):>12,}  {sum(trainable.values()):>12,}")
