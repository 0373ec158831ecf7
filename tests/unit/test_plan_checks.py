"""Checks the plan makes from the config and the model configs alone, before any labeling: no
Ray, no weights loaded, no cache written."""

from __future__ import annotations

import re

import pytest
import yaml

from raykd.cli import cli
from raykd.config import DistillConfig
from raykd.soft_labels.plan import Plan
from raykd.students.build import check_keep_layers
from tests.conftest import tiny_distill_config


def _with_student(cfg, **student):
    return cfg.model_copy(update={"student": cfg.student.model_copy(update=student)})


@pytest.mark.parametrize("keep, bad", [([0, 4], "[4]"), ([0, 6, 12, 18, 24, 29], "[6, 12, 18, 24, 29]"), ([-5, 0], "[-5]")])
def test_keep_layers_out_of_range_for_the_teacher_are_refused_before_labeling(tiny_model, corpus_jsonl, tmp_path, keep, bad):
    cfg = _with_student(tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache"), keep_layers=keep)
    with pytest.raises(ValueError, match=rf"student.keep_layers=.*{re.escape(bad)} out of range for the teacher, which has 4 layers"):
        Plan(cfg)
    assert not (tmp_path / "cache").exists()  # nothing was labeled or written


def test_keep_layers_naming_one_layer_twice_are_refused(tiny_model, corpus_jsonl, tmp_path):
    cfg = _with_student(tiny_distill_config(tiny_model, corpus_jsonl, tmp_path), keep_layers=[0, -4])  # -4 is layer 0
    with pytest.raises(ValueError, match="names a layer twice"):
        Plan(cfg)


def test_chain_assistants_are_checked_against_the_teacher(tiny_model, corpus_jsonl, tmp_path):
    data = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path).model_dump(mode="json")
    data.update(method="takd", chain={"assistants": [{"keep_layers": [0, 1, 7]}]})
    cfg = DistillConfig.model_validate(data)
    with pytest.raises(ValueError, match=r"chain.assistants\[0\].keep_layers=\[0, 1, 7\]: \[7\] out of range"):
        Plan(cfg)


def test_keep_layers_in_range_pass(tiny_model, corpus_jsonl, tmp_path):
    assert Plan(_with_student(tiny_distill_config(tiny_model, corpus_jsonl, tmp_path), keep_layers=[0, -1])).keys
    assert check_keep_layers([0, -1, 2], 4) == [0, 3, 2]


def test_the_command_reports_a_plan_error_in_one_line(tiny_model, corpus_jsonl, tmp_path, capsys):
    cfg = _with_student(tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache"), keep_layers=[0, 9])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli(["distill", "--config", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: student.keep_layers=[0, 9]: [9] out of range") and "Traceback" not in out + err
    assert len(err.splitlines()) == 1 and not (tmp_path / "cache").exists()


def _with_features(cfg, layer_map=None, **student):
    data = cfg.model_dump(mode="json")
    data["method"] = "patient_kd"
    data["train"].update(students={"s": {"forward_kl": 0.5, "ce": 0.5, "pkd": 1.0}}, layer_map=layer_map)
    data["student"].update(student)
    return DistillConfig.model_validate(data)


def test_the_feature_layer_map_defaults_to_the_students_stride_and_is_checked_against_both_models(
        tiny_model, corpus_jsonl, tmp_path):
    base = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache")
    assert Plan(_with_features(base, keep_layers=[0, 3])).layer_map.pairs == ((0, 0), (1, 3))
    assert Plan(_with_features(base, layer_map=[[1, 2]], keep_layers=[0, 3])).layer_map.pairs == ((1, 2),)
    assert Plan(base).layer_map is None  # no feature term, no map
    with pytest.raises(ValueError, match=r"train.layer_map of \['pkd'\]: layer pair \(1, 4\) is out of range"):
        Plan(_with_features(base, layer_map=[[0, 0], [1, 4]], keep_layers=[0, 3]))
    with pytest.raises(ValueError, match="pairs must increase in both layers"):
        Plan(_with_features(base, layer_map=[[0, 2], [1, 1]], keep_layers=[0, 3]))
    # a student layer-dropped from another model has no stride over the teacher's layers
    with pytest.raises(ValueError, match="only a student layer-dropped from the teacher itself has a default stride"):
        Plan(_with_features(base, keep_layers=[0, 3], model=str(tiny_model)))
    assert not (tmp_path / "cache").exists()
