"""GQA-aware structured sparsity of a tiny Llama built from a config (no Ray, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from raykd.students.gqa_sparsify import (
    GQAMasker,
    UnrealisableSparsityError,
    check_sparsity_grid,
    densify,
    full_masks,
    gqa_masks_for_sparsity,
    nearest_realisable,
    prunable_params,
    structure,
    taylor_importance,
    unit_params,
)
from raykd.students.sparsify import MaskError, Masks


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _ids(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (3, 12), generator=g)


def _lm_loss(model, ids):
    out = model(input_ids=ids, labels=ids)
    return out.loss


def test_structure_counts_groups_not_query_heads():
    model = tiny_llama()
    # 6 query heads over 2 KV heads (as SmolLM2's 9 over 3): 2 groups of 3 queries per layer, head size 8
    assert structure(model) == {"heads": [2, 2], "neurons": [80, 80]}
    per_group, per_neuron = unit_params(model)
    att = model.model.layers[0].self_attn
    attn_params = sum(p.numel() for lin in (att.q_proj, att.k_proj, att.v_proj, att.o_proj) for p in lin.parameters())
    mlp_params = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    assert 2 * per_group == attn_params and 80 * per_neuron == mlp_params


def test_masked_model_equals_densified_model():
    model, ids = tiny_llama(), _ids()
    # layer 0 loses group 0 (query heads 0-2 and KV head 0), layer 1 loses every group; some neurons go
    neurons = [torch.rand(80, generator=torch.Generator().manual_seed(i)) > 0.4 for i in range(2)]
    masks = Masks([torch.tensor([False, True]), torch.tensor([False, False])], neurons)
    masker = GQAMasker(model)
    with torch.no_grad(), masker.use(masks):
        masked = model(input_ids=ids).logits
    masker.remove()
    dense = densify(model, masks)
    with torch.no_grad():
        got = dense(input_ids=ids).logits
        full = model(input_ids=ids).logits
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, masked)  # the masks did change the model
    assert structure(dense) == {"heads": [1, 0], "neurons": [int(n.sum()) for n in neurons]}
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in dense.parameters())
    assert removed == masks.removed_params(*unit_params(model))
    assert dense.model.layers[0].self_attn.num_key_value_groups == 3  # still 3 queries per KV head


def test_densify_at_a_taylor_sparsity_matches_masks_and_size():
    model, ids = tiny_llama(), _ids()
    imp = taylor_importance(model, [ids, _ids(2)], _lm_loss)
    masks = gqa_masks_for_sparsity(imp, 0.5, model)
    masker = GQAMasker(model)
    with torch.no_grad(), masker.use(masks):
        masked = model(input_ids=ids).logits
    masker.remove()
    dense = densify(model, masks)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, masked, atol=1e-5, rtol=1e-5)
    share = 1 - prunable_params(dense) / prunable_params(model)
    assert 0.5 - unit_params(model)[1] / prunable_params(model) <= share <= 0.5


def test_taylor_importance_ranks_a_dead_group_last():
    model, ids = tiny_llama(), _ids()
    d = 8
    with torch.no_grad():  # group 1 of layer 0 writes nothing: its o_proj columns (query heads 3-5) are zero
        model.model.layers[0].self_attn.o_proj.weight[:, 3 * d:6 * d] = 0
    imp = taylor_importance(model, [ids], _lm_loss)
    assert imp.heads[0][1] == 0 and imp.heads[0][0] > 0 and float(imp.neurons[1].sum()) > 0
    assert all(p.grad is None for p in model.parameters())
    masks = gqa_masks_for_sparsity(imp, unit_params(model)[0] / prunable_params(model), model, units=["heads"])
    assert [m.tolist() for m in masks.heads] == [[True, False], [True, True]]


def test_heads_only_grid_must_be_a_multiple_of_one_group():
    model = tiny_llama()
    share = unit_params(model)[0] / prunable_params(model)  # one group of 4: 3072 / 35328 = 0.0870
    assert nearest_realisable(0.1, model, ["heads"]) == pytest.approx(share)
    check_sparsity_grid([share, 2 * share], model, ["heads"])
    with pytest.raises(UnrealisableSparsityError, match=rf"nearest valid sparsity is {share:.4f}"):
        check_sparsity_grid([0.1], model, ["heads"])
    with pytest.raises(UnrealisableSparsityError, match="nearest valid sparsity is 0.3478"):
        check_sparsity_grid([share, 0.5], model, ["heads"])  # all 4 groups are only 0.35 of the prunable params
    check_sparsity_grid([0.1, 0.5, 0.9], model)  # with neurons every point is within one neuron
    masks = gqa_masks_for_sparsity(taylor_importance(model, [_ids()], _lm_loss), 2 * share, model, units=["heads"])
    assert all(bool(m.all()) for m in masks.neurons) and sum(int((~m).sum()) for m in masks.heads) == 2


def test_masks_of_another_shape_are_refused():
    model = tiny_llama()
    bad = full_masks(model)
    bad.heads[0] = torch.ones(6, dtype=torch.bool)  # one per query head is not one per group
    with pytest.raises(MaskError, match="GQA groups"):
        densify(model, bad)
    with pytest.raises(ValueError, match="choose from"):
        nearest_realisable(0.5, model, ["layers"])
