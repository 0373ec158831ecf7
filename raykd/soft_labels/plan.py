"""The labeling plan of a distill run and how its soft-label caches are found or written.

:class:`Plan` settles, before any expensive work, what a run will label: the documents of each
split, the resolved teacher and engine, the fingerprints and the cache key of each split. Every
check that can be made from the config and the model configs runs here.
:func:`ensure_soft_labels` then opens the finished caches or labels the missing splits through
the teacher deployment.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from raykd.config import DistillConfig, default_cache_root
from raykd.data import Document, load_documents, split_documents
from raykd.data.perturb import perturb_documents
from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint, weights_fingerprint
from raykd.soft_labels.cache import CacheKey, Manifest, documents_fingerprint
from raykd.teacher.engines import LOGPROBS_MODE, check_engine_request, resolve_engine
from raykd.teacher.running import check_running_teacher

log = logging.getLogger(__name__)


class Plan:
    """What a distill run will do, settled before any expensive work."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        docs = load_documents(cfg.data)
        self.train_docs, self.eval_docs = split_documents(
            docs, test_docs=cfg.data.test_docs, seed=cfg.data.split_seed, max_docs=cfg.data.max_docs
        )
        self.teacher_path = resolve_model_path(cfg.teacher.model)
        self.engine = resolve_engine(cfg.teacher)
        check_engine_request(self.engine, cfg.teacher, k=cfg.labels.k, temperature=cfg.labels.temperature)
        tokenizer = load_tokenizer(self.teacher_path)
        if cfg.data.perturb_share > 0:  # robust distillation: the teacher labels perturbed train text
            self.train_docs = perturb_documents(self.train_docs, tokenizer, cfg.data.perturb_share, cfg.data.perturb_seed)
        self.tokenizer_fp = tokenizer_fingerprint(tokenizer)
        self.weights_fp = weights_fingerprint(self.teacher_path)
        self.vocab_size = _vocab_size(self.teacher_path)
        if cfg.labels.k > self.vocab_size:
            raise ValueError(f"labels.k={cfg.labels.k} exceeds the teacher vocabulary ({self.vocab_size})")
        if cfg.student.vocab_size is not None and cfg.student.vocab_size >= self.vocab_size:
            raise ValueError(f"student.vocab_size={cfg.student.vocab_size} must be smaller than the teacher "
                             f"vocabulary ({self.vocab_size}) to compress it")
        _check_student_tokenizer(cfg, self.tokenizer_fp, self.vocab_size)
        self.cache_root = Path(cfg.labels.cache_dir).expanduser() if cfg.labels.cache_dir else default_cache_root() / "soft_labels"
        self.keys = {"train": self.key_for(self.train_docs), "eval": self.key_for(self.eval_docs)}
        self.owns_teacher = False
        """True once this run has started its teacher (e.g. a recipe's ``prepare`` step did): the
        run then stops it after labeling, so its CPUs/GPUs are free for training."""

    def key_for(self, docs: list[Document]) -> CacheKey:
        c = self.cfg
        return CacheKey(
            teacher_fingerprint=self.weights_fp,
            tokenizer_fingerprint=self.tokenizer_fp,
            engine=self.engine,
            dtype=c.teacher.dtype,
            k=c.labels.k,
            temperature=c.labels.temperature,
            data_fingerprint=documents_fingerprint(docs),
            seq_len=c.data.seq_len,
            max_blocks_per_doc=c.data.max_blocks_per_doc,
            min_tokens=c.data.min_tokens,
            logprobs_mode=LOGPROBS_MODE,
        )

    def set_train_docs(self, docs: list[Document]) -> None:
        """Train on ``docs`` instead (e.g. teacher generations); the train cache key follows."""
        self.train_docs = docs
        self.keys["train"] = self.key_for(docs)

    def running_teacher_fields(self) -> dict[str, Any]:
        """What a running teacher must match to label for this plan (see
        :func:`raykd.teacher.running.check_running_teacher`)."""
        return {"weights_fingerprint": self.weights_fp, "tokenizer_fingerprint": self.tokenizer_fp,
                "engine": self.engine, "dtype": self.cfg.teacher.dtype}

    def teacher_meta(self) -> dict[str, Any]:
        return {"model": self.cfg.teacher.model, "path": str(self.teacher_path), "weights_fingerprint": self.weights_fp,
                "tokenizer_fingerprint": self.tokenizer_fp, "engine": self.engine, "dtype": self.cfg.teacher.dtype}


