"""Placement of served teachers and the environment of clusters raykd starts (no Ray started)."""

import os
import sys

import pytest
from pydantic import ValidationError

from raykd.cluster import node_env, ray_start_command
from raykd.config import TrainConfig
from raykd.teacher.apps import deployment_options
from raykd.teacher.service import ServedTeacher, check_placeable, placement_options


def test_a_node_raykd_starts_runs_this_interpreter_and_finds_it_first_on_path():
    env = node_env({"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env["PATH"].endswith("/usr/bin:/bin") and env["HOME"] == "/root"
    assert ray_start_command("--head")[:4] == [sys.executable, "-m", "ray.scripts.scripts", "start"]


def test_custom_resources_reach_the_replica_and_its_own_bundle():
    plain = ServedTeacher(teacher={"name": "t", "num_cpus": 0.5}, resources={"teacher_node": 1})
    assert placement_options(plain) == {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"teacher_node": 1.0}}}
    parallel = ServedTeacher(teacher={"name": "t", "engine": "vllm", "tensor_parallel_size": 2}, resources={"gpu_box": 1})
    assert placement_options(parallel)["placement_group_bundles"] == [{"CPU": 1.0, "gpu_box": 1.0}, {"GPU": 1}, {"GPU": 1}]
    assert placement_options(ServedTeacher(teacher={"name": "t"})) == {}


def test_a_teacher_no_single_node_can_hold_is_refused_naming_the_resources():
    served = ServedTeacher(teacher={"name": "t", "num_cpus": 2}, resources={"teacher_node": 1})
    check_placeable(served, [{"CPU": 1, "teacher_node": 1}, {"CPU": 4, "teacher_node": 1}])
    with pytest.raises(ValueError, match=r"teacher 't'.*no node has all of it.*node 0: CPU=1, teacher_node=1"):
        check_placeable(served, [{"CPU": 1, "teacher_node": 1}, {"CPU": 4}])


def test_served_autoscaling_is_typed_and_set_once():
    served = ServedTeacher(teacher={"name": "t", "num_replicas": 3}, autoscaling={"max_replicas": 2})
    assert "num_replicas" not in deployment_options(served.teacher_config)
    assert deployment_options(served.teacher_config)["autoscaling_config"]["max_replicas"] == 2
    with pytest.raises(ValidationError, match="min_replicas=3 exceeds"):
        ServedTeacher(teacher={"name": "t"}, autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="set twice"):
        ServedTeacher(teacher={"name": "t", "autoscaling": {"max_replicas": 2}}, autoscaling={"max_replicas": 2})


@pytest.mark.parametrize("resources, match", [({"CPU": 1}, "not a custom resource"), ({"train_node": 0}, "must be > 0")])
def test_bad_custom_resources_fail_at_load(resources, match):
    with pytest.raises(ValidationError, match=match):
        TrainConfig(resources_per_worker=resources)
    with pytest.raises(ValidationError, match=match):
        ServedTeacher(teacher={"name": "t"}, resources=resources)
