"""Structured sparsification: masks remove the requested share, densify keeps the outputs."""

from __future__ import annotations

import pytest
import torch

from raykd.students.sparsify import (
    Masker,
    MaskError,
    Masks,
    check_masks,
    densify,
    load_dense,
    masks_for_sparsity,
    prunable_params,
    save_dense,
    structure,
    taylor_importance,
    unit_params,
)


def tiny_bert(num_labels: int = 3, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def _batch(seed: int = 0, b: int = 4, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (b, t), generator=g)
    am = torch.ones_like(ids)
    am[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": torch.randint(0, 3, (b,), generator=g)}


def _ce(model, batch):
    return model(**batch).loss


@pytest.fixture(scope="module")
def model_and_scores():
    model = tiny_bert()
    scores = taylor_importance(model, [_batch(i) for i in range(3)], _ce)
    return model, scores


def test_importance_shapes_and_no_side_effects(model_and_scores):
    model, scores = model_and_scores
    assert [len(s) for s in scores.heads] == [4, 4] and [len(s) for s in scores.neurons] == [48, 48]
    assert all((s >= 0).all() for s in scores.heads + scores.neurons)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_masks_remove_the_requested_share(model_and_scores, sparsity):
    model, scores = model_and_scores
    per_head, per_neuron = unit_params(model)
    masks = masks_for_sparsity(scores, sparsity, per_head, per_neuron)
    total = prunable_params(model)
    budget = round(sparsity * total)
    removed = masks.removed_params(per_head, per_neuron)
    assert removed <= budget
    assert budget - removed < per_neuron  # short by less than one neuron
    assert total == per_head * 8 + per_neuron * 96


def test_least_important_units_go_first(model_and_scores):
    model, scores = model_and_scores
    per_head, per_neuron = unit_params(model)
    masks = masks_for_sparsity(scores, 0.2, per_head, per_neuron)
    dens_removed = [float(s) / per_neuron for m, ss in zip(masks.neurons, scores.neurons) for s, k in zip(ss, m) if not k]
    dens_kept = [float(s) / per_neuron for m, ss in zip(masks.neurons, scores.neurons) for s, k in zip(ss, m) if k]
    assert max(dens_removed) <= min(dens_kept) + 1e-12


@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.95])
def test_densified_equals_masked(model_and_scores, sparsity, tmp_path):
    model, scores = model_and_scores
    masks = masks_for_sparsity(scores, sparsity, *unit_params(model))
    batch = {k: v for k, v in _batch(7).items() if k != "labels"}
    masker = Masker(model)
    with torch.no_grad(), masker.use(masks):
        masked = model(**batch).logits
    masker.remove()
    dense = densify(model, masks)
    with torch.no_grad():
        out = dense(**batch).logits
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-5)
    assert prunable_params(dense) == prunable_params(model) - masks.removed_params(*unit_params(model))
    assert sum(p.numel() for p in dense.parameters()) < sum(p.numel() for p in model.parameters())
    # saved and reloaded: same structure, same outputs
    again = load_dense(save_dense(dense, tmp_path / "dense"))
    assert structure(again) == structure(dense)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, out, atol=1e-6, rtol=1e-6)


def test_layer_with_every_head_removed():
    model = tiny_bert()
    masks = Masks.full(model)
    masks.heads[0][:] = False
    masks.neurons[1][:] = False
    batch = {k: v for k, v in _batch(3).items() if k != "labels"}
    masker = Masker(model)
    with torch.no_grad(), masker.use(masks):
        masked = model(**batch).logits
    masker.remove()
    dense = densify(model, masks)
    assert structure(dense) == {"heads": [0, 4], "neurons": [48, 0]}
    with torch.no_grad():
        torch.testing.assert_close(dense(**batch).logits, masked, atol=1e-5, rtol=1e-5)


def test_masks_that_do_not_match_the_model_are_refused():
    model = tiny_bert()
    other = Masks.full(tiny_bert(layers=3))
    with pytest.raises(MaskError, match="masks do not match the model"):
        check_masks(model, other)
    with pytest.raises(MaskError):
        densify(model, other)
    with pytest.raises(MaskError):
        with Masker(model).use(other):
            pass


def test_sparsity_out_of_range(model_and_scores):
    model, scores = model_and_scores
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\]"):
        masks_for_sparsity(scores, 1.5, *unit_params(model))
