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

from raykd import console
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
        """Settle the plan of ``cfg``: reads the documents, the teacher's tokenizer and model
        config (no weights are loaded) and fingerprints the teacher's files.

        Raises:
            ValueError: a setting does not fit the data or the models (e.g. ``labels.k`` above
                the vocabulary, ``student.keep_layers`` out of range, a student with another
                tokenizer: :class:`raykd.students.VocabularyMismatchError`).
            FileNotFoundError: the data or a model cannot be found (the message says how to get it).
        """
        with console.user_errors(ValueError, FileNotFoundError):  # bad input: `raykd` prints error: ..., exits 2
            self._settle(cfg)
        self.owns_teacher = False
        """True once this run has started its teacher (e.g. a recipe's ``prepare`` step did): the
        run then stops it after labeling, so its CPUs/GPUs are free for training."""

    def _settle(self, cfg: DistillConfig) -> None:
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
        teacher_config = _model_config(self.teacher_path)
        self.vocab_size = int(teacher_config.vocab_size)
        if cfg.labels.k > self.vocab_size:
            raise ValueError(f"labels.k={cfg.labels.k} exceeds the teacher vocabulary ({self.vocab_size})")
        if cfg.student.vocab_size is not None and cfg.student.vocab_size >= self.vocab_size:
            raise ValueError(f"student.vocab_size={cfg.student.vocab_size} must be smaller than the teacher "
                             f"vocabulary ({self.vocab_size}) to compress it")
        _check_student_tokenizer(cfg, self.tokenizer_fp, self.vocab_size)
        _check_layer_drops(cfg, teacher_config)
        self.cache_root = Path(cfg.labels.cache_dir).expanduser() if cfg.labels.cache_dir else default_cache_root() / "soft_labels"
        self.keys = {"train": self.key_for(self.train_docs), "eval": self.key_for(self.eval_docs)}

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


def _model_config(model_path: Path):
    """The model's ``config.json`` as a transformers config (no weights are read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_path))


def _vocab_size(model_path: Path) -> int:
    return int(_model_config(model_path).vocab_size)


def _check_layer_drops(cfg: DistillConfig, teacher_config) -> None:
    """Every layer-dropped model of the run (the student, each chain assistant) keeps layers
    its source model has, so a bad index fails here rather than after labeling."""
    from raykd.students.build import check_keep_layers

    if cfg.student.init == "layer_drop":
        source = _model_config(resolve_model_path(cfg.student.model)) if cfg.student.model else teacher_config
        check_keep_layers(cfg.student.keep_layers, source.num_hidden_layers, "student.keep_layers",
                          "the student's source model" if cfg.student.model else "the teacher")
    for i, assistant in enumerate(cfg.chain.assistants if cfg.chain is not None else []):
        check_keep_layers(assistant.keep_layers, teacher_config.num_hidden_layers, f"chain.assistants[{i}].keep_layers", "the teacher")


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
        print("soft labels found in the cache (" + ", ".join(f"{s} {m.rows:,} rows" for s, (_, m) in caches.items())
              + f"): no teacher calls; {caches['train'][0]}")
        return caches, stats  # type: ignore[return-value]
    start = time.perf_counter()
    docs_of = {"train": plan.train_docs, "eval": plan.eval_docs}
    # One bar for every split, open while the teacher starts; each write_soft_labels counts into it.
    with console.progress("labeling", total=sum(len(docs_of[s]) for s in missing), unit="doc", rate_of="tokens"):
        handle, started = start_teacher(cfg.teacher, str(plan.teacher_path))
        info = handle.info.remote().result()
        plan.owns_teacher = started = started or plan.owns_teacher
        if not started:
            with console.user_errors(ValueError):
                check_running_teacher(info, cfg.teacher.name, plan.running_teacher_fields())
        calls_before = info["calls"]["score"]
        stats["teacher"] = {"name": cfg.teacher.name, "started_by_run": started, "engine": info["engine"], "replica": info["replica"]}
        try:
            for split in missing:
                log.info("labeling %s split: %d documents", split, len(docs_of[split]))
                caches[split] = write_soft_labels(
                    docs_of[split],
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
    """One line under the labeling bar: what was written (the details are in raykd.log)."""
    splits = []
    for split in labeled:
        _, m = caches[split]
        splits.append(f"{split} {m.rows:,} rows / {m.tokens:,} tokens ({m.bytes_per_token:.1f} B/token)")
        log.info("%s cache: %d rows, %d tokens, %d shards, %.1f B/token, %.1f s, %.0f tokens/s", split, m.rows, m.tokens,
                 len(m.shards), m.bytes_per_token, m.label_seconds, m.tokens / max(m.label_seconds, 1e-9))
    print(f"soft labels written: {', '.join(splits)}; {stats['teacher_calls']} teacher calls, {stats['label_s']:.0f} s")
