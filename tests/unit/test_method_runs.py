"""A real short run of every feature method's shipped objective, without Ray: the Train worker's
parts (:class:`~raykd.train.loop.LoopConfig`'s objective schedule, :class:`~raykd.train.features.FeatureTerms`
with the teacher run online, :func:`~raykd.train.loop.student_batch`, the shared step) on a
layer-dropped tiny Llama against its tiny teacher, for two steps.

The Ray tests run two of these methods end to end (tests/ray/test_feature_methods.py); the others
take the same path there, and are run here with their own terms, weights, parameters and phases."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.config import DistillConfig, load_config
from raykd.losses import get_loss
from raykd.losses.features import LayerMap
from raykd.methods import available_methods, get_method
from raykd.students.build import layer_drop
from raykd.train.features import FeatureTerms
from raykd.train.loop import LoopConfig, student_batch
from raykd.train.step import build_optimizer, run_steps
from tests.unit.test_feature_training import _inputs, tiny_llama

STEPS = 2
KEEP = [0, 2]  # of the tiny teacher's 4 layers


def _terms(cfg: DistillConfig) -> set[str]:
    return set().union(*(set(w) for w in cfg.train.students.values())) | cfg.train.phase_terms()


SHIPPED = {m: load_config(DistillConfig, get_method(m).config_path) for m in available_methods()}
FEATURE_METHODS = sorted(m for m, cfg in SHIPPED.items() if any(get_loss(t).kind == "features" for t in _terms(cfg)))


def _cached_batch(teacher, tau: float, k: int = 8) -> dict[str, torch.Tensor]:
    """A decoded soft-label batch as the cache gives it: the teacher's top-``k`` at ``tau`` and its tail."""
    inputs = _inputs()
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(**inputs).logits.float() / tau, -1)
    top, ids = logprobs.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    am = inputs["attention_mask"]
    loss_mask = torch.zeros_like(am)  # positions with a next token to predict
    loss_mask[:, :-1] = am[:, :-1] * am[:, 1:]
    return {**inputs, "loss_mask": loss_mask, "topk_ids": ids, "topk_logprobs": top,
            "tail_logmass": tail}


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_feature_method_trains_two_steps_with_its_shipped_objective(method, tmp_path):
    shipped = SHIPPED[method]
    (name, weights), = shipped.train.students.items()
    teacher = tiny_llama()
    teacher.save_pretrained(tmp_path / "teacher")
    student = layer_drop(teacher, KEEP).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = {t: {**p, **({"relation_heads": 4} if "relation_heads" in p else {})}  # heads that divide the tiny widths
              for t, p in shipped.train.loss_params.items()}
    train = shipped.train.model_copy(update={"max_steps": STEPS, "warmup_steps": 1, "num_workers": 0, "loss_params": params})
    loop = LoopConfig(run_label=name, student_path=str(tmp_path), weights=weights, terms=sorted(_terms(shipped)),
                      loss_params=train.loss_params, temperature=shipped.labels.temperature, train=train,
                      layer_map=list(LayerMap.from_keep_layers(KEEP, 4).pairs), feature_teacher=str(tmp_path / "teacher"))
    features = FeatureTerms.for_run(loop.layer_map, loop.terms, student, torch.device("cpu"),
                                    teacher_path=loop.feature_teacher, lr=train.lr, params=loop.loss_params,
                                    total_steps=train.total_steps)
    cached = _cached_batch(teacher, loop.temperature)
    optim, sched = build_optimizer(list(student.parameters()), lr=train.lr, warmup=train.warmup_steps,
                                   schedule="cosine", total=train.total_steps)
    before = [p.detach().clone() for p in student.parameters()]
    history = run_steps(student, optim, lambda tau: [student_batch(cached, loop.temperature, tau)],
                        lambda step: loop.objective_at(step, features=features), max_steps=STEPS,
                        on_step=features.step, scheduler=sched, feature_teacher=features.teacher)

    assert len(history) == STEPS
    for row in history:
        assert math.isfinite(row["loss"]) and row["positions"] > 0
        assert set(weights) <= set(row), f"{method}: terms {sorted(set(weights) - set(row))} not computed"
        assert all(math.isfinite(row[t]) for t in weights)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the student moved
