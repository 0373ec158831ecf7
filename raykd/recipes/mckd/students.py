"""MCKD's students for both tasks: what a document is to the student, how a student trains on
pseudo-labels (the shared Objective and step loop), and how its checkpoint is chosen.

- ``classification``: all-MiniLM-L6-v2 plus a fresh head; hard labels train with ``ce``, soft
  relabels (the ablation) with ``forward_kl`` to the labels' distribution
  (:func:`raykd.train.local.train_classifier`); the checkpoint with the best accuracy against
  the other half's pseudo-labels is kept.
- ``generation``: a layer-dropped SmolLM2 learns body -> headline with ``ce`` on the target
  tokens (:func:`raykd.train.seq2seq.train_on_pairs`); the checkpoint with the best ROUGE-L
  against the other half's pseudo-headlines is kept.

A trained student is a model folder (``save_pretrained``) with ``done.json``; a folder with it is
reused, never retrained, so a killed stage resumes at its first unfinished student.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raykd.data.documents import Document
from raykd.models import load_causal_lm, new_classifier, resolve_model_path
from raykd.recipes.mckd.config import MckdConfig
from raykd.recipes.mckd.prepare import hard_labels, headline_and_body
from raykd.soft_labels.pseudo_labels import PseudoLabels, truncate

log = logging.getLogger(__name__)

DONE = "done.json"
HEADLINE_CUE = "\nHeadline:"


@dataclass
class Task:
    """How documents meet the students of one run.

    Attributes:
        cfg: the run's config.
        classes: the label space (classification), in the verbalisers' order.
        tokenizer: the students' tokenizer.
    """

    cfg: MckdConfig
    classes: list[str]
    tokenizer: Any

    @property
    def generation(self) -> bool:
        return self.cfg.task == "generation"

    @property
    def engine(self) -> str:
        """The engine a trained student is served on when it labels."""
        return "hf" if self.generation else "classifier"

    def gold(self, docs: Sequence[Document]) -> PseudoLabels:
        """The true labels of ``docs`` (gold rows, and the test metric): one-hot log-probs, or
        the real headlines."""
        ids = [d.doc_id for d in docs]
        if self.generation:
            return PseudoLabels(ids, texts=[headline_and_body(d)[0] for d in docs])
        return hard_labels(ids, np.array([self.classes.index(str(d.label)) for d in docs]), len(self.classes))

    def prompts(self, docs: Sequence[Document]) -> list[str]:
        """Generation: each body cut to ``data.seq_len`` tokens, then the cue."""
        bodies = truncate(self.tokenizer, [headline_and_body(d)[1] for d in docs], self.cfg.data.seq_len)
        return [b + HEADLINE_CUE for b in bodies]

    def rows(self, docs: Sequence[Document]) -> list[dict[str, Any]]:
        """What a served student reads per document (:func:`raykd.soft_labels.relabel.relabel`)."""
        if self.generation:
            return [{"doc_id": d.doc_id, "prompt": p} for d, p in zip(docs, self.prompts(docs))]
        data = self._class_data(docs)
        return [{"doc_id": d.doc_id, "input_ids": data["input_ids"][i], "attention_mask": data["attention_mask"][i]}
                for i, d in enumerate(docs)]

    def _class_data(self, docs: Sequence[Document]) -> dict[str, np.ndarray]:
        # lazy: keeps torch out of import time
        from raykd.train.finetune import tokenize_documents

        return tokenize_documents(self.tokenizer, docs, self.classes, self.cfg.data.seq_len)

    def score(self, labels: PseudoLabels, truth: PseudoLabels) -> dict[str, float]:
        """``labels`` against ``truth`` (same documents): accuracy and macro-F1, or ROUGE-L."""
        truth = truth.select(labels.doc_ids)
        if self.generation:
            # lazy: keeps torch out of import time
            from raykd.train.seq2seq import mean_rouge_l

            return {"rouge_l": mean_rouge_l(labels.texts, truth.texts)}
        return {"accuracy": float((labels.hard == truth.hard).mean()), "macro_f1": macro_f1(labels.hard, truth.hard, len(self.classes))}

    def per_item(self, labels: PseudoLabels, truth: PseudoLabels) -> np.ndarray:
        """Each document's score ``[N]`` against ``truth``: 0/1 correctness, or ROUGE-L (the
        items a bootstrap interval resamples)."""
        truth = truth.select(labels.doc_ids)
        if self.generation:
            # lazy: keeps torch out of import time
            from raykd.train.seq2seq import rouge_l

            return np.array([rouge_l(p, t) for p, t in zip(labels.texts, truth.texts)])
        return (labels.hard == truth.hard).astype(np.float64)

    def agreement(self, labels: PseudoLabels, reference: PseudoLabels) -> float:
        """The validation score of a stage student: accuracy, or ROUGE-L, against pseudo-labels."""
        return next(iter(self.score(labels, reference).values()))

    # --- training -----------------------------------------------------------------------

    def train(self, docs: Sequence[Document], labels: PseudoLabels, val: tuple[Sequence[Document], PseudoLabels] | None,
              seed: int, folder: Path) -> dict[str, Any]:
        """Train one student on ``labels`` of ``docs`` (or reuse a finished ``folder``).

        Args:
            val: documents and pseudo-labels that choose the checkpoint (None: the last one).
            seed: head initialisation and batch order.
            folder: where the student is saved (with ``done.json``).

        Returns:
            What ``done.json`` records: ``val_score``, ``best_step``, ``seconds``, ``reused``.
        """
        done = folder / DONE
        if done.is_file():
            return {**json.loads(done.read_text()), "reused": True}
        import torch

        torch.manual_seed(seed)
        torch.set_num_threads(self.cfg.student.num_threads)
        t0 = time.time()
        labels = labels.select([d.doc_id for d in docs])
        if val is not None and self.cfg.student.val_docs is not None and len(val[0]) > self.cfg.student.val_docs:
            pick = np.sort(np.random.default_rng(seed).choice(len(val[0]), self.cfg.student.val_docs, replace=False))
            val = ([list(val[0])[i] for i in pick], val[1])
        model, info = (self._train_lm if self.generation else self._train_classifier)(docs, labels, val, seed)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        info = {**info, "seconds": round(time.time() - t0, 1), "train_docs": len(docs)}
        done.write_text(json.dumps(info))
        return {**info, "reused": False}

    def budget(self, n_docs: int) -> tuple[int, int]:
        """``(steps, eval_every)`` of a student on ``n_docs`` articles
        (:func:`raykd.train.local.epoch_budget`)."""
        # lazy: keeps torch out of import time
        from raykd.train.local import epoch_budget

        st = self.cfg.student
        return epoch_budget(n_docs, st.batch_size, st.epochs, st.evals_per_epoch, st.steps, st.eval_every)

    def _selector(self, model, val, predict, steps: int, every: int) -> tuple[Any, dict[str, Any]]:
        """An ``on_step`` that scores the model on ``val`` every ``every`` steps (and at the
        end, step ``steps``) and keeps the best state (ties: the earlier check)."""
        best: dict[str, Any] = {"val_score": None, "best_step": steps, "state": None, "steps": steps, "checks": []}

        def on_step(step: int, _metrics: dict[str, float]) -> None:
            if val is None or (step % every and step != steps):
                return
            score = self.agreement(predict(model, val[0]), val[1].select([d.doc_id for d in val[0]]))
            best["checks"].append([step, round(score, 4)])
            if best["val_score"] is None or score > best["val_score"]:
                best.update(val_score=score, best_step=step, state=copy.deepcopy(model.state_dict()))
            model.train()

        return on_step, best

    def _train_classifier(self, docs, labels: PseudoLabels, val, seed: int):
        # lazy: keeps torch out of import time
        from raykd.train.local import train_classifier

        st = self.cfg.student
        model = new_classifier(resolve_model_path(st.base_model), list(self.classes))
        data = {**self._class_data(docs), "label": labels.hard}
        weights = {"ce": 1.0}
        if self.cfg.soft_relabel:
            data["teacher_logits"] = labels.logprobs  # log-probs: softmax gives back the labels' distribution
            weights = {"forward_kl": 1.0}
        steps, every = self.budget(len(docs))
        on_step, best = self._selector(model, val, self._predict_classes, steps, every)
        losses = train_classifier(model, data, weights, steps=steps, batch_size=st.batch_size, lr=st.lr, seed=seed,
                                  freeze_embeddings=st.freeze_embeddings, on_step=on_step, schedule=st.schedule,
                                  warmup=round(st.warmup_share * steps), balanced=st.balanced)
        if best["state"] is not None:
            model.load_state_dict(best.pop("state"))
        best.pop("state", None)
        return model.eval(), {**best, "final_loss": round(losses[-1], 5)}

    def _predict_classes(self, model, docs) -> PseudoLabels:
        # lazy: keeps torch out of import time
        import torch

        from raykd.train.local import class_batch
        from raykd.train.step import classifier_logits

        data = self._class_data(docs)
        model.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(docs), self.cfg.student.eval_batch_size):
                b = class_batch(data, np.arange(s, min(s + self.cfg.student.eval_batch_size, len(docs))))
                out.append(torch.log_softmax(classifier_logits(model, b.inputs)[:, 0].float(), -1).numpy())
        return PseudoLabels([d.doc_id for d in docs], np.concatenate(out))

    def _train_lm(self, docs, labels: PseudoLabels, val, seed: int):
        # lazy: keeps torch out of import time
        from raykd.students.build import layer_drop
        from raykd.train.seq2seq import pair_rows, train_on_pairs

        st, data = self.cfg.student, self.cfg.data
        model = load_causal_lm(resolve_model_path(st.base_model))
        if st.keep_layers is not None:
            model = layer_drop(model, st.keep_layers)
        if st.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        rows = pair_rows(self.tokenizer, self.prompts(docs), labels.texts, prompt_tokens=data.seq_len + 8,
                         target_tokens=data.target_tokens)
        steps, every = self.budget(len(docs))
        on_step, best = self._selector(model, val, self._predict_texts, steps, every)
        losses = train_on_pairs(model, rows, steps=steps, batch_size=st.batch_size, lr=st.lr, seed=seed, on_step=on_step)
        if best["state"] is not None:
            model.load_state_dict(best.pop("state"))
        best.pop("state", None)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model.eval(), {**best, "final_loss": round(losses[-1], 5)}

    def _predict_texts(self, model, docs) -> PseudoLabels:
        # lazy: keeps torch out of import time
        from raykd.train.seq2seq import greedy_texts

        texts = greedy_texts(model, self.tokenizer, self.prompts(docs), max_new_tokens=self.cfg.data.target_tokens,
                             batch_size=self.cfg.student.eval_batch_size)
        return PseudoLabels([d.doc_id for d in docs], texts=texts)


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    """Macro-F1: the mean over the classes present in ``gold`` or ``pred`` of each class's F1."""
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp, fn = int(((pred == c) & (gold != c)).sum()), int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0
