"""The labeling plan of a distill run and how its soft-label caches are found or written.

:class:`Plan` settles, before any expensive work, what a run will label: the documents of each
split, the resolved teacher and engine, the fingerprints and the cache key of each split. Every
check that can be made from the config and the model configs runs here.
:func:`ensure_soft_labels` then opens the finished caches or labels the missing splits through
the teacher, which the plan's :class:`~raykd.teacher.lease.TeacherLease` starts and stops.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from raykd import console, storage
from raykd.config import DataConfig, DistillConfig, default_cache_root
from raykd.data import Document
from raykd.data.sources import (
    PartSpec,
    iter_documents,
    plan_parts,
    source_identity,
)
from raykd.data.unique_ids import check_unique_ids
from raykd.models import (
    check_local_model,
    load_tokenizer,
    resolve_model_path,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from raykd.soft_labels.cache import (
    CacheError,
    CacheKey,
    Manifest,
    cache_dir_for,
    documents_fingerprint,
    done_parts,
    finalize,
    fingerprint,
    open_cache,
    read_entry,
    remove_partials,
)
from raykd.soft_labels.model_checks import (
    check_layer_drops,
    check_sampling_length,
    check_student_tokenizer,
    feature_layer_map,
    model_config,
)
from raykd.soft_labels.pipeline import Selection, Target, label_parts
from raykd.students.vocab import resolve_vocab_size
from raykd.teacher.engines import LOGPROBS_MODE, check_engine_request, resolve_engine
from raykd.teacher.lease import TeacherLease
from raykd.teacher.sanity import check_teacher_perplexity

log = logging.getLogger(__name__)


class Plan:
    """What a distill run will do, settled before any expensive work.

    Attributes:
        sources: per split, the data settings and parts it is labeled from (``train`` and
            ``eval`` share the source's parts; :meth:`set_train_docs` gives ``train`` its own).
        selections: per split, which documents of its source's parts it holds.
        keys: per split, the cache key.
    """

    def __init__(self, cfg: DistillConfig):
        """Settle the plan of ``cfg``: cuts the source into parts (metadata only, no document is
        read into the driver), reads the teacher's tokenizer and model config (no weights are
        loaded) and fingerprints the teacher's files.

        Raises:
            ValueError: a setting does not fit the data or the models (e.g. ``labels.k`` above
                the vocabulary, ``student.keep_layers`` out of range, a student with another
                tokenizer: :class:`raykd.students.VocabularyMismatchError`).
            FileNotFoundError: the data or a model cannot be found (the message says how to get it).
        """
        with console.user_errors(ValueError, FileNotFoundError):  # bad input: `raykd` prints error: ..., exits 2
            self._settle(cfg)  # (raykd.storage.StorageError is a ValueError)
        self.teacher = TeacherLease(cfg.teacher, str(self.teacher_path), self.running_teacher_fields(),
                                    hold=cfg.on_policy is not None)
        """The run's hold on its teacher application: it starts, reuses and stops it (held after
        labeling when on-policy training scores the student's samples with it)."""

    def _settle(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        for setting, name in (("teacher.model", cfg.teacher.model), ("student.model", cfg.student.model),
                              *((f"extra_teachers[{i}].model", t.model) for i, t in enumerate(cfg.extra_teachers))):
            check_local_model(name, setting)  # a missing local path fails here, never at the hub
        root = cfg.labels.cache_dir or str(default_cache_root() / "soft_labels")
        for setting, location in (("labels.cache_dir", root), ("data.path", cfg.data.path),
                                  ("train.checkpoint_dir", cfg.train.checkpoint_dir)):
            if location == root or location and storage.is_uri(location):  # missing filesystem, bucket or
                storage.check(location, setting=setting)                   # credentials: fails here, bounded
        self.cache_root = root if storage.is_uri(root) else str(Path(root).expanduser())
        parts = plan_parts(cfg.data)
        self.sources: dict[str, tuple[DataConfig, list[PartSpec]]] = {"train": (cfg.data, parts), "eval": (cfg.data, parts)}
        self.selections = {split: Selection.of(split, cfg.data) for split in ("train", "eval")}
        self.teacher_path = resolve_model_path(cfg.teacher.model, setting="teacher.model")
        self.engine = resolve_engine(cfg.teacher)
        check_engine_request(self.engine, cfg.teacher, k=cfg.labels.width, temperature=cfg.labels.temperature,
                             form=cfg.labels.form)
        tokenizer = load_tokenizer(self.teacher_path)
        self.tokenizer_fp = tokenizer_fingerprint(tokenizer)
        self.weights_fp = weights_fingerprint(self.teacher_path)
        teacher_config = model_config(self.teacher_path)
        self.vocab_size = int(teacher_config.vocab_size)
        if cfg.labels.width > self.vocab_size:
            setting = "labels.samples" if cfg.labels.form == "sampled" else "labels.k"
            raise ValueError(f"{setting}={cfg.labels.width} exceeds the teacher vocabulary ({self.vocab_size})")
        if cfg.student.vocab_size is not None:
            resolve_vocab_size(cfg.student.vocab_size, self.vocab_size)
        self.cross_tokenizer = check_student_tokenizer(cfg, self.tokenizer_fp, self.vocab_size)
        """True when the student's tokenizer differs from the teacher's (``student.tokenizer_alignment``
        then aligns them, :mod:`raykd.train.cross_tokenizer`)."""
        check_layer_drops(cfg, teacher_config)
        self.layer_map = feature_layer_map(cfg, teacher_config)
        """The checked layer map of the feature terms (:class:`raykd.losses.features.LayerMap`), or None."""
        check_sampling_length(cfg, teacher_config)
        self.keys = {split: self.key_for(split) for split in self.sources}

    def key_for(self, split: str) -> CacheKey:
        """The cache key of ``split``: the teacher, the labels' settings, the source's identity
        and the split's selection."""
        c = self.cfg
        data = {"source": source_identity(self.sources[split][0]), "selection": self.selections[split].identity()}
        return CacheKey(
            teacher_fingerprint=self.weights_fp,
            tokenizer_fingerprint=self.tokenizer_fp,
            engine=self.engine,
            dtype=c.teacher.dtype,
            k=c.labels.width,
            temperature=c.labels.temperature,
            data_fingerprint=fingerprint(data),
            seq_len=c.data.seq_len,
            max_blocks_per_doc=c.data.max_blocks_per_doc,
            min_tokens=c.data.min_tokens,
            logprobs_mode=LOGPROBS_MODE,
            **({"form": "sampled", "samples": c.labels.samples, "sample_seed": c.labels.seed, "sample_draws": c.labels.draws}
               if c.labels.form == "sampled" else {}),
        )

    def planned_parts(self) -> dict[str, list[str]]:
        """Per split, the digests of the parts its cache is made of, in the source's order."""
        return {split: [p.digest() for p in parts] for split, (_, parts) in self.sources.items()}

    def targets(self) -> dict[str, Target]:
        """The cache each split is labeled into."""
        return {split: Target(key, cache_dir_for(self.cache_root, key), self.selections[split]) for split, key in self.keys.items()}

    def documents(self, split: str) -> list[Document]:
        """The documents of ``split``, read into the driver part by part (for recipes that need
        a list, such as sequence-level KD's prompts; the labeling path never does this)."""
        data, parts = self.sources[split]
        selection, docs = self.selections[split], []
        for doc in iter_documents(data, parts):
            if selection.mask([doc.doc_id])[0]:
                docs.append(doc)
        return docs

    def set_train_docs(self, docs: list[Document]) -> None:
        """Train on ``docs`` instead (e.g. teacher generations): they are written once as a
        Parquet source under the cache root, every one in the train split, and the train cache
        key follows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        location = storage.join(self.cache_root, "documents", f"{documents_fingerprint(docs)}.parquet")
        if not storage.exists(location):
            table = pa.table({"doc_id": [d.doc_id for d in docs], "text": [d.text for d in docs]})
            fs, path = storage.resolve(location)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            pq.write_table(table, path + ".tmp", filesystem=fs)
            fs.move(path + ".tmp", path)
        data = self.cfg.data.model_copy(update={"source": "parquet", "path": location, "id_column": "doc_id", "text_column": "text"})
        self.sources["train"] = (data, plan_parts(data))
        self.selections["train"] = Selection(None)
        self.keys["train"] = self.key_for("train")

    def running_teacher_fields(self) -> dict[str, Any]:
        """What a running teacher must match to label for this plan (see
        :func:`raykd.teacher.running.check_running_teacher`)."""
        return {"weights_fingerprint": self.weights_fp, "tokenizer_fingerprint": self.tokenizer_fp,
                "engine": self.engine, "dtype": self.cfg.teacher.dtype}

    def teacher_meta(self) -> dict[str, Any]:
        return {"model": self.cfg.teacher.model, "path": str(self.teacher_path), "weights_fingerprint": self.weights_fp,
                "tokenizer_fingerprint": self.tokenizer_fp, "engine": self.engine, "dtype": self.cfg.teacher.dtype}


def ensure_soft_labels(plan: Plan) -> tuple[dict[str, tuple[str, Manifest]], dict[str, Any]]:
    """Open the finished caches of both splits, or label the parts they miss.

    Everything is checked before the teacher starts: the parts already committed (their ledger
    entries must carry this cache's key and their shards the recorded size), and ids that repeat
    across files. Temporary files of an interrupted run are removed (and the user told so).
    Then only the missing parts are labeled, and each split's manifest is written.

    Returns:
        ``({split: (folder, manifest)}, stats)`` with ``stats`` = ``hit`` (every split found),
        ``teacher_calls`` (``score`` calls of this run, counted by the labelers), ``label_s``,
        ``parts`` (labeled / planned) and ``teacher``.

    Raises:
        raykd.soft_labels.cache.CacheError: a committed part is corrupt or from another key
            (shown as ``error: ...``, exit 2; nothing is deleted).
    """
    targets, planned = plan.targets(), plan.planned_parts()
    caches = finished_caches(plan, targets, planned)
    missing = [split for split in targets if split not in caches]
    stats: dict[str, Any] = {"hit": not missing, "teacher_calls": 0, "label_s": 0.0, "teacher": None, "parts": {}}
    if not missing:
        plan.teacher.release()
        _remove_old_partial_folders(plan.cache_root)  # on a hit too: nothing else would clear them
        print("soft labels found in the cache (" + ", ".join(f"{s} {m.rows:,} rows" for s, (_, m) in caches.items())
              + f"): no teacher calls; {caches['train'][0]}")
        return caches, stats
    todo_by_source = missing_parts(plan, targets, planned, missing, stats)
    start = time.perf_counter()
    if any(todo_by_source.values()):
        stats["teacher"] = start_labeling_teacher(plan, "labeling the missing soft labels", missing[-1])
        try:
            stats["teacher_calls"] += label_missing(plan, targets, missing, todo_by_source, stats)
        finally:
            plan.teacher.release()
    stats["label_s"] = time.perf_counter() - start
    caches.update(finalize_splits(plan, targets, planned, missing, stats["label_s"]))
    print_labeling(caches, missing, stats)
    return caches, stats


def finished_caches(plan: Plan, targets: dict[str, Target], planned: dict[str, list[str]]) -> dict[str, tuple[str, Manifest]]:
    """The splits whose cache is finished for exactly their planned parts (``labels.train_cache``
    stands for the train split), opened and checked.

    Raises:
        raykd.soft_labels.cache.CacheError: a manifest exists but the cache is corrupt or of other
            settings (shown as ``error: ...``).
    """
    caches: dict[str, Any] = {}
    for split, t in targets.items():
        if storage.is_file(storage.join(t.cache_dir, "manifest.json")):
            with console.user_errors(CacheError):
                m = open_cache(t.cache_dir, expect=t.key, deep=True)
            if sorted(m.parts) == sorted(planned[split]):
                caches[split] = (t.cache_dir, m)
    if plan.cfg.labels.train_cache:
        folder = plan.cfg.labels.train_cache
        with console.user_errors(CacheError):
            caches["train"] = (folder, open_cache(folder, expect=plan.keys["train"], deep=True))
    return caches


def missing_parts(plan: Plan, targets: dict[str, Target], planned: dict[str, list[str]], missing: list[str],
                  stats: dict[str, Any], quiet: bool = False) -> dict[int, dict[str, list[str]]]:
    """The parts each of the ``missing`` splits still needs, after checking the committed ones.

    Committed parts are read (key and shard size checked) before any teacher call, temporary
    files of an interrupted run are removed, and ids that repeat across files are refused.

    Returns:
        Per source (``id`` of its part list; splits that share a source are labeled in one pass):
        ``{part digest: [splits missing it]}``. ``stats["parts"][split]`` gets ``planned`` and
        ``done_before``.

    Raises:
        raykd.soft_labels.cache.CacheError, ValueError: shown as ``error: ...`` (exit 2).
    """
    todo_by_source: dict[int, dict[str, list[str]]] = {}
    with console.user_errors(CacheError, ValueError):
        for split in missing:
            t = targets[split]
            done = done_parts(t.cache_dir) & set(planned[split])
            for part in done:
                read_entry(t.cache_dir, part, t.key)  # corrupt or foreign parts fail here, before any teacher call
            if removed := remove_partials(t.cache_dir):
                print(f"removed {removed} unfinished shard file(s) an interrupted run left in {t.cache_dir}")
            todo = todo_by_source.setdefault(id(plan.sources[split][1]), {})
            for part in planned[split]:
                if part not in done:
                    todo.setdefault(part, []).append(split)
            stats["parts"].setdefault(split, {"planned": len(planned[split]), "done_before": len(done)})
            if done and not quiet:
                print(f"{split}: resuming, {len(done)} of {len(planned[split])} parts already labeled")
        if not quiet:
            _remove_old_partial_folders(plan.cache_root)
            for split in {id(plan.sources[s][1]): s for s in missing}.values():  # once per source
                check_unique_ids(*plan.sources[split])
    return todo_by_source


def start_labeling_teacher(plan: Plan, why: str, check_split: str | None = None) -> dict[str, Any]:
    """Start the run's teacher through its lease (or reuse a running one, checked to be the run's
    teacher; :meth:`raykd.teacher.lease.TeacherLease.acquire`).

    Args:
        why: what the teacher is needed for (in the error when it may not be started).
        check_split: score a few of this split's documents first and warn when the teacher's
            perplexity is implausible (:func:`_check_teacher`); None skips the check.

    Returns:
        The report's ``teacher`` entry: ``name``, ``started_by_run``, ``engine``, ``replica``,
        ``check_ppl`` (None when not checked) and ``check_calls`` (the check's ``score`` calls,
        not counted in the labeling's ``teacher_calls``).

    Raises:
        raykd.teacher.apps.TeacherNotRunningError: none runs and ``teacher.start`` is
            false (``error: ...``, exit 2, before any compute).
        ValueError: the running teacher is not the run's teacher (``error: ...``).
    """
    cfg = plan.cfg
    handle = plan.teacher.acquire(why)
    info, started = handle.info.remote().result(), plan.teacher.owns
    check_ppl, check_calls = _check_teacher(plan, handle, check_split) if check_split else (None, 0)
    return {"name": cfg.teacher.name, "started_by_run": started, "engine": info["engine"], "replica": info["replica"],
            "check_ppl": check_ppl, "check_calls": check_calls}


def label_missing(plan: Plan, targets: dict[str, Target], missing: list[str],
                  todo_by_source: dict[int, dict[str, list[str]]], stats: dict[str, Any]) -> int:
    """Label the parts of :func:`missing_parts` through the running teacher, one pass per source.

    Returns:
        The ``score`` calls made (counted by the labelers); ``stats["parts"][split]["labeled"]``
        gets the parts labeled.
    """
    cfg, calls = plan.cfg, 0
    for split_of_source in {id(plan.sources[s][1]): s for s in missing}.values():
        data, parts = plan.sources[split_of_source]
        todo = todo_by_source.get(id(parts), {})
        if not todo:
            continue
        names = {s for splits in todo.values() for s in splits}
        log.info("labeling %d of %d parts for %s", len(todo), len(parts), sorted(names))
        totals = label_parts(parts, todo, {s: targets[s] for s in names}, app_name=cfg.teacher.name,
                             tokenizer_path=str(plan.teacher_path), vocab_size=plan.vocab_size, data=data, labels=cfg.labels)
        for s, tot in totals.items():
            calls += tot["calls"]
            stats["parts"][s]["labeled"] = stats["parts"][s].get("labeled", 0) + tot["parts"]
    return calls


def finalize_splits(plan: Plan, targets: dict[str, Target], planned: dict[str, list[str]], splits: list[str],
                    label_s: float) -> dict[str, tuple[str, Manifest]]:
    """Write the manifest of each of ``splits`` (every planned part must be committed).

    Raises:
        raykd.soft_labels.cache.CacheError: a part is missing or corrupt (``error: ...``).
    """
    out = {}
    with console.user_errors(CacheError):
        for split in splits:
            t = targets[split]
            out[split] = (t.cache_dir, finalize(t.cache_dir, t.key, planned[split], plan.teacher_meta(), label_s))
    return out


def _check_teacher(plan: Plan, handle, split: str, n_docs: int = 4) -> tuple[float | None, int]:
    """The teacher's perplexity on the first ``n_docs`` documents of ``split``, scored through its
    deployment before it labels anything; warns when implausible (:mod:`raykd.teacher.sanity`).

    Returns:
        ``(perplexity or None when the check could not run, score calls it made)``.
    """
    # lazy: keeps ray out of import time
    from raykd.teacher.deployment import ResentCall

    data, parts = plan.sources[split]
    texts = []
    for doc in iter_documents(data, parts[:1]):
        if plan.selections[split].mask([doc.doc_id])[0]:
            texts.append(doc.text)
        if len(texts) == n_docs:
            break
    calls = [0]

    def score(ids, am):
        calls[0] += 1
        return ResentCall(handle.score, ids, am, k=1, temperature=1.0).result()

    try:
        return check_teacher_perplexity(score, load_tokenizer(plan.teacher_path), texts, seq_len=plan.cfg.data.seq_len), calls[0]
    except Exception as e:  # noqa: BLE001 - a check that cannot run must not stop the labeling it guards
        log.warning("could not check the teacher's perplexity before labeling (%s: %s)", type(e).__name__, e)
        return None, calls[0]


def _remove_old_partial_folders(cache_root: str) -> None:
    """Delete the ``<key>.partial-*`` folders that raykd before the part ledger left behind when a
    labeling run was interrupted (they never become caches), and say so."""
    fs, root = storage.resolve(cache_root)
    from pyarrow.fs import FileSelector, FileType

    stale = [i.path for i in fs.get_file_info(FileSelector(root, allow_not_found=True))
             if i.type == FileType.Directory and ".partial-" in i.base_name]
    for path in stale:
        fs.delete_dir(path)
    if stale:
        print(f"removed {len(stale)} unfinished cache folder(s) (*.partial-*) that interrupted runs left in {cache_root}")


def print_labeling(caches: dict[str, Any], labeled: list[str], stats: dict[str, Any]) -> None:
    """One line under the labeling bar: what was written (the details are in raykd.log)."""
    splits = []
    for split in labeled:
        _, m = caches[split]
        splits.append(f"{split} {m.rows:,} rows / {m.tokens:,} tokens ({m.bytes_per_token:.1f} B/token)")
        log.info("%s cache: %d rows, %d tokens, %d shards, %.1f B/token, %.1f s, %.0f tokens/s", split, m.rows, m.tokens,
                 len(m.shards), m.bytes_per_token, m.label_seconds, m.tokens / max(m.label_seconds, 1e-9))
    print(f"soft labels written: {', '.join(splits)}; {stats['teacher_calls']} teacher calls, {stats['label_s']:.0f} s")
