"""Pseudo-labels from an LLM's few-shot prompt, and their cache (no Ray).

A handful of gold examples become the demonstrations of one few-shot prompt whose prefix is
the same for every document. Two modes:

- ``score`` (classification): each class is scored by the summed log-probs of its verbaliser
  after ``prefix + document + cue`` (:func:`raykd.teacher.engines.continuations.continuation_logprobs`),
  optionally with contextual calibration (:func:`~raykd.teacher.engines.continuations.calibrate`);
- ``generate`` (sequence tasks): the LLM writes the target (e.g. a headline) after a chat of
  demonstrations.

Pseudo-labels (and any later relabeling, e.g. MCKD's stages) are cached through the one cache
commit (:func:`~raykd.soft_labels.cache.write_part`, :func:`~raykd.soft_labels.cache.finalize`),
in one small schema:

==============  =============================  ==========================================
column          Arrow type                     meaning
==============  =============================  ==========================================
doc_id          string                         the labeled document
attention_mask  list<uint8>                    one 1 per token the labeler read
label           int32                          arg-max class (-1 in ``generate`` mode)
logprobs        list<float32>                  class log-probs ``[C]`` (empty in ``generate``)
text            string                         the generated target ("" in ``score`` mode)
==============  =============================  ==========================================
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd import storage
from raykd.data.documents import Document
from raykd.soft_labels.cache import (
    CacheKey,
    cache_dir_for,
    finalize,
    open_cache,
    write_part,
)
from raykd.soft_labels.schema import META_PREFIX


@dataclass
class PseudoLabels:
    """Labels of some documents, in one order.

    Attributes:
        doc_ids: ``[N]`` document ids.
        logprobs: float32 ``[N, C]`` class log-probs (classification) or None.
        texts: ``[N]`` target texts (generation) or None.
    """

    doc_ids: list[str]
    logprobs: np.ndarray | None = None
    texts: list[str] | None = None

    @property
    def hard(self) -> np.ndarray:
        """Arg-max class ``[N]`` (classification)."""
        return self.logprobs.argmax(-1)

    def select(self, doc_ids: Sequence[str]) -> PseudoLabels:
        """The labels of ``doc_ids``, in that order.

        Raises:
            KeyError: a document without a label here.
        """
        index = {d: i for i, d in enumerate(self.doc_ids)}
        rows = [index[d] for d in doc_ids]
        return PseudoLabels(list(doc_ids), None if self.logprobs is None else self.logprobs[rows],
                            None if self.texts is None else [self.texts[i] for i in rows])

    @staticmethod
    def merge(parts: Sequence[PseudoLabels]) -> PseudoLabels:
        """One set from disjoint parts (in their order)."""
        ids = [d for p in parts for d in p.doc_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("pseudo-label parts overlap; each document must be labeled once")
        lp = np.concatenate([p.logprobs for p in parts]) if parts[0].logprobs is not None else None
        texts = [t for p in parts for t in p.texts] if parts[0].texts is not None else None
        return PseudoLabels(ids, lp, texts)


def check_verbalisers(tokenizer: Any, verbalisers: Mapping[str, str]) -> list[list[int]]:
    """Token ids of each class's verbaliser (as it follows the cue, without special tokens).

    Raises:
        ValueError: a verbaliser that is empty after tokenisation, or two classes with the same
            verbaliser tokens (they could never be told apart); the message names them.
    """
    ids, seen = [], {}
    for name, word in verbalisers.items():
        toks = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        if not toks:
            raise ValueError(f"the verbaliser of class {name!r} ({word!r}) is empty after tokenisation; give it a word")
        if tuple(toks) in seen:
            raise ValueError(f"classes {seen[tuple(toks)]!r} and {name!r} share the verbaliser {word!r} (same tokens); "
                             "give every class its own verbaliser")
        seen[tuple(toks)] = name
        ids.append(toks)
    return ids


def pick_demonstrations(gold: Sequence[Document], shots_per_class: int, seed: int) -> tuple[list[Document], list[Document]]:
    """Demonstrations (``shots_per_class`` per class, classes interleaved) and the held-out rest.

    Each class's gold documents are sorted by id and shuffled with ``random.Random(seed)``; the
    first ``shots_per_class`` are demonstrations, ordered round-robin over the classes (so no
    class is always last), the rest are held out (for choosing the labeler).

    Raises:
        ValueError: a class with fewer gold documents than ``shots_per_class``.
    """
    by_class: dict[str, list[Document]] = defaultdict(list)
    for d in gold:
        by_class[str(d.label)].append(d)
    shuffled = {}
    for name in sorted(by_class):
        members = sorted(by_class[name], key=lambda d: d.doc_id)
        random.Random(seed).shuffle(members)
        if len(members) < shots_per_class:
            raise ValueError(f"class {name!r} has {len(members)} gold examples, fewer than {shots_per_class} shots per class")
        shuffled[name] = members
    demos = [shuffled[n][i] for i in range(shots_per_class) for n in sorted(shuffled)]
    held = [d for n in sorted(shuffled) for d in shuffled[n][shots_per_class:]]
    return demos, held


def truncate(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens (decoded back to text)."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(x[:max_tokens]).strip() for x in ids]


def first_line(text: str) -> str:
    """The first non-empty line of a generated text, stripped (a generated label is one line)."""
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def classification_prompt(instruction: str, template: str, demos: Sequence[tuple[str, str]]) -> str:
    """The shared prefix: ``instruction``, then each demonstration as ``template`` filled with its
    text, followed by its verbaliser and a blank line.

    Args:
        template: one document's part, with ``{text}``, ending in the cue (e.g.
            ``"Article: {text}\\nTopic:"``).
        demos: ``(text, verbaliser)`` pairs (texts already truncated).
    """
    shots = "".join(f"{template.format(text=t)}{v}\n\n" for t, v in demos)
    return f"{instruction}\n\n{shots}" if instruction else shots


def chat_prompt(instruction: str, template: str, demos: Sequence[tuple[str, str]], text: str,
                chat: bool = True) -> list[dict[str, str]] | str:
    """A few-shot prompt for ``generate``: each demonstration a user turn (``template`` filled
    with its text) and the assistant's answer; the document last. Everything before the document
    is the same for every document. ``chat=False`` (a tokenizer without a chat template): the
    same as plain text, one ``template`` and answer line per demonstration."""
    if not chat:
        shots = "".join(f"{template.format(text=t)}\n{answer}\n\n" for t, answer in demos)
        return f"{instruction}\n\n{shots}{template.format(text=text)}\n" if instruction else f"{shots}{template.format(text=text)}\n"
    turns = [{"role": "system", "content": instruction}] if instruction else []
    for t, answer in demos:
        turns += [{"role": "user", "content": template.format(text=t)}, {"role": "assistant", "content": answer}]
    return turns + [{"role": "user", "content": template.format(text=text)}]


# --- the cache -------------------------------------------------------------------------------

def pseudo_label_schema(key: CacheKey) -> pa.Schema:
    """Arrow schema of a pseudo-label cache (see the module docstring)."""
    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("attention_mask", pa.list_(pa.uint8())),
            pa.field("label", pa.int32()),
            pa.field("logprobs", pa.list_(pa.float32())),
            pa.field("text", pa.string()),
        ],
        metadata={META_PREFIX + b"cache_key": key.digest().encode(), META_PREFIX + b"kind": b"pseudo_labels"},
    )


def pseudo_label_key(labeler: str, tokenizer_fp: str, engine: str, data_fp: str, mode: str, settings: str,
                     num_classes: int, seq_len: int) -> CacheKey:
    """The cache key of one labeling: who labeled (``labeler``: weights fingerprint, or a stage's
    chain key), the data, the mode and a fingerprint of the prompt and shots (``settings``)."""
    return CacheKey(teacher_fingerprint=labeler, tokenizer_fingerprint=tokenizer_fp, engine=engine, dtype="float32",
                    k=num_classes, temperature=1.0, data_fingerprint=data_fp, seq_len=seq_len, max_blocks_per_doc=1,
                    min_tokens=1, logprobs_mode=f"pseudo_labels:{mode}:{settings}")


def labels_dir(root: Any, key: CacheKey) -> str:
    """The folder of ``key``'s pseudo-labels under ``root``."""
    return cache_dir_for(root, key)


