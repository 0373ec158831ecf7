"""The teacher's OpenAI-compatible routes (``/v1/models``, ``/v1/chat/completions``) driven by the
real ``openai`` client, against a tiny teacher whose tokenizer has a chat template.

Reuses the proxy fixture and helpers of ``test_teacher_http`` (Serve with an HTTP proxy on a free
port of 127.0.0.1, restarted for this module).
"""

from __future__ import annotations

import shutil

import pytest

from raykd.teacher.deployment import running_teacher
from raykd.teacher.schemas import HTTPConfig
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
    served = ServedTeacher(teacher=_tiny(NAME, chat_model), http=HTTPConfig(token=TOKEN, max_k=16, max_new_tokens=32))
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
