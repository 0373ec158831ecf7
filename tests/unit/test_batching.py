"""Batching across callers in a teacher replica (no Ray): merged answers equal unbatched ones,
batches are shared round robin between callers, and a failing call fails alone."""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import pytest

from raykd.teacher.batching import Call, FairBatcher
from raykd.teacher.engines.base import cut_at_stop
from raykd.teacher.merges import MERGES, pad_rows, run_group


@pytest.fixture(scope="module")
def engine(tiny_model):
    from raykd.teacher.engines.hf import HFEngine

    return HFEngine(tiny_model, num_threads=1)


def _batcher(engine, seen: list | None = None, **kw) -> FairBatcher:
    def run(group, payloads):
        if seen is not None:
            seen.append((group[0], len(payloads)))
        return run_group(engine, group, payloads)

    opts = {"max_batch_tokens": 4096, "max_batch_rows": 64, "batch_wait_s": 0.05} | kw
    return FairBatcher(run, **opts)


async def _submit_all(batcher: FairBatcher, method: str, payloads: list, callers: list[str]) -> list:
    merge = MERGES[method]
    calls = [Call(caller=c, group=merge.group(p), payload=p, rows=merge.size(p)[0], width=merge.size(p)[1],
                  mergeable=merge.mergeable(p)) for p, c in zip(payloads, callers)]
    return await asyncio.gather(*(batcher.submit(c) for c in calls))


def test_sixteen_concurrent_one_row_scores_equal_one_sixteen_row_call(engine):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, engine.vocab_size, size=(16, 24))
    whole = engine.score(ids, None, k=8, temperature=2.0)
    seen: list = []
    answers = asyncio.run(_submit_all(_batcher(engine, seen), "score", [(ids[i : i + 1], None, 8, 2.0, None, "independent") for i in range(16)],
                                      [f"c{i}" for i in range(16)]))
    assert seen == [("score", 16)]  # one forward for the sixteen callers
    for i, a in enumerate(answers):
        np.testing.assert_array_equal(a["topk_ids"], whole["topk_ids"][i : i + 1])
        np.testing.assert_allclose(a["label_logprobs"], whole["label_logprobs"][i : i + 1], atol=1e-5)
        np.testing.assert_allclose(a["tail_logmass"], whole["tail_logmass"][i : i + 1], atol=1e-5)
        np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), whole["topk_logprobs"][i : i + 1].astype(np.float32),
                                   atol=2e-3)  # fp16 storage: one ulp


def test_ragged_callers_padded_and_cut_back_to_their_own_length(engine):
    rng = np.random.default_rng(1)
    short, long_ = rng.integers(3, engine.vocab_size, size=(2, 10)), rng.integers(3, engine.vocab_size, size=(3, 30))
    mask = np.ones_like(long_)
    mask[0, 20:] = 0
    answers = asyncio.run(_submit_all(_batcher(engine), "score", [(short, None, 4, 1.0, None, "independent"), (long_, mask, 4, 1.0, None, "independent")], ["a", "b"]))
    alone = [engine.score(short, None, k=4), engine.score(long_, mask, k=4)]
    for a, b in zip(answers, alone):
        assert a["topk_ids"].shape == b["topk_ids"].shape
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_allclose(a["label_logprobs"], b["label_logprobs"], atol=1e-5)
    assert answers[0]["label_logprobs"][:, -1].tolist() == [0.0, 0.0]  # the row's own last position, not the padding's


def test_different_k_or_temperature_run_in_separate_batches(engine):
    ids = np.arange(3, 3 + 16).reshape(2, 8)
    seen: list = []
    answers = asyncio.run(_submit_all(_batcher(engine, seen), "score", [(ids, None, 4, 1.0, None, "independent"), (ids, None, 8, 1.0, None, "independent")], ["a", "b"]))
    assert sorted(seen) == [("score", 1), ("score", 1)]
    assert answers[0]["topk_ids"].shape[-1] == 4 and answers[1]["topk_ids"].shape[-1] == 8


