"""Staged starts (student.init_from): a run starts from another run's trained student, as GKD's
staged starts do, and keeps the stride that student was first layer-dropped with."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from raykd.config import DistillConfig, StudentConfig
from raykd.soft_labels.plan import Plan
from raykd.students import build_student
from raykd.train.export import export_student
from tests.conftest import tiny_distill_config


def test_a_staged_start_loads_the_trained_student_and_keeps_its_layer_stride(tiny_model, corpus_jsonl, tmp_path):
    first = build_student(StudentConfig(keep_layers=[0, 3]), tiny_model, tmp_path / "first_init")
    assert json.loads((first / "layer_origin.json").read_text()) == {"keep_layers": [0, 3], "teacher_layers": 4}
    trained = export_student(first, first, tmp_path / "run1" / "students" / "distilbert_kd")  # as a run exports it
    weights = load_file(trained / "model.safetensors")
    weights["model.norm.weight"] += 1.0  # "trained": differs from a fresh layer drop
    from safetensors.torch import save_file

    save_file(weights, trained / "model.safetensors", metadata={"format": "pt"})

    second = build_student(StudentConfig(init_from=str(trained)), tiny_model, tmp_path / "second_init")
    got = load_file(second / "model.safetensors")
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)
    assert (second / "layer_origin.json").exists()  # a third stage keeps the stride too

    data = tiny_distill_config(tiny_model, corpus_jsonl, tmp_path / "cache").model_dump(mode="json")
    data["method"] = "patient_kd"
    data["train"]["students"] = {"rail_from_distilbert": {"forward_kl": 0.5, "pkd": 1.0}}
    data["student"] = {"init_from": str(trained)}
    assert Plan(DistillConfig.model_validate(data)).layer_map.pairs == ((0, 0), (1, 3))


def test_a_staged_start_refuses_settings_it_would_ignore(tmp_path):
    with pytest.raises(ValidationError, match=r"leave \['keep_layers'\] unset"):
        StudentConfig(init_from=str(tmp_path), keep_layers=[0, 1])
