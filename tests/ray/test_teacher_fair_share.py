"""The shared teacher under load: a bulk labeler keeps the replica busy, and a second caller's
single call is answered within a few of the labeler's batches (round robin between callers),
not after the labeler's whole backlog. Batched answers equal unbatched ones through Serve."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from raykd.config import TeacherConfig
from raykd.teacher.apps import start_teacher, stop_teacher
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.ray

NAME = "fair-share"
ROWS, T = 8, 256


@pytest.fixture(scope="module")
def handle(ray_start, tmp_path_factory):
    """A teacher wide enough that one batch of 8 x 256 tokens takes a measurable time."""
    folder = build_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden_size=256, intermediate_size=1024,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = TeacherConfig(name=NAME, model=str(folder), num_threads=1, num_cpus=0.5, max_batch_size=ROWS, batch_wait_ms=2)
    h, started = start_teacher(cfg, str(folder))
    assert started
    yield h
    stop_teacher(NAME)


def test_a_second_caller_waits_at_most_two_batches_behind_a_bulk_labeler(handle):
    """Judged by order, not by seconds (a loaded machine stretches every batch alike): of the
    labeler's 16 queued calls (one engine batch each), at most 4 are answered before the second
    caller's call; a first-come queue would answer all 16 first."""
    rng = np.random.default_rng(0)
    bulk_ids = rng.integers(3, 300, size=(ROWS, T))
    handle.score.remote(bulk_ids, k=4, caller="bulk").result()  # warm
    flood = [handle.score.remote(bulk_ids, k=4, caller="bulk") for _ in range(16)]
    first_done = flood[0].result()
    order: list[str] = []
    lock = threading.Lock()

    def wait(name, response):
        out = response.result()
        with lock:
            order.append(name)
        return out

    with ThreadPoolExecutor(max_workers=17) as pool:
        bulk = [pool.submit(wait, "bulk", r) for r in flood[1:]]
        alone = pool.submit(wait, "trial", handle.score.remote(bulk_ids[:1, :64], k=4, caller="trial")).result()
        for f in bulk:
            f.result()
    ahead = order.index("trial")  # bulk calls answered before the trial's, after flood[0]
    assert alone["topk_ids"].shape == (1, 64, 4) and first_done["topk_ids"].shape == (ROWS, T, 4)
    assert ahead <= 3, f"the second caller was answered after {ahead} of the labeler's 15 queued calls: {order}"
    assert len(order) == 16 and order.count("bulk") == 15
    counts = handle.info.remote().result()["calls_by_caller"]
    assert counts["bulk"]["score"] >= 17 and counts["trial"]["score"] == 1


def test_concurrent_one_row_calls_through_serve_equal_one_call(handle):
    ids = np.random.default_rng(1).integers(3, 300, size=(ROWS, 32))
    whole = handle.score.remote(ids, k=5, caller="one").result()
    parts = [handle.score.remote(ids[i : i + 1], k=5, caller=f"c{i}") for i in range(ROWS)]
    for i, r in enumerate(parts):
        got = r.result()
        np.testing.assert_array_equal(got["topk_ids"], whole["topk_ids"][i : i + 1])
        np.testing.assert_allclose(got["label_logprobs"], whole["label_logprobs"][i : i + 1], atol=1e-5)
