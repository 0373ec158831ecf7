"""Feature methods on the LM path (raykd.train.loop, raykd.train.features.FeatureTerms): the
teacher's features from the teacher run in the Ray Train loop, or from the keyed feature cache;
the soft labels from the soft-label cache. Ray Train's local mode (the tiny fixture's default),
which tests/ray/test_train.py shows trains as one worker."""

from __future__ import annotations

import json

import pytest
import torch

from raykd.soft_labels.cache import shard_paths
from raykd.train.run import FeaturePart, StudentRun
from raykd.train.trainer import train_student

pytestmark = pytest.mark.ray

FEATURE_METHODS = ["tinybert_kd", "sid"]
"""Run end to end here (tinybert_kd: hidden states, embeddings and attention, the widest capture; sid:
the stage schedule, with DIITO's intervened forwards in the same run)."""
# Every feature method's shipped objective also has a short run of its own without Ray (tests/unit/test_method_runs.py).


def test_feature_method_trains_through_ray_train_and_its_feature_loss_decreases(tiny_labeled, tmp_path):
    """TinyBERT's terms (embeddings, hidden states, attention scores) through ``raykd distill``:
    the teacher runs in the loop for its features; a student of other weights (another tiny model,
    mapped explicitly) moves towards it."""
    from raykd.cli import main_distill
    from tests.conftest import build_tiny_model
    from tests.ray.test_methods import method_config

    cfg, _, _, _ = tiny_labeled  # its cache (labels.cache_dir) is a hit: the teacher is not served again
    other = build_tiny_model(tmp_path / "other", seed=1, num_layers=2)
    tiny = method_config("tinybert_kd", cfg.teacher.model, cfg.data.path, cfg.labels.cache_dir,
                         student={"init": "pretrained", "model": str(other)},
                         train={"max_steps": 6, "checkpoint_every": 6, "lr": 1e-2, "layer_map": [[0, 1], [1, 3]],
                                "feature_teacher": "online",
                                "students": {"tinybert_kd": {"forward_kl": 0.1, "tinybert": 1.0}}})
    report = main_distill(tiny, tmp_path / "run")
    assert report["cache"]["hit"] is True and report["tinybert_kd"]["steps"] == 6
    history = json.loads(next((tmp_path / "run" / "ray_train").glob("tinybert_kd/checkpoint_*/history.json")).read_text())
    assert all(row["tinybert"] >= 0 for row in history)
    assert history[-1]["tinybert"] < 0.7 * history[0]["tinybert"]  # the feature term is trained


