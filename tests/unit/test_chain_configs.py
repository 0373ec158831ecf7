"""TAKD / DGKD stage configs and sequence-level KD generation keys (no Ray)."""

from __future__ import annotations

import pytest

from raykd.config import ConfigError, DistillConfig, GenerationConfig
from raykd.data import Document
from raykd.methods import get_method, load
from raykd.recipes.lm.chains import _served, _stage_config
from raykd.soft_labels.generations import generation_key, prompts_of


def test_chain_methods_check_assistant_sizes():
    cfg = load(DistillConfig, get_method("takd").config_path)
    assert len(cfg.chain.assistants[0].keep_layers) > len(cfg.student.keep_layers)
    with pytest.raises(ConfigError, match="more layers than the student"):
        load(DistillConfig, get_method("takd").config_path, ["chain.assistants=[{keep_layers: [0, 29]}]"])
    with pytest.raises(ConfigError, match="does not use \\['chain'\\]"):
        load(DistillConfig, None, ["chain={assistants: [{keep_layers: [0, 1, 2]}]}"])
    with pytest.raises(ConfigError, match="needs \\['generate'\\]"):
        load(DistillConfig, None, ["method=seqkd"])


@pytest.mark.parametrize("method", ["takd", "dgkd"])
def test_stage_configs_serve_each_trained_assistant_as_a_teacher(method, tmp_path):
    cfg = load(DistillConfig, get_method(method).config_path)
    ta = _served(cfg, "ta1", str(tmp_path / "ta1"))
    assert ta.name == f"{cfg.run_name}-ta1" and ta.model == str(tmp_path / "ta1") and not ta.keep_alive
    teachers = [cfg.teacher, ta] if method == "dgkd" else [ta]
    stage = _stage_config(cfg, index=0, name="student", keep_layers=cfg.student.keep_layers, teachers=teachers,
                          students=cfg.train.students, max_steps=None)
    assert stage.method == ("tmkd" if method == "dgkd" else "kd") and stage.chain is None
    assert [t.model for t in (stage.teacher, *stage.extra_teachers)] == [t.model for t in teachers]
    assert stage.student.model == cfg.teacher.model  # every student is cut from the original teacher
    first = _stage_config(cfg, index=1, name="ta1", keep_layers=cfg.chain.assistants[0].keep_layers,
                          teachers=[cfg.teacher], students={"ta1": {"forward_kl": 1.0}}, max_steps=7)
    assert first.train.max_steps == 7 and first.train.seed == cfg.train.seed + 1 and first.teacher == cfg.teacher


def test_generation_key_follows_teacher_data_and_settings(tiny_model):
    from raykd.models import load_tokenizer

    docs = [Document("a", "the market rose sharply today after the news"), Document("b", "a minister said no")]
    teacher = {"weights_fingerprint": "w", "tokenizer_fingerprint": "t", "engine": "hf", "dtype": "float32"}
    gen = GenerationConfig(prompt_tokens=3, max_new_tokens=5)
    key = generation_key(teacher, docs, gen)
    assert key == generation_key(teacher, docs[::-1], gen.model_copy(update={"batch_size": 99}))  # batching: same text
    assert key != generation_key({**teacher, "engine": "vllm"}, docs, gen)
    assert key != generation_key(teacher, docs[:1], gen)
    assert key != generation_key(teacher, docs, gen.model_copy(update={"temperature": 0.7}))
    tok = load_tokenizer(tiny_model)
    prompts = prompts_of(docs, tok, 3)
    assert [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts] == [3, 3]
    assert docs[0].text.startswith(prompts[0])