def test_sampled_calls_merge_and_draw_what_each_row_draws_alone(engine):
    """Sampled soft labels: each row's draws come from its own seed, so merging callers (and the
    engine's chunking) changes none of them; unseeded calls of the same k run apart."""
    rng = np.random.default_rng(2)
    ids = rng.integers(3, engine.vocab_size, size=(3, 12))
    seeds = np.array([11, 12, 13])
    seen: list = []
    payloads = [(ids[:1], None, 16, 1.0, seeds[:1], "independent"), (ids[1:], None, 16, 1.0, seeds[1:], "independent"),
                (ids, None, 16, 1.0, None, "independent"), (ids[:1], None, 16, 1.0, seeds[:1], "systematic"),
                (ids[1:], None, 16, 1.0, seeds[1:], "systematic")]
    answers = asyncio.run(_submit_all(_batcher(engine, seen), "score", payloads, ["a", "b", "c", "a", "b"]))
    assert sorted(seen) == [("score", 1), ("score", 2), ("score", 2)]  # each draw scheme is a group of its own
    alone = engine.score(ids, None, k=16, seeds=seeds)
    np.testing.assert_array_equal(np.concatenate([answers[0]["topk_ids"], answers[1]["topk_ids"]]), alone["topk_ids"])
    assert (np.diff(alone["topk_ids"].astype(np.int64), axis=-1) >= 0).all()  # the draws in ascending order
    assert not np.array_equal(answers[2]["topk_ids"], alone["topk_ids"])  # top-k, not draws
    systematic = engine.score(ids, None, k=16, seeds=seeds, draws="systematic")
    np.testing.assert_array_equal(np.concatenate([answers[3]["topk_ids"], answers[4]["topk_ids"]]), systematic["topk_ids"])
    assert not np.array_equal(systematic["topk_ids"], alone["topk_ids"])


def test_round_robin_puts_a_second_caller_in_the_next_batch():
    """A labeler with 12 queued calls and an interactive caller with one: the next batch of 4
    rows holds the interactive call, not 4 of the labeler's backlog."""
    async def scenario() -> list[str]:
        b = FairBatcher(lambda g, ps: ps, max_batch_tokens=10_000, max_batch_rows=4, batch_wait_s=0)
        loop = asyncio.get_running_loop()
        for i in range(12):
            c = Call(caller="labeler", group="g", payload=f"L{i}", rows=1, width=8)
            c.future = loop.create_future()
            b.queues.setdefault("labeler", deque()).append(c)
        c = Call(caller="trial", group="g", payload="T0", rows=1, width=8)
        c.future = loop.create_future()
        b.queues.setdefault("trial", deque()).append(c)
        return [call.payload for call in b.take()]

    first = asyncio.run(scenario())
    assert "T0" in first and len(first) == 4
    assert first[:2] == ["L0", "T0"]  # one call per caller per round, oldest caller first


def test_a_bulk_caller_that_fills_every_batch_cannot_starve_another():
    """Bulk calls of 8 rows fill a batch of 8 rows on their own; the interactive call, queued
    after all of them, runs in the batch right after the first."""
    order: list[list[str]] = []

    async def scenario():
        b = FairBatcher(lambda g, ps: (order.append(list(ps)), ps)[1], max_batch_tokens=10_000, max_batch_rows=8, batch_wait_s=0)
        bulk = [asyncio.create_task(b.submit(Call(caller="bulk", group="g", payload=f"B{i}", rows=8, width=4))) for i in range(6)]
        await asyncio.sleep(0)
        trial = asyncio.create_task(b.submit(Call(caller="trial", group="g", payload="T", rows=1, width=4)))
        await asyncio.gather(*bulk, trial)

    asyncio.run(scenario())
    assert order[0] == ["B0"] and order[1] == ["T"], order


def test_priority_calls_form_their_own_batch_ahead_of_bulk():
    order: list[list[str]] = []

    async def scenario():
        b = FairBatcher(lambda g, ps: (order.append(list(ps)), ps)[1], max_batch_tokens=10_000, max_batch_rows=8, batch_wait_s=0)
        bulk = [asyncio.create_task(b.submit(Call(caller="bulk", group="g", payload=f"B{i}", rows=2, width=4))) for i in range(8)]
        await asyncio.sleep(0)
        worker = asyncio.create_task(b.submit(Call(caller="worker", group="g", payload="W", rows=1, width=4, priority=1)))
        await asyncio.gather(*bulk, worker)

    asyncio.run(scenario())
    assert order[0] == ["B0", "B1", "B2", "B3"] and order[1] == ["W"], order  # no bulk rows fill the worker's batch


