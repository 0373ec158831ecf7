"""The teacher-feature cache's rows (raykd.soft_labels.feature_cache): encode, decode and the
Features a training batch gets back equal the compact form; layouts follow the terms."""

from __future__ import annotations

import pytest
import torch

from raykd.losses.features import LayerMap
from raykd.soft_labels.feature_cache import (
    FeatureKey,
    FeatureLayout,
    decode_features,
    encode_features,
    feature_layout,
    feature_source,
    features_from_batch,
    teacher_shapes,
)
from raykd.train.features import FeatureTeacher
from tests.unit.test_feature_training import _lm_batch, tiny_llama


def test_cached_rows_decode_to_the_teachers_features_at_real_tokens():
    teacher = tiny_llama()
    batch = _lm_batch()
    _, f = FeatureTeacher(teacher, None, attention=True)(batch)
    layout = FeatureLayout(hidden=(1, 3), attention=(3,), embeddings=True)
    lengths = batch.inputs["attention_mask"].sum(1).numpy()
    shapes = teacher_shapes(teacher, batch.inputs["input_ids"].shape[1])
    table = encode_features(f, layout, ["a", "b", "c", "d"], [0, 0, 1, 0], lengths, shapes)
    assert table.column_names == ["doc_id", "block_index", "attention_mask", "embeddings", "hidden.1", "hidden.3",
                                  "query.3", "key.3", "value.3"]
    decoded = {f"f.{k}": torch.as_tensor(v) for k, v in decode_features(table).items()}
    got = features_from_batch(decoded, layout, shapes)
    m = batch.inputs["attention_mask"].bool()
    assert torch.equal(got.token_mask, m) and got.causal and got.hidden[0] is None and got.queries[1] is None
    for a, b in ((got.embeddings, f.embeddings), (got.hidden[1], f.hidden[1]), (got.hidden[3], f.hidden[3])):
        torch.testing.assert_close(a[m], b[m], rtol=2e-3, atol=2e-3)
        assert a[~m].abs().sum() == 0  # padding is not stored
    for a, b in ((got.queries[3], f.queries[3]), (got.keys[3], f.keys[3]), (got.values[3], f.values[3])):
        torch.testing.assert_close(a.transpose(1, 2)[m], b.transpose(1, 2)[m], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.probs(3)[m[:, None, :].expand(-1, 4, -1)],
                               f.probs(3)[m[:, None, :].expand(-1, 4, -1)], rtol=1e-2, atol=1e-3)


def test_layout_keeps_only_the_blocks_each_term_reads_and_the_key_changes_with_it():
    lm = LayerMap.from_keep_layers([0, 6, 12, 18, 24, 29], 30)
    assert feature_layout({"distilbert_cos": {}}, lm) == FeatureLayout(hidden=(29,))
    assert feature_layout({"pkd": {}}, lm) == FeatureLayout(hidden=(0, 6, 12, 18, 24, 29))
    assert feature_layout({"minilmv2": {"teacher_layer": 20}}, lm) == FeatureLayout(attention=(20,))
    tiny = feature_layout({"tinybert": {}}, lm)
    assert tiny.embeddings and tiny.attention == tiny.hidden == (0, 6, 12, 18, 24, 29)
    with pytest.raises(ValueError, match="alp_kd.*train.feature_teacher=online"):
        feature_layout({"alp_kd": {}}, lm)
    a = FeatureKey("w", "t", {"hidden": [29]}, rows="labels1")
    assert a.digest() != FeatureKey("w", "t", {"hidden": [24]}, rows="labels1").digest()
    assert a.digest() != FeatureKey("w", "t", {"hidden": [29]}, rows="labels2").digest()


def test_auto_source_follows_the_measurement():
    assert feature_source(["pkd"], "auto") == "cached"
    assert feature_source(["tinybert", "minilmv2"], "auto") == "cached"  # the steady-load rerun: 1.8-1.9x
    assert feature_source(["ckd"], "auto") == "online"  # not measured
    assert feature_source(["pkd", "ckd"], "auto") == "online"  # one online term: the teacher runs anyway
    assert feature_source(["tinybert"], "online") == "online"


def test_minilmv2_takes_its_integer_settings_as_config_floats():
    """``train.loss_params`` holds floats: relation_heads 4.0 gives the loss of 4."""
    from raykd.losses.relations import minilmv2
    from tests.unit.test_feature_training import tiny_llama as student_model

    batch = _lm_batch()
    _, t = FeatureTeacher(tiny_llama(), None, attention=True)(batch)
    _, s = FeatureTeacher(student_model(seed=1), None, attention=True)(batch)
    lm = LayerMap(((0, 0), (3, 3)), 4, 4)
    torch.testing.assert_close(minilmv2(s, t, layer_map=lm, projections={}, relation_heads=4.0, teacher_layer=3.0),
                               minilmv2(s, t, layer_map=lm, projections={}, relation_heads=4, teacher_layer=3))