def has_labels(root: Any, key: CacheKey) -> bool:
    """Whether ``key``'s pseudo-labels are committed and finished under ``root``."""
    return storage.is_file(storage.join(labels_dir(root, key), "manifest.json"))


def commit_labels(root: Any, key: CacheKey, labels: PseudoLabels, tokens: Sequence[int], labeler: dict[str, Any],
                  seconds: float) -> None:
    """Commit ``labels`` as one part (:func:`~raykd.soft_labels.cache.write_part`) and finish the cache.

    Args:
        tokens: ``[N]`` tokens the labeler read per document (recorded as the attention mask).
        labeler: what labeled (recorded in the manifest).
    """
    n = len(labels.doc_ids)
    lp = labels.logprobs
    table = pa.Table.from_arrays(
        [
            pa.array(labels.doc_ids, pa.string()),
            pa.array([np.ones(int(t), np.uint8) for t in tokens], pa.list_(pa.uint8())),
            pa.array(lp.argmax(-1).astype(np.int32) if lp is not None else np.full(n, -1, np.int32)),
            pa.array([row.astype(np.float32) for row in lp] if lp is not None else [np.zeros(0, np.float32)] * n, pa.list_(pa.float32())),
            pa.array(labels.texts if labels.texts is not None else [""] * n, pa.string()),
        ],
        schema=pseudo_label_schema(key),
    )
    folder = labels_dir(root, key)
    write_part(folder, key, "all", table, part_id="all", doc_ids=labels.doc_ids, seconds=seconds)
    finalize(folder, key, ["all"], labeler, seconds)