def _identity_teacher(model_dir, folder, dropped):
    """The teacher with the blocks a layer-dropped student leaves out made identities (output
    projections of attention and MLP zeroed): the kept blocks then see the same inputs in both."""
    from raykd.models import load_causal_lm, load_tokenizer
    from raykd.students.build import transformer_layers

    model = load_causal_lm(model_dir)
    with torch.no_grad():
        for i in dropped:
            layer = transformer_layers(model)[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    load_tokenizer(model_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("term", ["pkd", "tinybert"])
def test_student_copied_from_the_mapped_layers_has_zero_feature_loss_at_step_0(tiny_labeled, tmp_path, term):
    """The first step's feature term (computed before the update) is 0 for the default map of the
    layer-dropped student and not for the naive (i, i) map: a wrong layer map shows."""
    from raykd.config import StudentConfig
    from raykd.students import build_student

    cfg, plan, caches, _ = tiny_labeled
    teacher = _identity_teacher(plan.teacher_path, tmp_path / "teacher", dropped=[1, 2])
    student = build_student(StudentConfig(keep_layers=[0, 3]), teacher, tmp_path / "student")
    files = shard_paths(*caches["train"])
    train_cfg = cfg.train.model_copy(update={"shuffle": False, "num_workers": 0, "max_steps": 1, "checkpoint_every": 1})
    weights = {"forward_kl": 1.0, term: 1.0}
    params = {"pkd": {"first_token_only": 0.0}} if term == "pkd" else {}
    first = {}
    for name, pairs in (("stride", [(0, 0), (1, 3)]), ("naive", [(0, 0), (1, 1)])):
        result = train_student(StudentRun(name=f"{term}_{name}", student_path=student, shard_files=files, weights=weights,
                                          temperature=1.0, train=train_cfg, storage_path=tmp_path / "runs", params=params,
                                          features=FeaturePart(layer_map=pairs, teacher=teacher)))
        first[name] = result.history[0][term]
    assert first["stride"] == pytest.approx(0.0, abs=1e-6)
    assert first["naive"] > 1e-4  # 100x the tolerance of the zero above


def test_cached_teacher_features_train_as_online_ones_and_a_second_run_asks_the_teacher_nothing(tiny_labeled, tmp_path):
    """``train.feature_teacher=cached``: the teacher fills the keyed feature cache once (through the
    soft labels' commit and ledger code); a rerun hits it; the first step's feature term equals
    the online teacher's up to the cache's float16."""
    from raykd.cli import main_distill
    from tests.ray.test_methods import method_config

    cfg, _, _, _ = tiny_labeled

    def run(source: str, out):
        tiny = method_config("patient_kd", cfg.teacher.model, cfg.data.path, cfg.labels.cache_dir,
                             train={"max_steps": 2, "checkpoint_every": 2, "feature_teacher": source, "shuffle": False})
        report = main_distill(tiny, out)
        history = json.loads(next((out / "ray_train").glob("patient_kd/checkpoint_*/history.json")).read_text())
        return report["patient_kd"], history

    first, cached = run("cached", tmp_path / "a")
    assert first["feature_cache"]["hit"] is False and first["feature_cache"]["teacher_calls"] > 0
    again, _ = run("cached", tmp_path / "b")
    assert again["feature_cache"]["hit"] is True and again["feature_cache"]["teacher_calls"] == 0
    assert again["feature_cache"]["key"] == first["feature_cache"]["key"]
    assert first["feature_cache"]["bytes_per_token"] > 0
    online, online_history = run("online", tmp_path / "c")
    assert "feature_cache" not in online
    assert cached[0]["pkd"] == pytest.approx(online_history[0]["pkd"], rel=2e-2, abs=1e-4)
    assert cached[0]["pkd"] > 0


def test_sid_stages_and_diito_interventions_run_in_the_ray_train_loop(tiny_labeled, tmp_path):
    """SID's stages and DIITO's intervened forwards through ``raykd distill`` (one run, both terms,
    the method ``sid`` with a ``diito`` term added): the first step trains ``sid`` with KD gated
    off, the last (every layer unlocked: 3 stages over 4 steps for 2 pairs) KD with ``sid`` off;
    DIITO's term is there at every step. The stage itself rides in the train state
    (tests/unit/test_layer_methods.py checks its round trip)."""
    from raykd.cli import main_distill
    from tests.conftest import build_tiny_model
    from tests.ray.test_methods import method_config

    cfg, _, _, _ = tiny_labeled
    other = build_tiny_model(tmp_path / "other", seed=1, num_layers=2)
    tiny = method_config("sid", cfg.teacher.model, cfg.data.path, cfg.labels.cache_dir,
                         student={"init": "pretrained", "model": str(other)},
                         train={"max_steps": 4, "checkpoint_every": 4, "layer_map": [[0, 1], [1, 3]],
                                "students": {"mix": {"forward_kl": 0.5, "sid": 1.0, "diito": 0.5}},
                                "loss_params": {"sid": {"first_token_only": 0.0}}})
    report = main_distill(tiny, tmp_path / "run")
    assert report["mix"]["steps"] == 4
    history = json.loads(next((tmp_path / "run" / "ray_train").glob("mix/checkpoint_*/history.json")).read_text())
    first, last = history[0], history[-1]
    assert first["loss"] == pytest.approx(first["sid"] + 0.5 * first["diito"], rel=1e-4)  # stage 1: KD off
    assert last["loss"] == pytest.approx(0.5 * last["forward_kl"] + 0.5 * last["diito"], rel=1e-4)  # last: sid off
    assert all(row["diito"] > 0 and row["sid_cos"] >= 0 for row in history)
