"""The teacher's OpenAI-compatible routes (``/v1/models``, ``/v1/chat/completions``) driven by the
real ``openai`` client, against a tiny teacher whose tokenizer has a chat template.

Reuses the proxy fixture and helpers of ``test_teacher_http`` (Serve with an HTTP proxy on a free
port of 127.0.0.1, restarted for this module).
"""

from __future__ import annotations

import shutil

import pytest

from raykd.teacher.apps import running_teacher
from raykd.teacher.schemas import CallerToken, HTTPConfig
from raykd.teacher.service import (
    ServedTeacher,
    TeacherServiceConfig,
    teacher_down,
    teacher_up,
)
from tests.ray.test_teacher_http import TOKEN, _post, _tiny, _wait_healthy, proxy  # noqa: F401 (proxy: a fixture)

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.ray

NAME = "chat-tiny"
TRIAL_TOKEN = "trial-token"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
MESSAGES = [{"role": "system", "content": "You report the news."}, {"role": "user", "content": "What did the team do?"}]


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    """The tiny teacher with a chat template added to its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat_tiny") / "model"
    shutil.copytree(tiny_model, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def url(proxy, chat_model):  # noqa: F811
    trial = CallerToken(name="trial", token=TRIAL_TOKEN, max_concurrent=1, max_waiting=0)
    http = HTTPConfig(token=TOKEN, token_name="bulk", tokens=[trial], max_k=16, max_new_tokens=32, max_seq_len=256)
    served = ServedTeacher(teacher=_tiny(NAME, chat_model), http=http)
    (row,) = teacher_up(TeacherServiceConfig(proxy=proxy, teachers=[served]))["teachers"]
    _wait_healthy(row["url"])
    yield row["url"]
    teacher_down(NAME)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def test_models_lists_the_teacher(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    (m,) = models.data
    assert m.object == "model" and m.owned_by == "raykd" and m.created > 0


def test_chat_completion_with_logprobs_is_greedy_and_deterministic(client):
    def ask():
        return client.chat.completions.create(
            model=NAME, messages=MESSAGES, logprobs=True, top_logprobs=3, max_tokens=8, temperature=0
        )

    first, second = ask(), ask()
    assert first.object == "chat.completion" and first.model == NAME and first.id.startswith("chatcmpl-")
    (choice,) = first.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    tokens = choice.logprobs.content
    n = first.usage.completion_tokens
    assert 1 <= n <= 8 and len(tokens) == n
    assert choice.finish_reason == "stop" or (choice.finish_reason == "length" and n == 8)
    assert first.usage.prompt_tokens > 0 and first.usage.total_tokens == first.usage.prompt_tokens + n
    for t in tokens:
        assert len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        alts = [a.logprob for a in t.top_logprobs]
        assert alts == sorted(alts, reverse=True) and all(lp <= 0 for lp in alts)
        assert t.logprob == pytest.approx(alts[0], abs=1e-5)  # greedy picks the most likely token
    assert choice.message.content == second.choices[0].message.content
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in second.choices[0].logprobs.content]


def test_chat_matches_the_handle_with_the_chat_template(client):
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=6, temperature=0)
    assert reply.choices[0].logprobs is None
    (out,) = running_teacher(NAME).generate.remote([MESSAGES], max_new_tokens=6, temperature=0.0, k=1).result()
    assert reply.choices[0].message.content == out["text"] and reply.usage.completion_tokens == len(out["token_ids"])


def test_a_wrong_token_is_refused(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"n": 2}, "UnprocessableEntityError", "only n=1 is supported"),
        ({"max_tokens": 33}, "UnprocessableEntityError", "max_tokens=33 exceeds max_new_tokens=32"),
        ({"logprobs": True, "top_logprobs": 21}, "UnprocessableEntityError", "top_logprobs"),
        ({"top_logprobs": 2}, "UnprocessableEntityError", "needs logprobs=true"),
        ({"model": "gpt-4"}, "NotFoundError", "is not served here"),
    ],
    ids=["n-2", "too-many-tokens", "top-logprobs-21", "top-without-logprobs", "unknown-model"],
)
def test_unsupported_requests_are_refused_clearly(client, kwargs, error, match):
    with pytest.raises(getattr(openai, error), match=match):
        client.chat.completions.create(**{"model": NAME, "messages": MESSAGES, "max_tokens": 1} | kwargs)


def test_chat_over_plain_http(url):
    """A raw JSON request, as curl sends it, gets the same shape."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    r = _post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_common_client_parameters_are_accepted(client):
    """``stop``, ``top_p``, ``user`` and list-form text content, as clients send them."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "What did "}, {"type": "text", "text": "the team do?"}]}]
    plain = [{"role": "user", "content": "What did the team do?"}]
    a = client.chat.completions.create(model=NAME, messages=parts, max_tokens=8, temperature=0, top_p=0.9, user="u-1")
    b = client.chat.completions.create(model=NAME, messages=plain, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content  # parts join into the same prompt
    text = b.choices[0].message.content
    if len(text) > 2:
        stop = text[1:3]
        c = client.chat.completions.create(model=NAME, messages=plain, max_tokens=8, temperature=0, stop=[stop, "zzzz"])
        assert c.choices[0].message.content == text[: text.find(stop)] and c.choices[0].finish_reason == "stop"
    with pytest.raises(openai.UnprocessableEntityError, match="image_url"):
        client.chat.completions.create(model=NAME, max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_streaming_chat_and_completions_with_the_client_iterator(client):
    kwargs = {"model": NAME, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    plain = client.completions.create(model=NAME, prompt="The market", max_tokens=6, temperature=0)
    streamed = list(client.completions.create(model=NAME, prompt="The market", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_legacy_completions_give_text_offset(client):
    prompt = "The market"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.text_offset) == len(lp.tokens) and lp.text_offset[0] == len(prompt)
    assert lp.text_offset == sorted(lp.text_offset) and all(o <= len(prompt) + len(text) for o in lp.text_offset)


def test_max_seq_len_holds_on_the_chat_route(client):
    long_message = [{"role": "user", "content": " ".join(["word"] * 400)}]
    with pytest.raises(openai.UnprocessableEntityError, match="exceeds max_seq_len=256"):
        client.chat.completions.create(model=NAME, messages=long_message, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="exceeds max_seq_len=256"):
        client.completions.create(model=NAME, prompt=" ".join(["word"] * 400), max_tokens=4)


def test_named_tokens_have_their_own_quota_and_counts(url):
    """The trial token runs one request at a time with no line: 6 sent at once get some 503s
    with Retry-After, while the bulk token is not affected; both names are counted."""
    import requests as rq
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 32, "temperature": 0}
    trial = {"Authorization": f"Bearer {TRIAL_TOKEN}"}
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(rq.post, f"{url}/v1/chat/completions", json=body, headers=trial, timeout=120) for _ in range(6)]
        bulk = pool.submit(rq.post, f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        codes = sorted(f.result().status_code for f in futs)
        assert bulk.result().status_code == 200
    assert 200 in codes and 503 in codes, codes
    refused = next(f.result() for f in futs if f.result().status_code == 503)
    assert refused.headers.get("Retry-After") == "1" and "'trial' is over its quota" in refused.json()["detail"]
    health = rq.get(f"{url}/healthz", timeout=30).json()
    assert set(health["callers"]) == {"bulk", "trial"}
    assert health["calls_by_caller"]["trial"]["generate"] >= 1 and health["calls_by_caller"]["bulk"]["generate"] >= 1
