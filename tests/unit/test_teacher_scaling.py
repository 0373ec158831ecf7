"""Autoscaled and tensor/pipeline-parallel teachers: what reaches Serve and vLLM (no Ray, no vLLM
engine running, no GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from raykd.config import ConfigError, DistillConfig, TeacherConfig, load_config
from raykd.teacher.apps import check_cluster_resources, deployment_options, engine_kwargs
from raykd.teacher.engines import check_engine_request
from raykd.teacher.engines.vllm import _flat_rows, scoring_params, vllm_engine_args

# --- autoscaling -----------------------------------------------------------------------------


def test_autoscaling_reaches_serve_as_given_and_replaces_num_replicas():
    auto = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3.0, "initial_replicas": 2,
            "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
    options = deployment_options(TeacherConfig(num_replicas=3, autoscaling=auto))
    assert options["autoscaling_config"] == auto
    assert "num_replicas" not in options


def test_autoscaling_unset_fields_are_left_to_serve():
    options = deployment_options(TeacherConfig(autoscaling={"min_replicas": 0, "max_replicas": 2}))
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 2.0}
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**options["autoscaling_config"])  # Serve accepts what we pass


def test_fixed_replicas_without_autoscaling():
    options = deployment_options(TeacherConfig(num_replicas=3, num_cpus=0.5, num_gpus=0.25))
    assert options == {"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25}}


@pytest.mark.parametrize(
    "auto, match",
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas=3 exceeds max_replicas=2"),
        ({"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}, r"initial_replicas=5 lies outside \[min_replicas, max_replicas\] = \[1, 2\]"),
        ({"min_replicas": 2, "max_replicas": 4, "initial_replicas": 1}, "initial_replicas=1 lies outside"),
        ({"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0}, "target_ongoing_requests"),
        ({"min_replicas": 1, "max_replicas": 2, "max_replica": 3}, "max_replica"),
    ],
)
def test_bad_autoscaling_is_a_config_error_at_load_time(tmp_path, auto, match):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"teacher": {"autoscaling": auto}}))
    with pytest.raises(ConfigError, match=match):
        load_config(DistillConfig, path)


def test_autoscaling_from_a_dotted_override():
    cfg = load_config(DistillConfig, None, ["teacher.autoscaling.min_replicas=1", "teacher.autoscaling.max_replicas=3"])
    assert deployment_options(cfg.teacher)["autoscaling_config"]["max_replicas"] == 3


# --- tensor / pipeline parallel --------------------------------------------------------------


def test_parallel_teacher_reserves_its_gpus_in_a_strict_pack_group():
    cfg = TeacherConfig(engine="vllm", tensor_parallel_size=2, pipeline_parallel_size=2, num_cpus=2)
    options = deployment_options(cfg)
    assert options["placement_group_bundles"] == [{"CPU": 2}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # the replica actor fits in the first bundle and takes no GPU itself (vLLM's workers do)
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert cfg.gpus_per_replica == 4


def test_single_gpu_teacher_uses_no_placement_group():
    options = deployment_options(TeacherConfig(engine="vllm", num_gpus=1))
    assert "placement_group_bundles" not in options and options["ray_actor_options"]["num_gpus"] == 1


def test_parallel_sizes_reach_the_vllm_engine():
    cfg = TeacherConfig(engine="vllm", tensor_parallel_size=4, pipeline_parallel_size=2)
    kw = engine_kwargs(cfg, "vllm")
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"]) == (4, 2)
    assert kw["asynchronous"] is True  # a served vLLM teacher runs AsyncLLM (continuous batching)
    assert "tensor_parallel_size" not in engine_kwargs(TeacherConfig(), "hf")  # HFEngine takes no such argument
    assert "asynchronous" not in engine_kwargs(TeacherConfig(), "hf")


def test_vllm_engine_args_carry_capture_and_parallel_settings():
    args = vllm_engine_args("/m", dtype="bfloat16", max_model_len=2048, max_k=64, platform="cuda",
                            tensor_parallel_size=2, pipeline_parallel_size=2)
    assert args["logprobs_mode"] == "raw_logprobs"
    assert args["max_logprobs"] == 64
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (2, 2)
    assert args["distributed_executor_backend"] == "ray"  # workers go into the replica's placement group
    assert args["gpu_memory_utilization"] == 0.85 and args["model"] == "/m"
    single = vllm_engine_args("/m", dtype="float32", max_model_len=128, max_k=8, platform="cpu")
    assert single["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in single
    assert single["gpu_memory_utilization"] == 0.2
    assert "scheduling_policy" not in single
    served = vllm_engine_args("/m", dtype="float32", max_model_len=128, max_k=8, platform="cpu", asynchronous=True)
    assert served["scheduling_policy"] == "priority" and served["disable_log_stats"] is True


def test_vllm_engine_args_are_accepted_by_vllm():
    pytest.importorskip("vllm")
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    args = vllm_engine_args("/m", dtype="bfloat16", max_model_len=2048, max_k=64, platform="cuda",
                            tensor_parallel_size=2, pipeline_parallel_size=2)
    assert set(args) <= fields, set(args) - fields
    served = vllm_engine_args("/m", dtype="bfloat16", max_model_len=2048, max_k=64, platform="cpu", asynchronous=True)
    async_fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(served) <= async_fields, set(served) - async_fields


def test_scoring_params_capture_settings():
    params = scoring_params(32, max_k=64)
    assert params == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 32, "logprobs": 32,
                      "detokenize": False, "flat_logprobs": True}
    assert "flat_logprobs" not in scoring_params(8, max_k=8, flat_logprobs=False)
    with pytest.raises(ValueError, match="max_k=16"):
        scoring_params(32, max_k=16)


def test_scoring_params_are_accepted_by_the_installed_vllm():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from raykd.teacher.engines.vllm import sampling_has_flat_logprobs

    flat = sampling_has_flat_logprobs()
    sp = SamplingParams(**scoring_params(4, max_k=8, flat_logprobs=flat))
    assert sp.max_tokens == 1 and sp.detokenize is False and sp.prompt_logprobs == sp.logprobs == 4


def test_dict_logprobs_give_the_same_rows_as_flat_logprobs():
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # vLLM's Logprob
    # two positions, K=2; actual tokens 7 (rank 3, outside the top-k) and 5 (rank 1)
    dicts = [None, {7: lp(-3.0, 3), 4: lp(-0.5, 1), 5: lp(-1.0, 2)}, {5: lp(-0.2, 1), 9: lp(-2.0, 2)}]
    flat = SimpleNamespace(token_ids=[7, 4, 5, 5, 5, 9], logprobs=[-3.0, -0.5, -1.0, -0.2, -0.2, -2.0])
    ids_d, lps_d = _flat_rows(dicts, 2, [7, 5])
    ids_f, lps_f = _flat_rows(flat, 2)
    np.testing.assert_array_equal(ids_d, ids_f)
    np.testing.assert_array_equal(lps_d, lps_f)


@pytest.mark.parametrize("engine", ["hf", "classifier"])
def test_parallel_sizes_refused_on_single_device_engines(engine):
    with pytest.raises(ValueError, match="needs the vllm engine"):
        TeacherConfig(engine=engine, tensor_parallel_size=2)


def test_parallel_sizes_refused_when_auto_resolves_to_hf():
    cfg = TeacherConfig(engine="auto", pipeline_parallel_size=2)  # allowed: auto may pick vllm
    with pytest.raises(ValueError, match="needs the vllm engine, but the teacher runs on 'hf'"):
        check_engine_request("hf", cfg)
    check_engine_request("vllm", cfg)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"engine": "vllm", "tensor_parallel_size": 2, "device": "cpu"}, "device='cpu' has none"),
        ({"engine": "vllm", "tensor_parallel_size": 2, "num_gpus": 1}, "num_gpus=1.0 conflicts"),
        ({"engine": "vllm", "tensor_parallel_size": 2, "num_cpus": 0}, "num_cpus must be > 0"),
    ],
)
def test_inconsistent_parallel_settings_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        TeacherConfig(**fields)


# --- the cluster can place the teacher -------------------------------------------------------


def test_tensor_parallel_larger_than_a_node_is_refused():
    cfg = TeacherConfig(engine="vllm", tensor_parallel_size=8)
    with pytest.raises(ValueError, match="tensor_parallel_size=8 x pipeline_parallel_size=1 = 8 GPUs on one node, but the largest node has 4"):
        check_cluster_resources(cfg, [4.0, 4.0])  # 8 GPUs in the cluster, but not on one node
    check_cluster_resources(cfg, [4.0, 8.0])


@pytest.mark.parametrize(
    "fields",
    [{"num_gpus": 1}, {"device": "cuda"}, {"engine": "vllm", "tensor_parallel_size": 2}],
)
def test_gpu_teacher_on_a_cluster_without_gpu_is_refused(fields):
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        check_cluster_resources(TeacherConfig(**fields), [0.0, 0.0])


def test_gpu_count_above_a_node_is_refused_and_cpu_teacher_passes():
    with pytest.raises(ValueError, match="num_gpus=2, but the largest node has 1"):
        check_cluster_resources(TeacherConfig(num_gpus=2), [1.0, 1.0])
    check_cluster_resources(TeacherConfig(), [0.0])  # a CPU teacher needs no GPU
    check_cluster_resources(TeacherConfig(num_gpus=0.5), [1.0])
