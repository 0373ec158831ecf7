"""MCKD's pseudo-labels: the LLM asked through the teacher service, its prompt chosen on the
held-out gold examples, every answer cached by key.

The LLM runs as a served teacher (:func:`raykd.teacher.apps.start_teacher`, engine
``hf``), started only when some labeling is not cached yet. Each labeling (a candidate prompt on
the held-out gold examples, the content-free input, the unlabeled articles, the test articles)
is one cache (:mod:`raykd.soft_labels.pseudo_labels`) keyed by the LLM's fingerprints, the
mode, the prompt and shots, and the documents. ``score`` caches hold the raw verbaliser sums;
calibration is applied on reading (it needs only the content-free row), so both calibration
candidates share one labeling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raykd.cluster import connect
from raykd.config import TeacherConfig, default_cache_root
from raykd.data.documents import Document
from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint, weights_fingerprint
from raykd.recipes.mckd.config import MckdConfig
from raykd.recipes.mckd.prepare import headline_and_body
from raykd.recipes.mckd.students import Task
from raykd.soft_labels.cache import documents_fingerprint, fingerprint
from raykd.soft_labels.pseudo_labels import (
    PseudoLabels,
    chat_prompt,
    classification_prompt,
    commit_labels,
    generate_through,
    has_labels,
    pick_demonstrations,
    pseudo_label_key,
    read_labels,
    score_through,
    truncate,
)
from raykd.teacher.engines.continuations import calibrate

log = logging.getLogger(__name__)

CONTENT_FREE_ID = "__content_free__"


@dataclass
class Choice:
    """The chosen prompt: ``shots``, ``calibrate``, and every candidate's held-out score."""

    shots: int
    calibrate: bool
    candidates: list[dict[str, Any]]


