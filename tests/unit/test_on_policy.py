"""On-policy batches without Ray: the student's samples, the teacher calls that score them, the loss
mask, the replay buffer and the bad-input checks (the teacher is the tiny fixture model scored in
this process through the hf engine, wrapped to record every call)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, DistillConfig, OnPolicyConfig
from raykd.losses import Objective
from raykd.methods import available_methods, get_method, load
from raykd.train.on_policy import (
    OnPolicySampler,
    ReplayBuffer,
    on_policy_batch,
    prompts_of,
    sample_continuations,
    teacher_loglik_of_continuations,
    time_split,
)
from raykd.train.step import StudentBatch, train_step
from tests.conftest import tiny_distill_config


@pytest.fixture(scope="module")
def student(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_model):
    from raykd.teacher.engines.hf import HFEngine

    return HFEngine(tiny_model, num_threads=1)


class RecordingTeacher:
    """A ScoreFn over an in-process engine: records what each call scored, and the order in which
    calls were sent and their answers collected."""

    def __init__(self, engine, k=8):
        self.engine, self.k, self.calls, self.events = engine, k, [], []

    def __call__(self, ids, am):
        n = len(self.calls)
        self.calls.append((ids.copy(), am.copy()))
        self.events.append(("send", n))
        teacher = self

        class Answer:
            def result(self, timeout_s=None):
                teacher.events.append(("result", n))
                return teacher.engine.score(ids, am, k=teacher.k, temperature=1.0)

        return Answer()


def cached_group(n_micro=2, rows=3, seq=20, short_row=None):
    """Cached micro-batches as the loop decodes them (right-padded blocks)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_micro):
        ids = torch.randint(3, 300, (rows, seq), generator=g)
        am = torch.ones_like(ids)
        if short_row is not None:  # a short block: 5 real tokens, then padding
            am[short_row, 5:], ids[short_row, 5:] = 0, 0
        out.append(StudentBatch({"input_ids": ids, "attention_mask": am}, ids.clone(), am.bool(), None))
    return out


