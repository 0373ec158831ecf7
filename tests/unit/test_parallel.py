"""Checkpoint state that moves between strategies and worker counts (no Ray, no process group)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from raykd.train.parallel import (
    decoder_layers,
    export_sharded,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    load_sharded,
    save_sharded,
)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    return model, optim


def test_optimizer_state_by_name_restores_adam_exactly_into_a_fresh_optimizer():
    model, optim = _trained()
    saved = full_optimizer_state(model, optim)
    assert saved["by_name"] and "model.embed_tokens.weight" in saved["state"]
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    load_optimizer_state(model, fresh, saved)
    assert fresh.param_groups[0]["lr"] == 1e-3
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fresh.state[p][key], optim.state[p][key])


def test_older_checkpoints_with_a_plain_optimizer_state_still_load():
    model, optim = _trained()
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    load_optimizer_state(model, fresh, optim.state_dict())
    p = next(model.parameters())
    torch.testing.assert_close(fresh.state[p]["exp_avg"], optim.state[p]["exp_avg"])


def test_full_model_state_keeps_a_tied_weight_once():
    model, _ = _trained()
    state = full_model_state(model)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state
    assert set(state) | {"lm_head.weight"} == set(model.state_dict())


def test_fsdp_needs_decoder_layers():
    assert len(decoder_layers(_trained()[0])) == 2
    with pytest.raises(ValueError, match="model.model.layers"):
        decoder_layers(nn.Linear(2, 2))


def test_a_sharded_checkpoint_restores_weights_and_adam_and_exports_a_hugging_face_folder(tmp_path):
    """DCP files from :func:`save_sharded` load into a fresh model and optimizer exactly, and
    :func:`export_sharded` (one process, no process group) writes the same weights as a folder
    ``from_pretrained`` reads; the architecture comes from the initial student."""
    init = tmp_path / "init"
    _trained(seed=1)[0].save_pretrained(init)  # another model of the same shape: the run's initial student
    model, optim = _trained()
    save_sharded(model, optim, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / ".metadata").exists()
    fresh = LlamaForCausalLM.from_pretrained(init)
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    load_sharded(fresh, fresh_optim, tmp_path / "ckpt")
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
    named = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fresh_optim.state[named[name]][key], optim.state[p][key])
    assert fresh_optim.param_groups[0]["lr"] == 1e-3
    out = export_sharded(tmp_path / "ckpt", init, tmp_path / "hf")
    exported = LlamaForCausalLM.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), exported.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