class LLMLabeler:
    """The few-shot LLM labeler of one run (lazily served; every labeling cached).

    Args:
        cfg: the run's config; classes: the label space (verbalisers' order).
        gold: the gold articles (demonstrations and held-out choice).
        stats: updated with ``llm_calls``, ``label_s``, ``label_tokens`` (document tokens read),
            ``new_tokens`` (generated), ``cache_hits``, ``cache_misses``, and
            ``recorded_label_s`` / ``recorded_label_tokens``: the labeling seconds and document
            tokens of every labeling used, as recorded in the caches (the same on a rerun).
    """

    def __init__(self, cfg: MckdConfig, classes: list[str], gold: Sequence[Document], stats: dict[str, Any]):
        self.cfg, self.lc, self.classes, self.gold, self.stats = cfg, cfg.labeler, classes, list(gold), stats
        self.path = resolve_model_path(self.lc.model)
        self.tokenizer = load_tokenizer(self.path)
        self.fps = (weights_fingerprint(self.path), tokenizer_fingerprint(self.tokenizer))

        self.root = Path(self.lc.cache_dir).expanduser() if self.lc.cache_dir else default_cache_root() / "pseudo_labels"
        self.handle = None
        self.generation = cfg.task == "generation"
        self.per_class = max(self.lc.shots) if not self.generation else -(-max(self.lc.shots) // len(classes))
        self.held_out = pick_demonstrations(self.gold, self.per_class, self.lc.seed)[1]

    # --- prompts ---------------------------------------------------------------------------

    def demonstrations(self, shots: int) -> list[Document]:
        """The demonstrations of a candidate (``score``: per class; ``generate``: in all), never
        one of :attr:`held_out`."""
        if self.generation:
            return pick_demonstrations(self.gold, self.per_class, self.lc.seed)[0][:shots]
        return pick_demonstrations(self.gold, shots, self.lc.seed)[0]

    def _prefix(self, shots: int) -> str:
        demos = self.demonstrations(shots)
        texts = truncate(self.tokenizer, [d.text for d in demos], self.lc.demo_tokens)
        return classification_prompt(self.lc.instruction, self.lc.template,
                                     [(t, self.lc.verbalisers[str(d.label)]) for t, d in zip(texts, demos)])

    def _chat_demos(self, shots: int) -> list[tuple[str, str]]:
        demos = self.demonstrations(shots)
        heads, bodies = zip(*(headline_and_body(d) for d in demos)) if demos else ((), ())
        return list(zip(truncate(self.tokenizer, list(bodies), self.lc.demo_tokens), heads))

    # --- labeling --------------------------------------------------------------------------

    def _serve(self):
        if self.handle is None:
            # lazy: keeps ray out of import time
            from raykd.teacher.apps import start_teacher

            connect(self.cfg.ray)  # Ray starts only when the LLM must be asked
            tc = TeacherConfig(name=self.lc.name, model=str(self.path), engine="hf", device="cpu", num_threads=self.lc.num_threads,
                               num_cpus=self.lc.num_cpus, max_batch_size=self.lc.batch_size)
            self.handle, _ = start_teacher(tc, str(self.path))
        return self.handle

    def close(self) -> None:
        """Stop the served LLM if this labeler started it."""
        if self.handle is not None:
            # lazy: keeps ray out of import time
            from raykd.teacher.apps import stop_teacher

            stop_teacher(self.lc.name)
            self.handle = None

    def raw(self, shots: int, docs: Sequence[Document]) -> PseudoLabels:
        """The LLM's raw answers for ``docs`` with ``shots`` demonstrations, from the cache or
        the served LLM: summed verbaliser log-probs ``[N, C]`` (``score``) or one-line texts."""
        lc = self.lc
        texts = truncate(self.tokenizer, [headline_and_body(d)[1] if self.generation else d.text for d in docs], lc.doc_tokens)
        texts = [lc.content_free if d.doc_id == CONTENT_FREE_ID else t for d, t in zip(docs, texts)]
        if self.generation:
            demos = self._chat_demos(shots)
            settings = {"chat": demos, "instruction": lc.instruction, "template": lc.template, "max_new_tokens": lc.max_new_tokens}
        else:
            prefix, conts = self._prefix(shots), list(lc.verbalisers.values())
            settings = {"prefix": prefix, "template": lc.template, "verbalisers": conts}
        key = pseudo_label_key(self.fps[0], self.fps[1], "hf", documents_fingerprint(docs), lc.mode,
                               fingerprint({**settings, "doc_tokens": lc.doc_tokens}), 0 if self.generation else len(self.classes),
                               lc.doc_tokens)
        if has_labels(self.root, key):
            labels, record = read_labels(self.root, key)
            self.stats["cache_hits"] += 1
            self.stats["recorded_label_s"] += record["label_seconds"]
            self.stats["recorded_label_tokens"] += record["tokens"]
            return labels
        self.stats["cache_misses"] += 1
        handle, t0 = self._serve(), time.time()
        ids = [d.doc_id for d in docs]
        if self.generation:
            chat = getattr(self.tokenizer, "chat_template", None) is not None
            prompts = [chat_prompt(lc.instruction, lc.template, demos, t, chat) for t in texts]
            out, new_tokens = generate_through(handle, prompts, batch_size=lc.batch_size, max_new_tokens=lc.max_new_tokens)
            self.stats["new_tokens"] += new_tokens
            labels = PseudoLabels(ids, texts=out)
            per_doc = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        else:
            cues = [lc.template.format(text=t) for t in texts]
            scores, _ = score_through(handle, prefix, cues, conts, batch_size=lc.batch_size)
            labels = PseudoLabels(ids, scores)
            per_doc = [len(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in cues]
        seconds = time.time() - t0
        self.stats["llm_calls"] += -(-len(docs) // lc.batch_size)
        self.stats["label_s"] += seconds
        self.stats["label_tokens"] += sum(per_doc)
        self.stats["recorded_label_s"] += seconds
        self.stats["recorded_label_tokens"] += sum(per_doc)
        commit_labels(self.root, key, labels, per_doc, {"model": str(self.path), "weights_fingerprint": self.fps[0], "shots": shots,
                                                        "mode": lc.mode, "seconds": round(seconds, 2)}, seconds)
        log.info("LLM labeled %d documents (%d shots) in %.1f s", len(docs), shots, seconds)
        return labels

    def labels(self, choice: Choice, docs: Sequence[Document]) -> PseudoLabels:
        """Pseudo-labels of ``docs`` under ``choice``: calibrated class log-probs, or texts."""
        raw = self.raw(choice.shots, docs)
        if self.generation:
            return raw
        cf = self.raw(choice.shots, [Document(CONTENT_FREE_ID, self.lc.content_free)]).logprobs[0] if choice.calibrate else None
        return PseudoLabels(raw.doc_ids, calibrate(raw.logprobs, cf))

    def choose(self, score) -> Choice:
        """The candidate (shots x calibration) with the best score on the held-out gold examples
        (ties: the earlier candidate, fewer shots first); a single candidate is taken as it is.

        Args:
            score: ``(labels, truth) -> float`` (accuracy, or ROUGE-L).
        """
        options = [(shots, cal) for shots in sorted(self.lc.shots) for cal in ([False] if self.generation else self.lc.calibration)]
        if len(options) == 1:  # nothing to choose: the held-out gold examples are not labeled
            return Choice(*options[0], [{"shots": options[0][0], "calibrate": options[0][1], "held_out": None}])
        truth = Task(self.cfg, self.classes, self.tokenizer).gold(self.held_out)
        cands = []
        for shots in sorted(self.lc.shots):
            for cal in ([False] if self.generation else self.lc.calibration):
                c = Choice(shots, cal, [])
                cands.append({"shots": shots, "calibrate": cal, "held_out": score(self.labels(c, self.held_out), truth)})
        best = max(cands, key=lambda c: c["held_out"])  # max keeps the first of equals
        log.info("labeler choice: %s (held-out %d gold)", best, len(self.held_out))
        return Choice(best["shots"], best["calibrate"], cands)


def class_histogram(labels: PseudoLabels, num_classes: int) -> list[int]:
    """How many documents each class got (the labeler's lean)."""
    return np.bincount(labels.hard, minlength=num_classes).tolist()