def test_token_budget_bounds_a_batch_by_padded_tokens():
    async def scenario():
        b = FairBatcher(lambda g, ps: ps, max_batch_tokens=100, max_batch_rows=64, batch_wait_s=0)
        calls = [Call(caller=f"c{i}", group="g", payload=i, rows=2, width=w) for i, w in enumerate([10, 40, 10])]
        outs = await asyncio.gather(*(b.submit(c) for c in calls))
        return outs, b.batches

    outs, batches = asyncio.run(scenario())
    assert outs == [0, 1, 2] and batches == 2  # 2 rows x 10, then 4 rows x 40 would be 160 > 100


def test_a_bad_call_fails_alone(engine):
    good = np.arange(3, 11).reshape(1, 8)
    bad = np.full((1, 8), engine.vocab_size + 5)  # outside the vocabulary: the engine raises

    async def scenario():
        b = _batcher(engine)
        calls = [Call(caller=c, group=("score", 4, 1.0, None), payload=(ids, None, 4, 1.0, None, "independent"), rows=1, width=8)
                 for c, ids in (("a", good), ("b", bad))]
        return await asyncio.gather(*(b.submit(c) for c in calls), return_exceptions=True)

    ok, err = asyncio.run(scenario())
    assert ok["topk_ids"].shape == (1, 8, 4)
    assert isinstance(err, (ValueError, IndexError, RuntimeError))


def test_cancelled_call_is_dropped_before_it_runs():
    ran: list = []

    async def scenario():
        b = FairBatcher(lambda g, ps: (ran.extend(ps), ps)[1], max_batch_tokens=100, max_batch_rows=8, batch_wait_s=0.2)
        task = asyncio.create_task(b.submit(Call(caller="gone", group="g", payload="x", rows=1, width=1)))
        await asyncio.sleep(0.01)
        task.cancel()
        kept = await b.submit(Call(caller="stays", group="g", payload="y", rows=1, width=1))
        return kept, b.pending()

    kept, pending = asyncio.run(scenario())
    assert kept == "y" and ran == ["y"] and pending == 0


def test_greedy_generate_merged_equals_alone(engine):
    prompts = [["hello world"], ["the market rose", "a b c"]]
    kw = {"max_new_tokens": 5, "temperature": 0.0, "k": 3}
    answers = asyncio.run(_submit_all(_batcher(engine), "generate", [(p, kw) for p in prompts], ["a", "b"]))
    for p, got in zip(prompts, answers):
        alone = engine.generate(p, **kw)
        assert [g["token_ids"] for g in got] == [a["token_ids"] for a in alone]


def test_pad_rows_keeps_the_unmasked_path_for_equal_lengths():
    ids, mask = pad_rows([(np.ones((1, 5), int), None), (np.ones((2, 5), int), None)])
    assert ids.shape == (3, 5) and mask is None
    ids, mask = pad_rows([(np.ones((1, 3), int), None), (np.ones((1, 5), int), None)])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_cut_at_stop_cuts_text_and_tokens(engine):
    tok = engine.tokenizer
    ids = tok("alpha beta gamma", add_special_tokens=False)["input_ids"]
    n = len(ids)
    out = {"text": tok.decode(ids), "token_ids": ids, "topk_ids": np.zeros((n, 2)), "topk_logprobs": np.zeros((n, 2)),
           "logprobs": np.zeros(n)}
    cut = cut_at_stop(out, [" gamma", "zzz"], tok)
    assert cut["text"] == "alpha beta" and cut["stop"] == " gamma"
    assert tok.decode(cut["token_ids"]) == "alpha beta" or len(tok.decode(cut["token_ids"])) <= len("alpha beta")
    assert len(cut["logprobs"]) == len(cut["token_ids"])
    assert cut_at_stop(out, ["nothere"], tok) is out
