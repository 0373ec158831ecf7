"""The teacher as a shared service: HTTP API, auth, validation, backpressure, up/status/down.

Serve runs with an HTTP proxy on a free port of 127.0.0.1 for this module only (a Serve
started without a proxy by another module cannot gain one, so the module restarts Serve).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from raykd.config import TeacherConfig
from raykd.teacher.apps import running_teacher
from raykd.teacher.schemas import HTTPConfig
from raykd.teacher.service import (
    ProxyConfig,
    ServedTeacher,
    TeacherServiceConfig,
    teacher_down,
    teacher_status,
    teacher_up,
)
from raykd.teacher.service_cli import add_teacher_commands, run_teacher_command

pytestmark = pytest.mark.ray

NAME = "http-tiny"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, deadline_s: float = 60.0) -> None:
    """Poll ``/healthz`` until the proxy routes to the app (bounded)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {deadline_s}s")
        time.sleep(0.2)


def _tiny(name: str, model) -> TeacherConfig:
    return TeacherConfig(name=name, model=str(model), num_threads=1, num_cpus=0.5, max_batch_size=8)


@pytest.fixture(scope="module")
def proxy(ray_start):
    from ray import serve

    serve.shutdown()
    yield ProxyConfig(host="127.0.0.1", port=_free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def url(proxy, tiny_model):
    """A tiny teacher behind the HTTP API; one request in flight and one queued at most."""
    served = ServedTeacher(
        teacher=_tiny(NAME, tiny_model),
        max_ongoing_requests=1,
        max_queued_requests=1,
        http=HTTPConfig(token=TOKEN, max_batch_size=4, max_seq_len=64, max_k=16, max_new_tokens=200),
    )
    out = teacher_up(TeacherServiceConfig(proxy=proxy, teachers=[served]))
    (row,) = out["teachers"]
    assert row["started"] and row["url"] == f"http://127.0.0.1:{proxy.port}/teachers/{NAME}"
    _wait_healthy(row["url"])
    yield row["url"]
    teacher_down(NAME)


def _post(url: str, route: str, body, headers=AUTH) -> requests.Response:
    return requests.post(f"{url}{route}", json=body, headers=headers, timeout=60)


def test_healthz_is_open_and_identifies_the_teacher(url):
    r = requests.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["teacher"] == NAME and body["auth"] is True and body["limits"]["max_k"] == 16
    assert len(body["weights_fingerprint"]) == 16 and len(body["tokenizer_fingerprint"]) == 16 and body["vocab_size"] > 0


def test_score_over_http_equals_the_handle(url):
    ids = np.random.default_rng(0).integers(3, 300, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    r = _post(url, "/v1/score", {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "k": 5, "temperature": 1.5})
    assert r.status_code == 200, r.text
    served = running_teacher(NAME).score.remote(ids, mask, k=5, temperature=1.5).result()
    body = r.json()
    assert set(body) == {"topk_ids", "topk_logprobs", "tail_logmass", "label_logprobs"}
    np.testing.assert_array_equal(np.asarray(body["topk_ids"]), served["topk_ids"])
    for name in ("topk_logprobs", "tail_logmass", "label_logprobs"):
        np.testing.assert_allclose(np.asarray(body[name], np.float32), served[name].astype(np.float32), atol=1e-3, err_msg=name)
    assert np.asarray(body["topk_logprobs"]).shape == (2, 12, 5)


def test_generate_over_http(url):
    r = _post(url, "/v1/generate", {"prompts": ["The team won", "A minister said"], "max_new_tokens": 4, "k": 3})
    assert r.status_code == 200, r.text
    outs = r.json()["completions"]
    assert len(outs) == 2
    for o in outs:
        n = len(o["token_ids"])
        assert 1 <= n <= 4 and isinstance(o["text"], str)
        assert np.asarray(o["topk_ids"]).shape == (n, 3) and len(o["logprobs"]) == n


def test_openai_completions(url):
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": "The market", "max_tokens": 3, "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert body["object"] == "text_completion" and 1 <= n <= 3 and len(lp["token_logprobs"]) == n
    assert len(lp["top_logprobs"]) == n and all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
    assert choice["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] == n
    wrong = _post(url, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert wrong.status_code == 404 and NAME in wrong.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}], ids=["none", "wrong", "no-scheme"])
def test_routes_need_the_token(url, headers):
    requests_ = [
        ("/v1/score", {"input_ids": [[1, 2]], "k": 1}),
        ("/v1/score", {"input_ids": [[1, 2], [3]]}),  # invalid too: the token is checked first
        ("/v1/generate", {"prompts": ["a"], "max_new_tokens": 1}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 1}),
    ]
    for route, body in requests_:
        r = _post(url, route, body, headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["detail"], (route, r.text)
        assert r.headers.get("WWW-Authenticate") == "Bearer"
    assert _post(url, "/v1/score", {"input_ids": [[1, 2]], "k": 1}).status_code == 200


@pytest.mark.parametrize(
    "route,body,status,match",
    [
        ("/v1/score", {"input_ids": []}, 422, "input_ids"),
        ("/v1/score", {"input_ids": [[1, 2, 3], [4, 5]]}, 422, "input_ids is ragged"),
        ("/v1/score", {"input_ids": [[1, 2]], "k": 17}, 422, "k=17 exceeds max_k=16"),
        ("/v1/score", {"input_ids": [[1, 2]], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ("/v1/score", {"input_ids": [[1] * 65]}, 422, "sequence length 65 exceeds max_seq_len=64"),
        ("/v1/score", {"input_ids": [[1, 2]] * 5}, 422, "batch of 5 rows exceeds max_batch_size=4"),
        ("/v1/score", {"input_ids": [[1, 2]], "attention_mask": [[1]]}, 422, "attention_mask must have the shape"),
        ("/v1/score", {"input_ids": [[1, 2]], "topk": 3}, 422, "topk: Extra inputs are not permitted"),
        ("/v1/score", {"input_ids": [[1, 99999]], "k": 2}, 400, r"token ids must lie in \[0, "),
        ("/v1/score", '{"input_ids": [[1, 2]', 422, "body is not valid JSON"),
        ("/v1/generate", {"prompts": []}, 422, "prompts"),
        ("/v1/generate", {"prompts": ["a"], "max_new_tokens": 201}, 422, "max_new_tokens=201 exceeds max_new_tokens=200"),
        ("/v1/generate", {"prompts": [[{"role": "user", "content": "hi"}]]}, 400, "chat.template"),  # tiny tokenizer has none
        ("/v1/generate", {"prompts": ["a b"], "max_new_tokens": 63}, 422, r"prompts: a prompt of \d+ tokens \+ 63 new tokens exceeds max_seq_len=64"),
        ("/v1/completions", {"prompt": "a b", "max_tokens": 63}, 422, r"prompt: .* exceeds max_seq_len=64"),
    ],
    ids=["empty", "ragged", "k-big", "k-zero", "too-long", "batch-big", "mask-shape", "extra", "vocab", "json", "no-prompts",
         "too-many-new", "no-chat-template", "gen-prompt-plus-new-too-long", "completion-too-long"],
)
def test_bad_requests_are_rejected_clearly_and_the_service_keeps_answering(url, route, body, status, match):
    if isinstance(body, str):
        r = requests.post(f"{url}{route}", data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    else:
        r = _post(url, route, body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and re.search(match, detail), detail
    ok = _post(url, "/v1/score", {"input_ids": [[1, 2, 3]], "k": 2})
    assert ok.status_code == 200 and np.asarray(ok.json()["topk_ids"]).shape == (1, 3, 2)


def test_excess_callers_get_a_fast_503_not_a_queue(url):
    body = {"prompts": ["The team won"] * 4, "max_new_tokens": 56, "temperature": 0, "k": 1}
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_post, url, "/v1/generate", body) for _ in range(8)]
        responses = [f.result(timeout=300) for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert "busy" in busy.json()["detail"] and busy.headers.get("Retry-After") == "1"
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_another_process_reuses_the_running_teacher(url, ray_start):
    handle = running_teacher(NAME)
    before = handle.info.remote().result()["calls"]["score"]
    script = (
        "import sys, numpy as np, ray\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "from raykd.config import TeacherConfig\n"
        "from raykd.teacher.apps import start_teacher\n"
        "handle, started = start_teacher(TeacherConfig(name=sys.argv[2], model='/no/such/model'), '/no/such/model')\n"
        "out = handle.score.remote(np.array([[1, 5, 9, 12]]), k=3).result()\n"
        "print('RESULT', started, out['topk_ids'].shape, 'transformers.models.llama.modeling_llama' in sys.modules)\n"
    )
    gcs = ray_start.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", script, gcs, NAME], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT False (1, 4, 3) False" in proc.stdout, proc.stdout[-2000:]
    assert handle.info.remote().result()["calls"]["score"] == before + 1
    (row,) = [r for r in teacher_status() if r["name"] == NAME]
    assert row["replicas"] == 1 and row["status"] == "RUNNING"


def test_up_status_down_round_trip_with_two_named_teachers(proxy, tiny_model, tmp_path, capsys):
    import argparse

    import yaml

    cfg = {
        "proxy": proxy.model_dump(),
        "teachers": [
            {"teacher": _tiny("rt-a", tiny_model).model_dump(), "http": {"token": TOKEN}},
            {"teacher": _tiny("rt-b", tiny_model).model_dump(), "http": {"enabled": False}},
        ],
    }
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump(cfg))
    parser = argparse.ArgumentParser(prog="raykd")
    add_teacher_commands(parser.add_subparsers(dest="command", required=True))

    assert run_teacher_command(parser.parse_args(["teacher", "up", str(path), "--json"])) == 0
    # the command's JSON document; Ray may print lines of its own to this shared driver before it (the
    # long poll of a Serve handle failing after an earlier module's serve.shutdown killed the controller)
    out = capsys.readouterr().out
    up = json.JSONDecoder().raw_decode(out[out.index("{\n"):])[0]
    assert [(t["name"], t["started"]) for t in up["teachers"]] == [("rt-a", True), ("rt-b", True)]
    assert up["teachers"][0]["url"].endswith("/teachers/rt-a") and up["teachers"][1]["url"] is None
    rows = {r["name"]: r for r in teacher_status()}
    for name in ("rt-a", "rt-b"):
        assert rows[name]["status"] == "RUNNING" and rows[name]["replicas"] == 1 and len(rows[name]["weights_fingerprint"]) == 16
    assert teacher_up(TeacherServiceConfig.model_validate(cfg))["teachers"][1]["started"] is False  # running: kept

    assert run_teacher_command(parser.parse_args(["teacher", "down", "no-such"])) == 2  # a user error: `error: ...`, exit 2
    err = capsys.readouterr().err
    assert "no teacher named 'no-such'" in err and "rt-a" in err and "rt-b" in err
    teacher_down("rt-a")
    assert "rt-a" not in {r["name"] for r in teacher_status()}
    assert run_teacher_command(parser.parse_args(["teacher", "down", "rt-b"])) == 0
    assert not {"rt-a", "rt-b"} & {r["name"] for r in teacher_status()}
    with pytest.raises(ValueError, match="running teachers: "):
        teacher_down("rt-b")