def test_prompts_are_the_first_tokens_of_each_block_left_padded():
    (batch,) = cached_group(1, rows=3, short_row=1)
    ids, am = prompts_of(batch, 8, pad_id=0)
    assert ids.shape == (3, 8)
    assert torch.equal(ids[0], batch.inputs["input_ids"][0, :8]) and am[0].all()
    assert torch.equal(ids[1, 3:], batch.inputs["input_ids"][1, :5]) and am[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_samples_follow_their_prompts_and_the_mask_holds_exactly_the_sampled_positions(student):
    (batch,) = cached_group(1, rows=3, short_row=1)
    prompt, prompt_am = prompts_of(batch, 8, pad_id=0)
    ids, am, mask = sample_continuations(student, prompt, prompt_am, max_new_tokens=6, temperature=1.0, stop_at_eos=False)
    assert ids.shape == am.shape == mask.shape == (3, 14)
    for i, n in enumerate([8, 5, 8]):  # the short block's prompt is its 5 tokens, re-aligned to position 0
        assert torch.equal(ids[i, :n], batch.inputs["input_ids"][i, :n])
        assert mask[i].nonzero().flatten().tolist() == list(range(n - 1, n + 5))  # predict tokens n .. n+5
        assert am[i].sum() == n + 6
    # greedy sampling is the model's own greedy continuation of the unpadded prompt
    g_ids, _, g_mask = sample_continuations(student, prompt[:1], prompt_am[:1], max_new_tokens=6, temperature=0.0,
                                            stop_at_eos=False)
    with torch.no_grad():
        ref = student.generate(input_ids=prompt[:1], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(g_ids[0], ref[0])


def test_a_sample_ends_at_its_eos_and_what_follows_is_masked(student):
    eos = student.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # make EOS the student's certain choice after the prompt
        bias = torch.zeros(student.config.vocab_size)
        bias[eos] = 1e4
        student.lm_head.bias = torch.nn.Parameter(bias)
    try:
        ids, am, mask = sample_continuations(student, prompt, torch.ones_like(prompt), max_new_tokens=5, temperature=1.0)
    finally:
        student.lm_head.bias = None
    assert ids[0, 4] == eos and am[0].tolist() == [1] * 5 + [0] * 4
    assert mask[0].nonzero().flatten().tolist() == [3]  # only the position that predicts the EOS


def test_teacher_scores_exactly_the_students_samples_in_calls_sent_before_any_answer(student, engine):
    teacher = RecordingTeacher(engine)
    cfg = OnPolicyConfig(on_policy_share=1.0, prompt_tokens=8, max_new_tokens=6, teacher_batch=2)
    sampler = OnPolicySampler(cfg, student, teacher, cached_temperature=1.0)
    group = cached_group(n_micro=2, rows=3)
    out = sampler(group, 1.0)
    # 2 micro-batches x 3 rows in calls of at most 2 rows: 4 calls, all sent before the first answer is awaited
    assert [ids.shape for ids, _ in teacher.calls] == [(2, 14), (1, 14), (2, 14), (1, 14)]
    assert [e for e, _ in teacher.events] == ["send"] * 4 + ["result"] * 4
    scored = [np.concatenate([teacher.calls[0][0], teacher.calls[1][0]]), np.concatenate([teacher.calls[2][0], teacher.calls[3][0]])]
    for batch, ids, cached in zip(out, scored, group):
        assert np.array_equal(batch.inputs["input_ids"].numpy(), ids)  # the tokens scored are the tokens trained on
        assert batch.targets.topk_ids.shape == (3, 14, 8) and batch.targets.tail_logmass.shape == (3, 14)
        # the prompt is the cached block's first 8 tokens; the rest was sampled
        assert np.array_equal(ids[:, :8], cached.inputs["input_ids"][:, :8].numpy())
    expected = engine.score(teacher.calls[0][0], teacher.calls[0][1], k=8)
    assert torch.equal(out[0].targets.topk_ids[:2], torch.as_tensor(expected["topk_ids"].astype(np.int64)))
    assert sampler.last["on_policy"] == 1.0 and sampler.last["teacher_calls"] == 4 and sampler.last["sample_s"] > 0


def test_the_loss_sees_the_sampled_positions_only(student, engine):
    cfg = OnPolicyConfig(on_policy_share=1.0, prompt_tokens=8, max_new_tokens=6, teacher_batch=4, stop_at_eos=False)
    (batch,) = OnPolicySampler(cfg, student, RecordingTeacher(engine), cached_temperature=1.0)(cached_group(1), 1.0)
    assert (batch.labels[~batch.mask] == -100).all()
    assert torch.equal(batch.labels[batch.mask], batch.inputs["input_ids"][:, 1:][batch.mask[:, :-1]])
    objective = Objective({"generalized_jsd": 1.0}, {"generalized_jsd": {"beta": 0.5}})
    with torch.no_grad():
        logits = student(**batch.inputs).logits
    out = objective(logits, batch.labels, batch.mask, batch.targets, 1.0)
    assert int(out.num_tokens) == 3 * 6  # 6 sampled tokens per row
    t = batch.targets  # scramble the teacher everywhere outside the mask: the loss does not move
    noise = torch.where(batch.mask[..., None], t.topk_logprobs, torch.randn_like(t.topk_logprobs))
    other = on_policy_batch(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.mask,
                            type(t).sparse(t.topk_ids, noise, t.tail_logmass))
    assert objective(logits, other.labels, other.mask, other.targets, 1.0).loss_sum == pytest.approx(float(out.loss_sum))


def test_one_train_step_on_samples_moves_the_student_towards_the_teacher(tiny_model, engine):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = OnPolicyConfig(on_policy_share=1.0, prompt_tokens=8, max_new_tokens=6, temperature=0.0)
    (batch,) = OnPolicySampler(cfg, model, RecordingTeacher(engine), cached_temperature=1.0)(cached_group(1), 1.0)
    with torch.no_grad():  # the tiny teacher is another random model: move the student towards it on these samples
        model.lm_head.weight.mul_(3.0)
    objective = Objective({"reverse_kl": 1.0})
    optim = torch.optim.SGD(model.parameters(), lr=0.5)
    before = train_step(model, optim, [batch], objective, 1.0)
    after = train_step(model, optim, [batch], objective, 1.0)
    assert before["positions"] == 18 and after["reverse_kl"] < before["reverse_kl"]


def test_on_policy_share_is_the_share_of_on_policy_steps(student, engine):
    for share, expect in ((0.0, 0), (1.0, 40)):
        sampler = OnPolicySampler(OnPolicyConfig(on_policy_share=share, prompt_tokens=4, max_new_tokens=1), student,
                                  RecordingTeacher(engine), cached_temperature=1.0)
        ons = 0
        for _ in range(40):
            group = cached_group(1, rows=1, seq=6)
            out = sampler(group, 1.0)
            ons += int(sampler.last["on_policy"])
            assert (out[0] is group[0]) == (not sampler.last["on_policy"])  # off-policy: the cached batch itself
        assert ons == expect
    coin = OnPolicySampler(OnPolicyConfig(on_policy_share=0.5), student, None, cached_temperature=1.0, seed=3).coin
    draws = [coin.random() < 0.5 for _ in range(2000) if coin.random() is not None]
    assert 0.45 < sum(draws) / len(draws) < 0.55


def test_replay_buffer_keeps_the_newest_rows_and_draws_distinct_ones():
    buf = ReplayBuffer(capacity=5, seed=0)
    for start in (0, 3):  # 6 rows into a buffer of 5: the oldest is dropped
        ids = torch.arange(start, start + 3)[:, None].repeat(1, 4)
        t = type("T", (), {})()
        from raykd.losses import TeacherTargets

        targets = TeacherTargets.sparse(torch.zeros(3, 4, 2, dtype=torch.long), torch.zeros(3, 4, 2), torch.zeros(3, 4))
        buf.add(on_policy_batch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), targets))
    assert len(buf) == 5 and sorted(int(r["input_ids"][0]) for r in buf.rows) == [1, 2, 3, 4, 5]
    drawn = buf.draw(5, "cpu")
    assert sorted(drawn.inputs["input_ids"][:, 0].tolist()) == [1, 2, 3, 4, 5]  # distinct rows
    assert drawn.targets.topk_ids.dtype == torch.long and drawn.labels.shape == (5, 4)
    with pytest.raises(ValueError, match="holds 5 rows, 6 asked for"):
        buf.draw(6, "cpu")
    copy = ReplayBuffer(capacity=5)
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy.draw(3, "cpu").inputs["input_ids"], buf.draw(3, "cpu").inputs["input_ids"])


