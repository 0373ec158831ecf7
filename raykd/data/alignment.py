"""Aligning two tokenizations of the same text, for a teacher and a student with different
tokenizers (no torch, no Ray).

Every token stands for a run of UTF-8 bytes of the text, so a tokenization is also a list of
byte offsets where its tokens end. Two positions, teacher token ``i`` and student token ``j``,
are *aligned* when their tokens end at the same byte offset: both models have then read the
same text, and their next-token distributions at ``i`` and ``j`` are conditioned on the same
prefix. This is the rule of TRL's GOLD trainer (a group of tokens closes where both sides reach
the same byte boundary); unlike GOLD we keep one pair per closed group, the positions that end
it, and do not merge the probabilities inside a group of several tokens (the positions inside
such a group condition on different prefixes and are left out of the teacher terms).

The vocabulary map pairs a teacher id with the student id that stands for the same bytes
(GOLD matches raw vocabulary strings; comparing bytes also matches a byte-level BPE ``Ġthe``
with a SentencePiece ``▁the``), one to one: a byte string several teacher ids stand for maps
from the lowest of them only. Special tokens stand for no bytes and map to nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

UNMATCHED = -1
"""The student id of a teacher token the student's vocabulary has no entry for."""


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's printable alphabet (GPT-2's ``bytes_to_unicode``): the
    printable Latin-1 bytes stand for themselves, the other 68 bytes for characters 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kind(tokenizer: Any) -> str:
    """``byte_level`` (GPT-2 style byte-level BPE), ``metaspace`` (SentencePiece style: ``▁`` for
    a space, ``<0xNN>`` byte fallback) or ``plain`` (tokens are their own text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "metaspace" if any("▁" in t for t in list(tokenizer.get_vocab())[:1000]) else "plain"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {d.get("type") for d in parts}
    if "ByteLevel" in types:
        return "byte_level"
    replaces_metaspace = any(d.get("type") == "Replace" and "▁" in json.dumps(d.get("pattern", {}), ensure_ascii=False)
                             for d in parts)
    if types & {"Metaspace", "ByteFallback"} or replaces_metaspace:
        return "metaspace"
    return "plain"


def vocabulary_bytes(tokenizer: Any, size: int | None = None) -> list[bytes | None]:
    """The bytes each id of a Hugging Face tokenizer stands for.

    Args:
        tokenizer: a (fast) Hugging Face tokenizer.
        size: how many ids to describe (e.g. the model's ``vocab_size``, which may exceed the
            tokenizer's length); ids past the tokenizer's length get None.

    Returns:
        ``[size]`` list: the token's bytes, or None for special tokens (BOS, EOS, pad...) and
        ids the tokenizer does not have. Added tokens that are not special stand for their text.
    """
    n = len(tokenizer)
    size = n if size is None else size
    kind = _decoder_kind(tokenizer)
    byte_of = _byte_level_decoder() if kind == "byte_level" else {}
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(n, size))))
    out: list[bytes | None] = []
    for i in range(size):
        if i >= n or i in special or tokens[i] is None:
            out.append(None)
        elif i in added:
            out.append(added[i].content.encode())
        elif kind == "byte_level":
            tok = tokens[i]
            out.append(bytes(byte_of[c] for c in tok) if all(c in byte_of for c in tok) else tok.encode())
        elif kind == "metaspace":
            tok = tokens[i]
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out.append(bytes([int(tok[3:5], 16)]))
            else:
                out.append(tok.replace("▁", " ").encode())
        else:
            out.append(tokens[i].encode())
    return out


def vocabulary_map(teacher_bytes: Sequence[bytes | None], student_bytes: Sequence[bytes | None]) -> np.ndarray:
    """Teacher id -> the student id standing for the same bytes, or :data:`UNMATCHED` (-1).

    One to one: when several ids of a side stand for the same bytes, the lowest id keeps the
    pair. Special tokens (None) and empty strings never match.

    Returns:
        ``[V_t]`` int64.
    """
    student_of: dict[bytes, int] = {}
    for j, b in enumerate(student_bytes):
        if b:
            student_of.setdefault(b, j)
    out = np.full(len(teacher_bytes), UNMATCHED, dtype=np.int64)
    taken: set[bytes] = set()
    for i, b in enumerate(teacher_bytes):
        if b and b in student_of and b not in taken:
            out[i] = student_of[b]
            taken.add(b)
    return out


def token_ends(ids: Sequence[int], lengths: np.ndarray) -> np.ndarray:
    """Byte offset where each token ends: the running sum of the tokens' byte lengths.

    Args:
        ids: ``[N]`` token ids.
        lengths: ``[V]`` bytes each id stands for (0 for special tokens).

    Returns:
        ``[N]`` int64 end offsets (a special token ends where the token before it does).
    """
    return np.cumsum(lengths[np.asarray(ids, dtype=np.int64)], dtype=np.int64)


def align_positions(teacher_ends: np.ndarray, student_ends: np.ndarray, *, limit: int | None = None) -> np.ndarray:
    """For each student position, the teacher position whose token ends at the same byte offset.

    Where several tokens of a side end at one offset (zero-length special tokens such as BOS
    followed by text), only the last of them is aligned: its distribution is the one that
    predicts the next piece of text.

    Args:
        teacher_ends: ``[T]`` non-decreasing end offsets of the teacher's tokens.
        student_ends: ``[S]`` non-decreasing end offsets of the student's tokens.
        limit: align only ends at or before this offset (the common prefix of the two texts,
            when they differ after some point); None: no limit.

    Returns:
        ``[S]`` int64: the aligned teacher position, or -1.
    """
    t_last = np.r_[teacher_ends[1:] != teacher_ends[:-1], True] if len(teacher_ends) else np.zeros(0, bool)
    s_last = np.r_[student_ends[1:] != student_ends[:-1], True] if len(student_ends) else np.zeros(0, bool)
    teacher_at = {int(e): i for i, e in enumerate(teacher_ends) if t_last[i]}
    out = np.full(len(student_ends), -1, dtype=np.int64)
    for j, e in enumerate(student_ends):
        if s_last[j] and (limit is None or e <= limit):
            out[j] = teacher_at.get(int(e), -1)
    return out


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of two byte strings."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo
