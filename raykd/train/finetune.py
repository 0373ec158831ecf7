"""Fine-tune an encoder (all-MiniLM-L6-v2 by default) into a topic-classification teacher, once.

The result is a normal ``save_pretrained`` folder in the user cache,
``<cache>/models/classifier-<key>``, where the key hashes everything that changes the weights
(base weights, the training articles, labels, ``T`` and the optimisation settings): a second
run with the same settings finds the folder and trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from raykd.config import default_cache_root
from raykd.data.documents import Document
from raykd.models import load_tokenizer, new_classifier, resolve_model_path, weights_fingerprint
from raykd.config import ClassifierTeacherConfig
from raykd.soft_labels.cache import documents_fingerprint
from raykd.train.local import train_classifier

log = logging.getLogger(__name__)


def tokenize_documents(tokenizer, docs: Sequence[Document], labels: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """``doc_id`` [N], ``input_ids`` / ``attention_mask`` int64 [N, T] (truncated, right-padded),
    ``label`` int64 [N] (index into ``labels``; -1 for a document without a known label)."""
    enc = tokenizer([d.text for d in docs], truncation=True, max_length=seq_len, padding="max_length", return_tensors="np")
    index = {name: i for i, name in enumerate(labels)}
    return {
        "doc_id": np.asarray([d.doc_id for d in docs], dtype=object),
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
        "label": np.asarray([index.get(d.label, -1) for d in docs], dtype=np.int64),
    }


def finetune_key(cfg: ClassifierTeacherConfig, base: Path, train: Sequence[Document], labels: Sequence[str], seq_len: int) -> str:
    """Hex key of a fine-tuning run (24 characters)."""
    blob = json.dumps(
        {
            "base": weights_fingerprint(base),
            "data": documents_fingerprint(train),
            "labels": list(labels),
            "seq_len": seq_len,
            **cfg.model_dump(include={"steps", "batch_size", "lr", "weight_decay", "freeze_embeddings", "seed"}),
            # the epoch budget and schedule, only when set (older caches keep their keys)
            **({"epochs": cfg.epochs, "schedule": cfg.schedule, "warmup_share": cfg.warmup_share}
               if (cfg.epochs, cfg.schedule, cfg.warmup_share) != (None, "constant", 0.0) else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def finetune_classifier(
    cfg: ClassifierTeacherConfig, train: Sequence[Document], labels: Sequence[str], seq_len: int, cache_root: Path | None = None
) -> Path:
    """The fine-tuned classifier folder for these settings, training it first if it is not cached.

    Args:
        cfg: base model and optimisation settings.
        train: training articles (``label`` set to one of ``labels``).
        labels: class names, in class-index order.
        seq_len: tokens per article ``T``.

    Returns:
        The model folder (``config.json`` with ``id2label``, ``model.safetensors``, tokenizer).

    Raises:
        ValueError: a training article has no label among ``labels``.
        FileNotFoundError: the base model cannot be found.
    """
    base = resolve_model_path(cfg.base_model)
    root = (cache_root or default_cache_root()) / "models"
    out = root / f"classifier-{finetune_key(cfg, base, train, labels, seq_len)}"
    if (out / "config.json").is_file():
        log.info("fine-tuned teacher found in %s", out)
        return out
    tokenizer = load_tokenizer(base)
    data = tokenize_documents(tokenizer, train, labels, seq_len)
    if (data["label"] < 0).any():
        bad = data["doc_id"][data["label"] < 0][:3].tolist()
        raise ValueError(f"training articles without a label among {list(labels)}: {bad}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    model = new_classifier(base, list(labels))
    if cfg.freeze_embeddings:  # no gradients for them at all (faster on CPU), not only no updates
        model.get_input_embeddings().weight.requires_grad_(False)
    t0 = time.time()
    steps = cfg.steps if cfg.epochs is None else max(1, int(np.ceil(cfg.epochs * len(train) / cfg.batch_size)))

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % 10 == 0 or step == steps:
            log.info("fine-tune step %d/%d loss %.4f (%.0f s)", step, steps, metrics["loss"], time.time() - t0)

    train_classifier(model, data, {"ce": 1.0}, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     weight_decay=cfg.weight_decay, seed=cfg.seed, freeze_embeddings=cfg.freeze_embeddings,
                     max_grad_norm=None, on_step=on_step, schedule=cfg.schedule, warmup=round(cfg.warmup_share * steps))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "raykd_finetune.json").write_text(json.dumps({"base": str(base), "seconds": time.time() - t0, "steps_run": steps, **cfg.model_dump()}, indent=2))
    try:
        os.rename(tmp, out)
    except OSError:  # another run finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
