"""The main job: served teacher -> keyed soft-label cache -> Ray Train students -> report.

Order of work (every check that can fail runs before the first teacher forward or training step):

1. load and split the text by document; resolve the teacher; fingerprint weights and tokenizer;
   check the student's tokenizer; compute the cache keys of the train and eval splits;
2. for each split, open the finished cache for its key (a hit asks the teacher nothing) or start
   (or reuse) the teacher deployment and label the split into a new cache;
3. build the initial student and train one student per ``train.students`` entry on Ray Train;
4. evaluate the teacher (from the cache), the untrained student and each trained student on the
   held-out split; write ``report.json``, ``report.md`` and ``loss_curves.png``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from raykd.config import DistillConfig, default_cache_root
from raykd.data import Document, load_documents, split_documents
from raykd.data.perturb import perturb_documents
from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint, weights_fingerprint
from raykd.soft_labels.cache import CacheKey, Manifest, documents_fingerprint, shard_paths
from raykd.teacher.engine import LOGPROBS_MODE, check_engine_request, resolve_engine

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

    def teacher_meta(self) -> dict[str, Any]:
        return {"model": self.cfg.teacher.model, "path": str(self.teacher_path), "weights_fingerprint": self.weights_fp,
                "tokenizer_fingerprint": self.tokenizer_fp, "engine": self.engine, "dtype": self.cfg.teacher.dtype}


def check_running_teacher(info: dict[str, Any], plan: Plan) -> None:
    """Refuse to label through a running teacher (reused by name) that is not the run's teacher.

    Raises:
        ValueError: the running teacher's weights, tokenizer, engine or dtype differ from what
            the run's cache key says (the message names each field).
    """
    want = {"weights_fingerprint": plan.weights_fp, "tokenizer_fingerprint": plan.tokenizer_fp,
            "engine": plan.engine, "dtype": plan.cfg.teacher.dtype}
    diff = {f: (info.get(f), v) for f, v in want.items() if info.get(f) != v}
    if diff:
        detail = ", ".join(f"{f}: running {a!r}, run wants {b!r}" for f, (a, b) in diff.items())
        raise ValueError(f"the running teacher {plan.cfg.teacher.name!r} is not this run's teacher ({detail}); "
                         "use another teacher.name or `raykd teacher down` it")


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


def run_distill(cfg: DistillConfig, output_dir: Path, prepare: Callable[[Plan], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the main job and write its report into ``output_dir``.

    ``prepare`` (used by recipes built on this one, e.g. sequence-level KD) runs once Ray is
    connected and before the soft labels: it may replace the plan's training documents (through
    :meth:`Plan.set_train_docs`) and returns a dict stored in the report under ``prepare``.

    Returns:
        The report (also written as ``report.json``); see the README for its fields.

    Raises:
        raykd.config.ConfigError, ValueError, FileNotFoundError: bad input, before any compute.
        raykd.soft_labels.cache.CacheError: a cache for this key exists but is corrupt.
    """
    from raykd.cluster import connect
    from raykd.report import print_table, write_report
    from raykd.students import build_student
    from raykd.students.vocab import compress_student_folder
    from raykd.train.trainer import train_student

    from raykd.recipes.multi_teacher import extra_teacher_plans, prepare_teachers

    t0 = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    plan = Plan(cfg)
    extra_plans = extra_teacher_plans(cfg, plan)  # [] for one teacher; tokenizers checked here
    log.info("train docs %d, eval docs %d, cache keys %s", len(plan.train_docs), len(plan.eval_docs),
             {s: k.digest() for s, k in plan.keys.items()})
    connect(cfg.ray)
    prepared = prepare(plan) if prepare is not None else None
    caches, label_stats = ensure_soft_labels(plan)
    train_dir, train_manifest = caches["train"]
    eval_dir, eval_manifest = caches["eval"]
    train_files, eval_files = shard_paths(train_dir, train_manifest), shard_paths(eval_dir, eval_manifest)
    teachers, teachers_report = None, {}
    if extra_plans:
        train_files, teachers, teachers_report = prepare_teachers(cfg, plan, caches, extra_plans, output_dir)

    init_dir = build_student(cfg.student, plan.teacher_path, output_dir / "student_init")
    if cfg.student.vocab_size is not None:
        compress_student_folder(init_dir, shard_paths(train_dir, train_manifest), cfg.student.vocab_size)
    t_train = time.perf_counter()
    results = {name: train_student(name, student_path=init_dir, shard_files=train_files, weights=weights,
                                   temperature=cfg.labels.temperature, cfg=cfg.train,
                                   storage_path=output_dir / "ray_train", teachers=teachers)
               for name, weights in cfg.train.students.items()}
    train_s = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    report = evaluate_students(cfg, plan, init_dir, results, eval_files, output_dir)
    report.update(teachers_report)
    if prepared is not None:
        report["prepare"] = prepared
    eval_s = time.perf_counter() - t_eval
    report["cache"] = _cache_report(cfg, (train_dir, train_manifest), (eval_dir, eval_manifest), label_stats)
    report["data"] = {"train_docs": len(plan.train_docs), "eval_docs": len(plan.eval_docs), "seq_len": cfg.data.seq_len}
    report["timings"] = {"label_s": label_stats["label_s"], "train_s": train_s, "eval_s": eval_s, "total_s": time.perf_counter() - t0}
    write_report(report, output_dir, {name: res.history for name, res in results.items()})
    print_table(report)
    return report


