"""A sequence-classification teacher engine: class logits as soft labels.

Registered as ``classifier`` in :data:`raykd.teacher.engines.ENGINES`, so
``TeacherConfig(engine="classifier")`` serves it through the same
:class:`~raykd.teacher.deployment.TeacherDeployment` as the language-model teachers.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raykd.models import load_tokenizer, pick_device
from raykd.teacher.engines.base import EngineInfo, describe, validate_score_request

if TYPE_CHECKING:
    import torch


class NotAClassifierError(ValueError):
    """The model folder holds no sequence-classification head."""


MC_SCOPES = ("encoder", "head")
"""Where Monte-Carlo dropout is on: ``encoder`` every dropout of the model (the paper's MC
dropout, M full forward passes); ``head`` only the classification head's dropout on the pooled
feature (one encoder pass; a cheaper deviation from the paper)."""


def pooled_features(model, hidden_states) -> torch.Tensor:
    """The feature a sequence classifier's head reads, ``[B, H]``: BERT's pooler output (tanh
    dense on the first token) when the model has a pooler, else the first token's last hidden state.

    Args:
        model: a ``*ForSequenceClassification`` model.
        hidden_states: its ``output_hidden_states`` tuple (last entry ``[B, T, H]``).
    """
    last = hidden_states[-1]
    pooler = getattr(model.base_model, "pooler", None)
    return pooler(last) if pooler is not None else last[:, 0]


def _head(model):
    """``(dropout, classifier)`` of a BERT-like classification head, for head-only MC dropout.

    Raises:
        ValueError: the model has no ``dropout`` and ``classifier`` modules on a pooler.
    """
    dropout, classifier = getattr(model, "dropout", None), getattr(model, "classifier", None)
    if dropout is None or classifier is None or getattr(model.base_model, "pooler", None) is None:
        raise ValueError(f"head-only MC dropout needs a BERT-like classifier (pooler, dropout, classifier); "
                         f"{type(model).__name__} has none: use mc scope 'encoder'")
    return dropout, classifier


def mc_dropout_probs(model, input_ids, attention_mask, *, passes: int, scope: str = "encoder", seed: int = 0) -> dict[str, torch.Tensor]:
    """One deterministic pass and ``passes`` Monte-Carlo dropout passes of a classifier (Gal &
    Ghahramani 2016; MUKI's teacher uncertainty, M = 16 in its code).

    Args:
        model: a sequence classifier (left in eval mode).
        input_ids, attention_mask: ``[B, T]`` long tensors.
        passes: ``M``; 0 runs the deterministic pass only.
        scope: one of :data:`MC_SCOPES`.
        seed: seeds the dropout masks (the global RNG is restored afterwards).

    Returns:
        ``logits`` ``[B, C]`` (deterministic pass, raw), ``features`` ``[B, H]`` (its pooled
        feature), and with ``passes > 0`` ``mean_probs`` ``[B, C]`` (the mean over passes of
        ``softmax(logits)`` with dropout on).

    Raises:
        ValueError: a negative ``passes``, an unknown ``scope``, or ``head`` on a model without
            a BERT-like head.
    """
    import torch

    if passes < 0:
        raise ValueError(f"passes={passes} must be >= 0")
    if scope not in MC_SCOPES:
        raise ValueError(f"unknown MC dropout scope {scope!r}; valid: {', '.join(MC_SCOPES)}")
    with torch.no_grad():
        model.eval()
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        feats = pooled_features(model, out.hidden_states).float()
        result = {"logits": out.logits.float(), "features": feats}
        if passes == 0:
            return result
        total = torch.zeros_like(result["logits"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                if scope == "head":
                    dropout, classifier = _head(model)
                    dropout.train()
                    for _ in range(passes):
                        total += torch.softmax(classifier(dropout(feats.to(out.logits.dtype))).float(), -1)
                else:
                    model.train()
                    for _ in range(passes):
                        total += torch.softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
            finally:
                model.eval()
        result["mean_probs"] = total / passes
    return result


def load_classifier(model_path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a sequence-classification model (plain or saved by :func:`raykd.students.sparsify.save_dense`).

    Raises:
        FileNotFoundError: no ``config.json`` in ``model_path``.
        NotAClassifierError: the config names no classification architecture or labels
            (e.g. the bare all-MiniLM-L6-v2 encoder: fine-tune it first with
            :mod:`raykd.train.finetune`).
    """
    # lazy: keeps torch out of import time
    import json

    import torch

    from raykd.students.sparsify import load_dense

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model folder")
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or not config.get("id2label"):
        raise NotAClassifierError(
            f"{path} is not a sequence-classification model (architectures={archs}); the classifier engine "
            "needs a model with a classification head: fine-tune one first (raykd tune minidisc does it once)"
        )
    return load_dense(path).to(device=device, dtype=getattr(torch, dtype)).eval()


class ClassifierEngine:
    """Teacher engine on an ``AutoModelForSequenceClassification`` folder.

    Args:
        model_path: local model folder with a classification head.
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        num_threads: torch intra-op threads (None: every core).

    Raises:
        NotAClassifierError: the model has no classification head.
    """

    name = "classifier"

    def __init__(self, model_path: str | Path, *, dtype: str = "float32", device: str = "auto", num_threads: int | None = None) -> None:
        import torch

        self.num_threads = num_threads or os.cpu_count() or 1
        torch.set_num_threads(self.num_threads)
        self.device = pick_device(device)
        self.model_path = Path(model_path)
        self.dtype = dtype
        self.model = load_classifier(self.model_path, dtype, self.device)
        self.tokenizer = load_tokenizer(self.model_path)
        self.num_classes = int(self.model.config.num_labels)
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_seq_len = int(getattr(self.model.config, "max_position_embeddings", 512))
        self._lock = threading.Lock()
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self._info = describe(self, max_k=self.num_classes, extra={"num_classes": self.num_classes, "id2label": id2label})

    def info(self) -> EngineInfo:
        return self._info

    def validate_score_request(self, input_ids: np.ndarray, k: int, temperature: float) -> None:
        """Raise ``ValueError`` naming the problem for a request the engine cannot answer.

        Shape, context, token-id and temperature checks are the language-model engine's own;
        ``k`` must lie in ``[1, C]``.
        """
        validate_score_request(input_ids, 1, temperature, vocab_size=self.vocab_size, max_seq_len=self.max_seq_len,
                               max_k=self.vocab_size)
        if not 1 <= k <= self.num_classes:
            raise ValueError(f"k={k} must lie in [1, {self.num_classes}] (the number of classes) for this teacher")

    def score(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, k: int | None = None, temperature: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Class logits and log-probabilities for a batch.

        Args:
            input_ids: int array ``[B, T]``.
            attention_mask: 0/1 array ``[B, T]`` (1 = real token), or None for all ones.
            k: accepted for parity with the language-model engines and checked to lie in
                ``[1, C]``; classes are few, so the whole distribution is always returned.
            temperature: softmax temperature of ``class_logprobs``.

        Returns:
            ``logits`` ``[B, C]`` float32 (raw, temperature not applied) and
            ``class_logprobs`` ``[B, C]`` float32 (``log_softmax(logits / temperature)``).

        Raises:
            ValueError: empty batch, ids outside the vocabulary, too long, bad ``k`` or temperature.
        """
        import torch

        input_ids = np.asarray(input_ids)
        self.validate_score_request(input_ids, self.num_classes if k is None else k, temperature)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        with self._lock, torch.inference_mode():
            torch.set_num_threads(self.num_threads)
            ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
            am = torch.as_tensor(mask, dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, attention_mask=am).logits.float()
            logp = torch.log_softmax(logits / temperature, dim=-1)
        return {"logits": logits.cpu().numpy(), "class_logprobs": logp.cpu().numpy()}

    def score_mc(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, passes: int = 16,
                 scope: str = "encoder", seed: int = 0) -> dict[str, np.ndarray]:
        """Class logits, pooled features and Monte-Carlo dropout uncertainty for a batch (MUKI).

        Args:
            input_ids: int array ``[B, T]``; attention_mask: 0/1 ``[B, T]`` or None for all ones.
            passes: ``M`` stochastic passes with dropout on (0: the deterministic pass only).
            scope: ``encoder`` (the paper) or ``head`` (cheaper; see :data:`MC_SCOPES`).
            seed: seeds the dropout masks of this call.

        Returns:
            ``logits`` ``[B, C]`` and ``features`` ``[B, H]`` float32 (deterministic pass); with
            ``passes > 0`` also ``mean_probs`` ``[B, C]`` and ``scores`` ``[B]``
            (``1 - H(mean_probs) / log C``, :func:`raykd.losses.muki.uncertainty_score`).

        Raises:
            ValueError: what :meth:`validate_score_request` raises, a bad ``passes`` or
                ``scope``, or a one-class teacher asked for scores.
        """
        # lazy: keeps torch out of import time
        import torch

        from raykd.losses.muki import uncertainty_score

        input_ids = np.asarray(input_ids)
        self.validate_score_request(input_ids, self.num_classes, 1.0)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        with self._lock:
            torch.set_num_threads(self.num_threads)
            ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
            am = torch.as_tensor(mask, dtype=torch.long, device=self.device)
            out = mc_dropout_probs(self.model, ids, am, passes=passes, scope=scope, seed=seed)
        if "mean_probs" in out:
            out["scores"] = uncertainty_score(out["mean_probs"])
        return {k: v.cpu().numpy() for k, v in out.items()}

    def generate(self, prompts: list[Any], *, max_new_tokens: int = 64, temperature: float = 0.0, k: int = 8,
                 seed: int | None = None) -> list[dict[str, Any]]:
        """A classification teacher writes no text.

        Raises:
            NotImplementedError: always; generate with a causal-LM teacher (``hf`` or ``vllm``).
        """
        raise NotImplementedError("a classification teacher does not generate text; use an hf or vllm teacher")
