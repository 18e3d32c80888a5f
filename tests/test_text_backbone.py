"""The linguistic backbone: BERT truncated at load time, equal to the full model's layer N."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel

from lads.errors import LadsError
from lads.models.text import TextBackbone, load_tokenizer, resolve_text_model


def full_hidden_state(source: str, n: int, ids, mask) -> torch.Tensor:
    """Layer N's output from the untruncated Hugging Face model with the same weights."""
    full = BertModel.from_pretrained(source, add_pooling_layer=False).eval()
    assert full.config.num_hidden_layers > n
    with torch.no_grad():
        return full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[n]


def test_minilm_truncated_to_3_layers_equals_layer_3_of_the_full_model():
    """The real MiniLM (6 layers) cut to 3: three layers held, output = hidden_states[3]."""
    tokenizer = load_tokenizer("minilm-l6")
    enc = tokenizer(["the small red circle left of the green square", "a dog"], padding=True,
                    truncation=True, max_length=40, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    text = TextBackbone("minilm-l6", 3).eval()
    assert len(text.bert.encoder.layer) == 3 and text.bert.config.num_hidden_layers == 3
    with torch.no_grad():
        features, mask = text(enc["input_ids"], enc["attention_mask"])
    want = full_hidden_state(resolve_text_model("minilm-l6"), 3, enc["input_ids"], enc["attention_mask"])
    assert features.shape == (2, enc["input_ids"].shape[1], 384) and mask.dtype == torch.bool
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_bert_truncated_equals_hidden_state_n(tiny_bert_dir, n):
    """The tiny random BERT (4 layers) cut to N: N layers, no more parameters, layer N's output."""
    text = TextBackbone(tiny_bert_dir, n).eval()
    assert len(text.bert.encoder.layer) == n
    layer = sum(p.numel() for p in text.bert.encoder.layer[0].parameters())
    full = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False)
    assert sum(p.numel() for p in text.parameters()) == sum(p.numel() for p in full.parameters()) - (4 - n) * layer
    ids = torch.randint(5, 1000, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    with torch.no_grad():
        features, _ = text(ids, mask)
    torch.testing.assert_close(features, full_hidden_state(tiny_bert_dir, n, ids, mask), rtol=1e-5, atol=1e-6)


def test_not_pretrained_is_the_same_architecture_randomly_initialised(tiny_bert_dir):
    """``pretrained=False`` builds the architecture from the config only, without the weights."""
    loaded, random = TextBackbone(tiny_bert_dir, 2), TextBackbone(tiny_bert_dir, 2, pretrained=False)
    assert ([(k, v.shape) for k, v in loaded.state_dict().items()]
            == [(k, v.shape) for k, v in random.state_dict().items()])
    assert not torch.equal(loaded.bert.embeddings.word_embeddings.weight, random.bert.embeddings.word_embeddings.weight)


def test_more_layers_than_the_model_has_is_refused(tiny_bert_dir):
    with pytest.raises(LadsError, match=r"has 4 layers.*asks for 5"):
        TextBackbone(tiny_bert_dir, 5)
    with pytest.raises(LadsError, match="at least 1"):
        TextBackbone(tiny_bert_dir, 0)
