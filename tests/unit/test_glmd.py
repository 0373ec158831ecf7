"""GLMD's two stages (no Ray): the stage configs, and the online teacher's dense targets."""

from __future__ import annotations

import pytest
import torch

from raykd.config import ConfigError, DistillConfig
from raykd.methods import get_method, load
from raykd.recipes.lm.glmd import agnostic_stage_config, task_stage_config
from raykd.train.loop import online_teacher
from raykd.train.step import StudentBatch


def _glmd(*overrides: str) -> DistillConfig:
    return load(DistillConfig, get_method("glmd").config_path, list(overrides))


def test_the_shipped_glmd_runs_a_temperature_15_stage_with_the_teacher_online_then_the_task_stage():
    cfg = _glmd()
    first = agnostic_stage_config(cfg)
    assert first.agnostic_stage is None and first.train.online_teacher
    assert first.train.max_steps == cfg.agnostic_stage.steps == 40
    assert [(p.until, p.temperature) for p in first.train.phases] == [(1.0, 15.0)]
    assert first.student == cfg.student and first.labels == cfg.labels  # same student start, same cache key
    task = task_stage_config(cfg, "/runs/glmd/agnostic/students/glmd")
    assert task.student.init == "pretrained" and task.student.model == "/runs/glmd/agnostic/students/glmd"
    assert not task.train.online_teacher and not task.train.phases and task.train.max_steps == cfg.train.max_steps
    assert task.labels.temperature == 1.0
    cached = agnostic_stage_config(_glmd("agnostic_stage.teacher=cache"))
    assert not cached.train.online_teacher  # re-tempered from the cache instead


@pytest.mark.parametrize("overrides, message", [
    (["agnostic_stage.steps=0"], "greater than or equal to 1"),
    (["agnostic_stage.teacher=dense"], "'online' or 'cache'"),
    (["train.online_teacher=true", "student.vocab_size=64", "method=glmd_vocab", "agnostic_stage=null"],
     "without student.vocab_size"),
    (["method=kd", "train.students={s: {forward_kl: 1.0}}"], "does not use \\['agnostic_stage'\\]"),
])
def test_bad_glmd_configs_are_refused_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _glmd(*overrides)


def test_the_online_teacher_gives_the_teachers_dense_logits(tiny_model):
    from raykd.models import load_causal_lm

    ids = torch.randint(3, 300, (2, 12))
    batch = StudentBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids),
                         torch.ones_like(ids, dtype=torch.bool))
    targets = online_teacher(str(tiny_model), torch.device("cpu"))(batch)
    assert targets.form == "dense"
    with torch.no_grad():
        want = load_causal_lm(tiny_model)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(targets.logits, want)
    assert not targets.logits.requires_grad