def test_replayed_steps_reuse_buffered_samples_without_sampling_or_teacher_calls(student, engine):
    teacher = RecordingTeacher(engine)
    cfg = OnPolicyConfig(on_policy_share=1.0, prompt_tokens=6, max_new_tokens=3, replay_size=8, replay_share=0.5)
    sampler = OnPolicySampler(cfg, student, teacher, cached_temperature=1.0, seed=1)
    fresh_rows, replayed = [], 0
    for _ in range(12):
        n_calls = len(teacher.calls)
        (batch,) = sampler(cached_group(1, rows=2, seq=10), 1.0)
        if sampler.last["replayed"]:
            replayed += 1
            assert len(teacher.calls) == n_calls and sampler.last["sample_s"] == 0.0
            assert all(any(torch.equal(row, f) for f in fresh_rows) for row in batch.inputs["input_ids"])
        else:
            fresh_rows += list(batch.inputs["input_ids"])
    assert 0 < replayed < 12 and len(sampler.replay) == 8


def test_time_split_sums_the_logged_step_times():
    history = [{"on_policy": 1.0, "replayed": 0.0, "teacher_calls": 2.0, "data_s": 0.1, "sample_s": 1.0, "teacher_wait_s": 0.5, "update_s": 2.4},
               {"on_policy": 0.0, "replayed": 0.0, "teacher_calls": 0.0, "data_s": 0.1, "sample_s": 0.0, "teacher_wait_s": 0.0, "update_s": 3.0}]
    split = time_split(history)
    assert split["on_policy_steps"] == 1 and split["teacher_calls"] == 2 and split["update_s"] == pytest.approx(5.4)
    assert split["teacher_wait_share"] == pytest.approx(0.5 / 4.0)


def test_teacher_loglik_of_greedy_continuations_is_the_teachers_own_score(student, tiny_model):
    # the student judged by itself: its greedy continuations' log-likelihood under itself, both ways
    got = teacher_loglik_of_continuations(student, student, [[5, 6, 7], [8, 9, 10, 11]], max_new_tokens=4)
    assert got["tokens"] > 0 and got["teacher_logprob"] == pytest.approx(got["student_logprob"])
    assert got["teacher_logprob"] < 0 and 0 < got["distinct_2"] <= 1


# ---- bad input, before any compute ------------------------------------------------------------


def _on_policy(tiny_model, corpus, tmp_path, method="gkd", **on_policy):
    data = tiny_distill_config(tiny_model, corpus, tmp_path / "cache").model_dump(mode="json")
    shipped = load(DistillConfig, get_method(method).config_path)
    data.update(method=method, on_policy={**shipped.on_policy.model_dump(), **on_policy})
    data["train"].update(students=shipped.train.students, loss_params=shipped.train.loss_params)
    return DistillConfig.model_validate(data)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_on_policy_share_outside_0_1_is_refused(share):
    with pytest.raises(ConfigError, match="on_policy.on_policy_share: Input should be (greater|less) than or equal to"):
        load(DistillConfig, get_method("gkd").config_path, [f"on_policy.on_policy_share={share}"])