def evaluate_students(cfg: DistillConfig, plan: Plan, init_dir: Path, results: dict[str, Any], eval_files: list[str],
                      output_dir: Path) -> dict[str, Any]:
    """The report's model entries: the teacher, the untrained student and every trained student on
    the held-out soft labels (perplexity of the real tokens, top-1 agreement with the teacher);
    each trained student is exported as a servable folder under ``output_dir/students/<name>``."""
    from raykd.train.evaluate import evaluate_folder, teacher_metrics

    n_student = _param_count(init_dir)
    report: dict[str, Any] = {
        "run_name": cfg.run_name,
        "method": cfg.method,
        "students": list(results),
        "teacher": {**teacher_metrics(eval_files), "model": cfg.teacher.model, "params": _param_count(plan.teacher_path)},
        "student_init": {**evaluate_folder(init_dir, eval_files, cfg.eval.batch_size), "params": n_student, "steps": 0},
    }
    for name, res in results.items():
        report[name] = {
            **evaluate_folder(res.model_dir, eval_files, cfg.eval.batch_size, vocab_dir=init_dir),
            "params": n_student,
            "objective": cfg.train.students[name],
            "steps": res.steps,
            "train_s": res.seconds,
            "final_train_loss": res.history[-1]["loss"] if res.history else None,
            "checkpoint": str(res.model_dir),
            "model_dir": str(export_student(res.model_dir, init_dir, output_dir / "students" / name)),
        }
    return report


def _cache_report(cfg: DistillConfig, train: tuple[Path, Any], eval_: tuple[Path, Any], label_stats: dict[str, Any]) -> dict[str, Any]:
    (train_dir, train_manifest), (eval_dir, eval_manifest) = train, eval_
    return {
        "path": str(train_dir),
        "eval_path": str(eval_dir),
        "key": train_manifest.key,
        "rows": train_manifest.rows,
        "tokens": train_manifest.tokens,
        "bytes": train_manifest.bytes,
        "bytes_per_token": train_manifest.bytes_per_token,
        "k": cfg.labels.k,
        "temperature": cfg.labels.temperature,
        "hit": label_stats["hit"],
        "teacher_calls": label_stats["teacher_calls"],
        "teacher": label_stats["teacher"],
        "eval_rows": eval_manifest.rows,
        "eval_tokens": eval_manifest.tokens,
    }


def export_student(checkpoint: Path, init_dir: Path, out_dir: Path) -> Path:
    """Copy a trained student's weights and the tokenizer (and vocabulary map, if any) of its
    initial folder into ``out_dir``: a model folder that can be served as a teacher."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for src in [*Path(checkpoint).iterdir(), *Path(init_dir).iterdir()]:
        if src.is_file() and not (out_dir / src.name).exists() and not src.name.endswith(".pt") and src.name != "history.json":
            shutil.copy2(src, out_dir / src.name)
    return out_dir


def _param_count(model_path: Path) -> int:
    """Parameter count from the safetensors header (no weights loaded); tied weights count once."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n
    return total