def read_labels(root: Any, key: CacheKey) -> tuple[PseudoLabels, dict[str, Any]]:
    """The committed pseudo-labels of ``key`` and the manifest's ``teacher`` record (labeler,
    seconds, tokens).

    Raises:
        CacheError: no finished cache for ``key`` (or one written for another key).
    """
    folder = labels_dir(root, key)
    manifest = open_cache(folder, key)
    table = pa.concat_tables([pq.read_table(storage.join(folder, s["file"])) for s in manifest.shards])
    lp = table.column("logprobs").to_pylist()
    has_lp = bool(lp) and len(lp[0]) > 0
    texts = table.column("text").to_pylist()
    labels = PseudoLabels(table.column("doc_id").to_pylist(), np.asarray(lp, dtype=np.float32) if has_lp else None,
                          None if has_lp else texts)
    return labels, {**manifest.teacher, "tokens": manifest.tokens, "label_seconds": manifest.label_seconds}


# --- asking a served LLM (a Serve deployment handle of raykd.teacher.deployment) ---------------

def score_through(handle: Any, prefix: str, texts: Sequence[str], continuations: Sequence[str], *, batch_size: int,
                  in_flight: int = 2) -> tuple[np.ndarray, int]:
    """Verbaliser scores ``[N, C]`` of ``texts`` from a served LM (``score_continuations``), a
    few calls in flight; and the text tokens read."""
    pending: list[Any] = []
    parts: list[dict[str, Any]] = []
    for s in range(0, len(texts), batch_size):
        pending.append(handle.score_continuations.remote(prefix, list(texts[s : s + batch_size]), list(continuations),
                                                         batch_size=batch_size))
        while len(pending) >= in_flight or (pending and s + batch_size >= len(texts)):
            parts.append(pending.pop(0).result())
    return np.concatenate([p["scores"] for p in parts]), int(sum(p["tokens"].sum() for p in parts))


def generate_through(handle: Any, prompts: Sequence[Any], *, batch_size: int, max_new_tokens: int,
                     in_flight: int = 2) -> tuple[list[str], int]:
    """Greedy one-line completions of ``prompts`` from a served LM (``complete``: the prompts'
    shared prefix read once per call), a few calls in flight; and the new tokens written."""
    pending: list[Any] = []
    texts: list[str] = []
    new_tokens = 0
    for s in range(0, len(prompts), batch_size):
        pending.append(handle.complete.remote(list(prompts[s : s + batch_size]), max_new_tokens=max_new_tokens, batch_size=batch_size))
        while len(pending) >= in_flight or (pending and s + batch_size >= len(prompts)):
            for o in pending.pop(0).result():
                texts.append(first_line(o["text"]))
                new_tokens += len(o["token_ids"])
    return texts, new_tokens