def test_sampling_beyond_the_models_context_is_refused_before_labeling(tiny_model, corpus_jsonl, tmp_path):
    from raykd.soft_labels.plan import Plan

    cfg = _on_policy(tiny_model, corpus_jsonl, tmp_path, prompt_tokens=32, max_new_tokens=240)  # tiny context: 256
    with pytest.raises(ValueError, match=r"32 \+ 240 = 272 tokens exceeds the teacher's context \(max_position_embeddings=256\)"):
        Plan(cfg)
    assert not (tmp_path / "cache").exists()
    Plan(_on_policy(tiny_model, corpus_jsonl, tmp_path, prompt_tokens=32, max_new_tokens=224))  # 256 fits


def test_no_running_teacher_with_start_false_is_refused(monkeypatch):
    from raykd.config import TeacherConfig
    from raykd.teacher import apps

    monkeypatch.setattr(apps, "running_teacher", lambda name: None)
    with pytest.raises(apps.TeacherNotRunningError, match="teacher 'smollm2-teacher', which is not running, and "
                                                        "teacher.start=false forbids starting one"):
        apps.check_teacher_reachable(TeacherConfig(name="smollm2-teacher", start=False), "on-policy training")
    apps.check_teacher_reachable(TeacherConfig(start=True), "on-policy training")  # may start one: no check


@pytest.mark.parametrize("overrides, message", [
    (["method=gkd"], "needs \\['on_policy'\\]"),
    (["method=kd", "on_policy={on_policy_share: 0.5}"], "does not use \\['on_policy'\\]"),
    (["method=gkd", "on_policy={on_policy_share: 0.5}", "train.students={s: {generalized_jsd: 0.5, ce: 0.5}}"], "no hard labels"),
    (["method=distillm", "on_policy={on_policy_share: 0.5}", "train.students={s: {forward_kl: 1}}"], "trains on skew_kl"),
    (["method=minillm", "on_policy={on_policy_share: 0.5, stop_at_eos: false}", "train.students={s: {reverse_kl: 1}}"],
     "on_policy_share in \\[1, 1\\]"),
    (["method=minillm", "on_policy={on_policy_share: 1.0}", "train.students={s: {reverse_kl: 1}}"], "stop_at_eos=false"),
    (["method=distillm", "on_policy={replay_share: 0.5}", "train.students={s: {skew_kl: 1}}"], "needs a replay buffer"),
    (["method=gkd", "on_policy={}", "train.students={s: {generalized_jsd: 1}}", "train.online_teacher=true"],
     "without extra_teachers, student.vocab_size and train.online_teacher"),
])
def test_bad_on_policy_configs_are_refused_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(DistillConfig, None, overrides)


ON_POLICY_METHODS = sorted(m for m in available_methods()
                           if load(DistillConfig, get_method(m).config_path).on_policy is not None)


@pytest.mark.parametrize("method", ON_POLICY_METHODS)
def test_on_policy_method_trains_two_steps_on_scored_samples_with_its_shipped_objective(method, tiny_model, engine):
    """Each on-policy method's shipped objective and on-policy settings (every step on-policy, short
    samples) through the Train worker's parts: the sampler scoring the student's samples with the
    teacher, the objective schedule of :class:`~raykd.train.loop.LoopConfig`, the shared step."""
    import math

    from transformers import AutoModelForCausalLM

    from raykd.train.loop import LoopConfig
    from raykd.train.step import build_optimizer, run_steps

    shipped = load(DistillConfig, get_method(method).config_path)
    (weights,) = shipped.train.students.values()
    cfg = shipped.on_policy.model_copy(update={"on_policy_share": 1.0, "prompt_tokens": 8, "max_new_tokens": 6,
                                               "teacher_batch": 2})
    train = shipped.train.model_copy(update={"max_steps": 2, "warmup_steps": 1})
    loop = LoopConfig(run_label=method, student_path=str(tiny_model), weights=weights,
                      terms=sorted(set(weights) | train.phase_terms()), loss_params=train.loss_params,
                      temperature=shipped.labels.temperature, train=train, on_policy=cfg, teacher_app="in-process")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    teacher = RecordingTeacher(engine)
    sampler = OnPolicySampler(cfg, model, teacher, cached_temperature=loop.temperature, seed=train.seed)
    optim, sched = build_optimizer(list(model.parameters()), lr=train.lr, schedule="cosine", warmup=1, total=2)
    history = run_steps(model, optim, lambda tau: sampler(cached_group(1), tau), loop.objective_at, max_steps=2,
                        scheduler=sched)
    assert len(history) == 2 and teacher.calls  # the teacher scored the student's samples
    for row in history:
        assert set(weights) <= set(row) and all(math.isfinite(row[t]) for t in weights) and row["positions"] > 0
