"""``raykd.models.new_classifier``: a new head is quiet, a missing encoder weight is an error."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from raykd.models import new_classifier


@pytest.fixture
def encoder(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "enc")
    return tmp_path / "enc"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_new_head_loads_without_the_load_report(encoder):
    from transformers import AutoModelForSequenceClassification

    seen = _Records()  # on transformers' own logger: it does not propagate to pytest's caplog
    logging.getLogger("transformers.modeling_utils").addHandler(seen)
    try:
        AutoModelForSequenceClassification.from_pretrained(str(encoder), num_labels=3)
        assert any("LOAD REPORT" in m for m in seen.messages)  # what a plain load prints
        seen.messages.clear()
        model = new_classifier(encoder, ["business", "sport", "tech"])
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(seen)
    assert model.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert model.classifier.out_features == 3
    assert not any("LOAD REPORT" in m for m in seen.messages)
    assert not logging.getLogger("transformers.modeling_utils").filters  # the filter is removed again
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                               load_file(encoder / "model.safetensors")["embeddings.word_embeddings.weight"])


def test_an_encoder_weight_that_did_not_load_is_an_error(encoder):
    weights = load_file(encoder / "model.safetensors")
    del weights["encoder.layer.0.output.dense.weight"]
    save_file(weights, encoder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"encoder weights did not load: bert\.encoder\.layer\.0\.output\.dense\.weight"):
        new_classifier(encoder, ["a", "b"])
