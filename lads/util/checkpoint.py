"""Checkpoints: a folder with weights (safetensors), config and metadata (JSON), a model card
(``README.md``, ``lads.util.card``) and, for resuming, the optimizer, scheduler and RNG state.
Written atomically: the new folder is complete (and synced to disk) before it replaces the old
one, so a run killed at any moment leaves a complete checkpoint, the new or the previous one
(docs/design.md §5d); a write that fails (a full disk) leaves the previous one and says why.

    DIR/model.safetensors   DIR/config.json   DIR/meta.json   DIR/training_state.pt   DIR/text/   DIR/README.md
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from lads.errors import LadsError
from lads.util import dist
from lads.util.card import EVAL, write_card

WEIGHTS, CONFIG, META, STATE = "model.safetensors", "config.json", "meta.json", "training_state.pt"
TEXT = "text"  # tokenizer and BERT config of the text backbone
TMP, PREV = ".tmp-", ".prev"  # a checkpoint being written; the one it replaces, until it is in place


def save_checkpoint(path, model, config: dict, meta: dict, training_state: dict | None = None,
                    tokenizer=None, evaluation: dict | None = None, card_name: str | None = None) -> Path:
    """Write a checkpoint folder atomically (write a sibling, then swap). With ``tokenizer``,
    the text backbone's tokenizer and BERT config go to ``DIR/text``, so that the checkpoint
    loads offline without the original text model. The model card names ``card_name`` (default:
    the folder) and shows ``evaluation`` (a row of ``lads eval``, kept as ``eval.json``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(path)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + TMP, dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TEXT))
            model.text_backbone.bert.config.save_pretrained(str(tmp / TEXT))
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / META).write_text(json.dumps({**meta, "files": files}, indent=2))
        if evaluation is not None:
            (tmp / EVAL).write_text(json.dumps(evaluation, indent=2))
        write_card(tmp, name=card_name or str(path))  # after meta.json: not one of the files it checks
        _sync(tmp)
    except Exception as e:  # a full disk: OSError from Python, RuntimeError from torch, SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous checkpoint is kept" if path.exists() else "no earlier checkpoint"
        raise LadsError(f"checkpoint {path}: cannot write it ({_cause(e)}); {kept}") from None
    previous = path.with_name(path.name + PREV)
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(path, previous)
    os.replace(tmp, path)
    shutil.rmtree(previous, ignore_errors=True)
    return path


def _cause(e: Exception) -> str:
    """The system's words for a failed write (``No space left on device``), also from torch's and
    safetensors' messages (``… (os error 28)``)."""
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"(?:os error|errno) (\d+)", str(e), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    return os.strerror(code) if code else str(e).strip().splitlines()[-1]


def _sync(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk."""
    for f in [*sorted(folder.rglob("*")), folder]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_partial_writes(path) -> None:
    """Remove what killed writes of checkpoint ``path`` left beside it: ``*.tmp-*`` folders, and
    a ``.prev`` once ``path`` is complete."""
    path = Path(path)
    stale = list(path.parent.glob(path.name + TMP + "*"))
    if (path / META).exists():
        stale.append(path.with_name(path.name + PREV))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)


def resolve_checkpoint(path) -> Path:
    """The checkpoint folder itself, or the one inside a run folder; a ``.prev`` left by a
    write interrupted between its two renames counts too."""
    path = Path(path)
    for candidate in (path, path / "checkpoint", path.with_name(path.name + PREV), path / ("checkpoint" + PREV)):
        if (candidate / META).exists():
            return candidate
    if not path.exists():
        raise LadsError(f"checkpoint {path}: no such folder")
    raise LadsError(f"checkpoint {path}: no {META} here (not a checkpoint, or a partial one)")


def read_meta(path) -> tuple[Path, dict, dict]:
    """(folder, config dict, meta dict) of a complete checkpoint; partial ones are refused."""
    path = resolve_checkpoint(path)
    meta = json.loads((path / META).read_text())
    for name, size in meta.get("files", {}).items():
        f = path / name
        if name == STATE and not f.exists():
            continue  # a shared copy (save_pretrained, the Hub) loads without it; resuming says so
        if not f.exists():
            raise LadsError(f"checkpoint {path} is partial: {name} is missing")
        if f.stat().st_size != size:
            raise LadsError(f"checkpoint {path}: {name} is truncated or altered ({f.stat().st_size} bytes, "
                            f"expected {size})")
    return path, json.loads((path / CONFIG).read_text()), meta


def load_weights(path: Path, model, new: str | None = None, left: str | None = None) -> None:
    """Load ``model.safetensors`` into ``model`` strictly, naming the keys that differ; only
    the keys under the prefix ``new`` (a module the checkpoint did not have) may be missing, and
    only those under ``left`` (a module the model does not have) may be left unread.
    Batch norm's step counters (``num_batches_tracked``) that the model has no place for are
    dropped: a checkpoint trained with batch norm starts a model with frozen batch norm."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise LadsError(f"{path / WEIGHTS}: cannot read the weights ({e})") from None
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not (k.endswith(".num_batches_tracked") or left and k.startswith(left))}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if new:
        missing = [k for k in missing if not k.startswith(new)]
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise LadsError(
            f"{path / WEIGHTS} does not fit this model's config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {sorted(wrong)[:5]}"
        )
    model.load_state_dict(state, strict=not new)


def load_training_state(path: Path) -> dict:
    f = path / STATE
    if not f.exists():
        raise LadsError(f"checkpoint {path} holds no training state ({STATE}); cannot resume")
    return torch.load(f, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- loading models


def init_weights(model, checkpoint) -> None:
    """``model.init``: the weights of another run, without its optimizer state. The architecture
    must match; a dense checkpoint may start a LADS model, whose gating network is then new, and a
    checkpoint with a token head a model without one (the paper's: the token head was a
    training-only teacher), which leaves it behind."""
    folder, saved, _ = read_meta(checkpoint)
    from_dense = saved["model"].get("dense") and model.gating is not None
    left = "token_head." if model.token_head is None else None
    try:
        load_weights(folder, model, new="gating." if from_dense else None, left=left)
    except LadsError as e:
        raise LadsError(f"model.init={checkpoint}: {e}. The model section of this config must match the "
                        f"checkpoint's ({folder / 'config.json'}); only a dense checkpoint may start a LADS "
                        "model, whose gating network is then new") from None
    if dist.is_main():
        notes = [note for note, on in (("dense; a new gating network", from_dense),
                                       ("its token head left behind", left and saved["model"]["loss"].get("token")))
                 if on]
        print(f"model.init: weights from {folder}" + (f" ({'; '.join(notes)})" if notes else ""))


def restored_model_config(model_cfg, checkpoint=None):
    """``model_cfg`` for a model whose weights come from ``checkpoint``: no starting weights to
    read (``model.visual.pretrained`` and ``model.init`` stay in the saved config as the run's
    origin), and the text backbone's tokenizer and BERT config from the checkpoint's ``text/``
    folder where it has one: the vocabulary its weights were trained with, and no download."""
    built = copy.deepcopy(model_cfg)
    built.visual.pretrained = None
    if checkpoint is not None and (resolve_checkpoint(checkpoint) / TEXT).exists():
        built.text.name, built.text.pretrained = str(resolve_checkpoint(checkpoint) / TEXT), False
    return built