def _vocab_size(model_path: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(model_path)).vocab_size)


def _check_student_tokenizer(cfg: DistillConfig, teacher_tok_fp: str, teacher_vocab: int) -> None:
    """A ``pretrained`` student must share the teacher's tokenizer (checked on tokenizers only)."""
    if cfg.student.init != "pretrained":
        return
    from raykd.students import check_same_vocabulary

    if cfg.student.model is None:
        raise ValueError("student.init=pretrained needs student.model")
    path = resolve_model_path(cfg.student.model)
    check_same_vocabulary(teacher_tok_fp, tokenizer_fingerprint(load_tokenizer(path)), teacher_vocab, _vocab_size(path))


def ensure_soft_labels(plan: Plan) -> tuple[dict[str, tuple[Path, Manifest]], dict[str, Any]]:
    """Open or write the caches of both splits; start the teacher only if a split is missing.

    Returns:
        ``({split: (folder, manifest)}, stats)`` with ``stats`` = ``hit`` (every split found),
        ``teacher_calls`` and ``label_s``.
    """
    from raykd.soft_labels.pipeline import find_cache, write_soft_labels
    from raykd.teacher.deployment import start_teacher

    from raykd.soft_labels.cache import open_cache

    cfg = plan.cfg
    caches = {split: find_cache(plan.cache_root, key) for split, key in plan.keys.items()}
    if cfg.labels.train_cache:
        folder = Path(cfg.labels.train_cache).expanduser()
        caches["train"] = (folder, open_cache(folder, expect=plan.keys["train"], deep=True))
    missing = [split for split, found in caches.items() if found is None]
    stats: dict[str, Any] = {"hit": not missing, "teacher_calls": 0, "label_s": 0.0, "teacher": None}
    if not missing:
        release_teacher(plan)
        return caches, stats  # type: ignore[return-value]
    start = time.perf_counter()
    handle, started = start_teacher(cfg.teacher, str(plan.teacher_path))
    info = handle.info.remote().result()
    plan.owns_teacher = started = started or plan.owns_teacher
    if not started:
        check_running_teacher(info, plan)
    calls_before = info["calls"]["score"]
    stats["teacher"] = {"name": cfg.teacher.name, "started_by_run": started, "engine": info["engine"], "replica": info["replica"]}
    try:
        for split in missing:
            docs = plan.train_docs if split == "train" else plan.eval_docs
            log.info("labeling %s split: %d documents", split, len(docs))
            caches[split] = write_soft_labels(
                docs,
                key=plan.keys[split],
                cache_root=plan.cache_root,
                app_name=cfg.teacher.name,
                tokenizer_path=str(plan.teacher_path),
                vocab_size=plan.vocab_size,
                data=cfg.data,
                labels=cfg.labels,
                teacher_meta=plan.teacher_meta(),
            )
        stats["teacher_calls"] = handle.info.remote().result()["calls"]["score"] - calls_before
    finally:
        release_teacher(plan)
    stats["label_s"] = time.perf_counter() - start
    _print_labeling(caches, missing, stats)
    return caches, stats  # type: ignore[return-value]


def release_teacher(plan: Plan) -> None:
    """Stop the teacher this run started (unless ``keep_alive``), so training gets its CPUs/GPUs."""
    if plan.owns_teacher and not plan.cfg.teacher.keep_alive:
        from raykd.teacher.deployment import stop_teacher

        stop_teacher(plan.cfg.teacher.name)
        plan.owns_teacher = False


def _print_labeling(caches: dict[str, Any], labeled: list[str], stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"soft labels ({stats['teacher_calls']} teacher calls, {stats['label_s']:.0f} s)")
    for col in ("split", "rows", "tokens", "shards", "B/token", "label s", "tokens/s"):
        table.add_column(col, justify="right")
    for split in labeled:
        _, m = caches[split]
        table.add_row(split, str(m.rows), str(m.tokens), str(len(m.shards)), f"{m.bytes_per_token:.1f}",
                      f"{m.label_seconds:.1f}", f"{m.tokens / max(m.label_seconds, 1e-9):.0f}")
    Console().print(table)
