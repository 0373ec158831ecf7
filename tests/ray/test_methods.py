"""Method configs end to end on the tiny teacher: each runs through ``raykd distill``'s entry
point (``main_distill``) for a couple of steps and produces a student that was really trained.

Every method config is also checked without Ray in tests/unit/test_methods.py; here a few
representative ones run on one shared Ray cluster and one shared soft-label cache.
"""

from __future__ import annotations

import pytest

from raykd.cli import main_distill
from raykd.config import DistillConfig, load_config
from raykd.methods import get_method
from tests.conftest import tiny_distill_config

pytestmark = pytest.mark.ray


def method_config(method: str, tiny_model, corpus, cache_dir, **extra) -> DistillConfig:
    """The method's shipped config with the data, teacher and budget of the tiny fixture."""
    shipped = load_config(DistillConfig, get_method(method).config_path)
    tiny = tiny_distill_config(tiny_model, corpus, cache_dir, max_steps=2, checkpoint_every=2, log_every=1)
    tree = tiny.model_dump()
    tree.update(method=method, run_name=method)
    tree["train"].update(students=shipped.train.students, phases=[p.model_dump() for p in shipped.train.phases],
                         loss_params=shipped.train.loss_params)
    for section, fields in extra.items():
        tree[section] = {**tree[section], **fields} if isinstance(tree.get(section), dict) else fields
    return DistillConfig.model_validate(tree)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("methods_cache")


@pytest.mark.parametrize("method", ["annealing_kd", "pd"])
def test_scheduled_method_runs(method, ray_start, tiny_model, corpus_jsonl, shared_cache, tmp_path):
    cfg = method_config(method, tiny_model, corpus_jsonl, shared_cache, train={"max_steps": 4, "checkpoint_every": 4})
    report = main_distill(cfg, tmp_path)
    (student,) = report["students"]
    assert report["method"] == method and report[student]["steps"] == 4
    assert report[student]["ppl"] < report["student_init"]["ppl"]
    assert (tmp_path / "students" / student / "tokenizer.json").exists()  # servable as a teacher
