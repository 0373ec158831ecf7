"""OpenAI bodies built from an engine completion (no Ray): the closing EOS is not a returned
token, text offsets and streamed pieces add up to the returned text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raykd.teacher import openai_format as fmt


@pytest.fixture(scope="module")
def tok(tiny_model):
    from raykd.models import load_tokenizer

    return load_tokenizer(tiny_model)


def _completion(tok, text: str, eos: bool) -> dict:
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    n = len(ids)
    lps = -np.linspace(0.1, 1.0, n).astype(np.float32)
    return {"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids,
            "topk_ids": np.array([[i, 3] for i in ids]), "topk_logprobs": np.stack([lps, lps - 1], 1), "logprobs": lps}


def test_closing_eos_is_not_a_returned_token(tok):
    out = _completion(tok, "the market rose", eos=True)
    rows = fmt.token_logprobs(out, tok, 2)
    assert len(rows) == len(out["token_ids"]) - 1 and all(t != tok.eos_token for t, _, _ in rows)
    chat = fmt.chat_content_logprobs(out, tok, 1)["content"]
    assert len(chat) == len(rows) and all(c["token"] != tok.eos_token for c in chat)
    assert fmt.finish_reason(out, tok) == "stop"
    assert fmt.finish_reason(_completion(tok, "the market rose", eos=False), tok) == "length"


def test_pieces_and_text_offsets_add_up_to_the_text(tok):
    out = _completion(tok, "the market rose again", eos=True)
    pieces = fmt.token_pieces(out, tok)
    assert "".join(pieces) == out["text"] and len(pieces) == len(out["token_ids"]) - 1
    lp = fmt.completion_logprobs(out, tok, 1, prompt_chars=7)
    assert lp["text_offset"][0] == 7 and len(lp["text_offset"]) == len(lp["tokens"])
    assert [b - a for a, b in zip(lp["text_offset"], lp["text_offset"][1:])] == [len(p) for p in pieces[:-1]]


def test_stream_chat_events_rebuild_the_reply(tok):
    out = _completion(tok, "the team won", eos=True)
    events = list(fmt.stream_chat(out, tok, "m", top=1, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    assert events[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = "".join(b["choices"][0]["delta"].get("content", "") for b in bodies if b["choices"])
    assert text == out["text"] and bodies[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [b["choices"][0]["finish_reason"] for b in bodies if b["choices"] and b["choices"][0]["finish_reason"]] == ["stop"]
    assert bodies[-1]["usage"]["total_tokens"] == 3 and len({b["id"] for b in bodies}) == 1
