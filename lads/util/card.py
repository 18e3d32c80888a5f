"""The model card of a checkpoint (``README.md`` in its folder, as the Hugging Face Hub shows it;
docs/design.md §3b): what it was trained on, how, and its figures: the last validation of
training, and those of the latest ``lads eval`` (``eval.json`` beside it). Written after
``meta.json`` and not listed there, so that an evaluation may rewrite it without altering the
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

CARD, EVAL = "README.md", "eval.json"

CITATION = """@inproceedings{su2023lads,
  title     = {Referring Expression Comprehension Using Language Adaptive Inference},
  author    = {Su, Wei and Miao, Peihan and Dou, Huanzhang and Fu, Yongjian and Li, Xi},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2023}
}"""


def model_kind(model_config: dict) -> str:
    if model_config.get("dense"):
        return "dense baseline"
    return "static control" if model_config.get("gating", {}).get("static") else "LADS"


def results_table(evaluation: dict) -> list[str]:
    """Markdown rows of ``lads eval``'s figures for one checkpoint (a row of its JSON)."""
    lines = [f"**Warning: this model {evaluation['warning']}.**", ""] if evaluation.get("warning") else []
    lines += ["| split | expressions | Prec@0.5 | FLOPs kept | ms per expression |", "|---|---|---|---|---|"]
    for split, r in evaluation["splits"].items():
        lines.append(f"| {split} | {r['expressions']} | {r['prec@0.5']:.2f} | {100 * r['flops_kept']:.0f} % "
                     f"| {r['ms_per_expression']:.1f} |")
    lines += ["", f"`lads eval`, mode {evaluation['mode']}, on {evaluation['device']}, {evaluation['dtype']}, "
                  f"{evaluation['threads']} threads; Prec@0.5 of the inference head (`model.head`)."]
    return lines


def render(config: dict, meta: dict, evaluation: dict | None = None, name: str = "DIR") -> str:
    """The card's text from the checkpoint's config and meta, and ``lads eval``'s row."""
    m, d = config["model"], config["data"]
    data = Path(d["path"]).name if d.get("path") else "(mixture)" if d.get("mixture") else "?"
    preset = config.get("preset") or "a config file"
    training = meta.get("validation")
    lines = [
        "---", "library_name: lads",
        "tags: [referring-expression-comprehension, visual-grounding, dynamic-networks, lads]", "---", "",
        f"# {model_kind(m)} — {preset}, trained on {data}", "",
        "Referring expression comprehension with Language Adaptive Dynamic Subnets (Su et al., AAAI 2023): the "
        "expression chooses the layers and filters that run, and the subnet they make finds its box.", "",
        "## Training", "",
        f"- preset `{preset}`, every setting in `config.json`; inference head `{m['head']}`, "
        f"image size {m['image_size']}, text backbone `{m['text']['name']}` ({m['text']['num_layers']} layers)",
        f"- data `{d.get('path') or '(mixture)'}`, split `{d['train_split']}`; {meta.get('step', '?')} steps of "
        f"{config['train']['batch_size']} ({meta.get('epoch', 0):.1f} epochs), {meta.get('world_size', 1)} "
        f"process(es), {meta.get('amp', '?')} precision, {meta.get('train_s', 0) / 60:.1f} min of training",
        *(["- **model.visual.allow_eval_overlap=true: the visual backbone started from weights that saw "
            "evaluation images**"] if m["visual"].get("allow_eval_overlap") else []),
        f"- lads {meta.get('lads_version', '?')}, torch {meta.get('torch_version', '?')}; checkpoint written "
        f"because: {meta.get('reason', '?')}", "",
        "## Results", "",
    ]
    if evaluation:
        lines += results_table(evaluation)
    else:
        lines.append("Not evaluated yet: `lads eval --checkpoint DIR` writes the figures here.")
    if training:
        lines += ["", f"During training, at step {training['step']}: {training['split']} Prec@0.5 "
                      f"{training['prec@0.5']:.2f} (masked supernet, no timing)."]
    lines += ["", "## Use", "", "```python", "import lads", "",
              f'model = lads.LADS.from_pretrained("{name}")  # a folder, or a Hub id',
              'model.predict("photo.jpg", ["the red circle", "the leftmost square"])', "```", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def write_card(folder, name: str | None = None) -> Path:
    """(Re)write ``folder``'s card from its config, meta and ``eval.json`` (if any)."""
    folder = Path(folder)
    evaluation = json.loads((folder / EVAL).read_text()) if (folder / EVAL).exists() else None
    text = render(json.loads((folder / "config.json").read_text()), json.loads((folder / "meta.json").read_text()),
                  evaluation, name or str(folder))
    (folder / CARD).write_text(text)
    return folder / CARD


def record_evaluation(folder, row: dict) -> None:
    """Keep ``lads eval``'s row for this checkpoint beside it and put its figures in the card;
    a folder that cannot be written (a Hub cache, read-only) is left as it is."""
    folder = Path(folder)
    try:
        (folder / EVAL).write_text(json.dumps(row, indent=2))
        write_card(folder)
    except OSError:
        pass
