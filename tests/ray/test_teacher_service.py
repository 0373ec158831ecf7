"""The teacher as a real Ray Serve deployment (tiny model, local Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from raykd.config import TeacherConfig
from raykd.teacher.apps import running_teacher, start_teacher, stop_teacher
from raykd.teacher.engines.hf import HFEngine

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def teacher(ray_start, tiny_model):
    cfg = TeacherConfig(name="svc-test", model=str(tiny_model), num_threads=1, num_cpus=0.5, max_batch_size=8)
    handle, started = start_teacher(cfg, str(tiny_model))
    assert started
    yield cfg, handle
    stop_teacher(cfg.name)


def test_score_through_serve_equals_in_process_engine(teacher, tiny_model):
    _, handle = teacher
    ids = np.random.default_rng(0).integers(3, 300, (4, 16))
    served = handle.score.remote(ids, k=6, temperature=1.5).result()
    local = HFEngine(tiny_model, num_threads=1).score(ids, k=6, temperature=1.5)
    assert served["topk_ids"].shape == (4, 16, 6) and served["topk_logprobs"].dtype == np.float16
    for name in local:
        np.testing.assert_allclose(served[name].astype(np.float32), local[name].astype(np.float32), atol=1e-3, err_msg=name)


def test_generate_through_serve(teacher):
    _, handle = teacher
    out = handle.generate.remote(["The team won"], max_new_tokens=4, k=2).result()
    assert len(out) == 1 and 1 <= len(out[0]["token_ids"]) <= 4 and out[0]["topk_ids"].shape[1] == 2


def test_info_reports_fingerprints_and_counts_calls(teacher):
    _, handle = teacher
    before = handle.info.remote().result()
    handle.score.remote(np.array([[1, 5, 9]]), k=2).result()
    after = handle.info.remote().result()
    assert after["calls"]["score"] == before["calls"]["score"] + 1
    assert len(after["weights_fingerprint"]) == 16 and after["vocab_size"] > 0


@pytest.mark.parametrize(
    "ids,kwargs,match",
    [
        (np.array([[1, 2, 99999]]), {"k": 4}, "token ids must lie"),
        (np.ones((9, 4), np.int64), {"k": 4}, "exceeds max_batch_size=8"),
        (np.array([[1, 2, 3]]), {"k": 100000}, "k=100000"),
        (np.zeros((0, 3), np.int64), {"k": 4}, "non-empty"),
    ],
)
def test_bad_requests_fail_clearly_and_the_service_keeps_serving(teacher, ids, kwargs, match):
    _, handle = teacher
    with pytest.raises(Exception, match=match):
        handle.score.remote(ids, **kwargs).result()
    assert handle.score.remote(np.array([[1, 2, 3]]), k=2).result()["topk_ids"].shape == (1, 3, 2)


def test_a_running_teacher_is_found_and_reused(teacher, tiny_model):
    cfg, _ = teacher
    assert running_teacher(cfg.name) is not None
    handle, started = start_teacher(cfg, str(tiny_model))
    assert not started
    assert handle.score.remote(np.array([[1, 2]]), k=1).result()["topk_ids"].shape == (1, 2, 1)
    assert running_teacher("no-such-teacher") is None
