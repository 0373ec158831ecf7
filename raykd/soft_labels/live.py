"""Cache misses filled live: training starts on the committed parts while the served teacher
labels the missing ones (``labels.fill=live``).

A run whose train cache is partly labeled (a labeling run that was interrupted, or a source that
grew new parts) does not label the rest as a stage of its own first. :func:`start_live_fill`
checks the committed parts, starts (or reuses) the teacher deployment and returns a
:class:`LiveFill`; its :meth:`~LiveFill.rows` is the training dataset: every part of the train
split in the planned order, committed parts read from their shards, missing ones labeled by the
labeler code of the before-training path (:mod:`raykd.soft_labels.pipeline`: the same ``score``
calls through the Serve handle, several in flight, the same encoding into the cache schema) and
committed through the ledger (:func:`~raykd.soft_labels.cache.write_part`) as the stream reaches
them. So the next run finds them a hit, a finished part is never rewritten, and a run killed in
the middle keeps every part it committed.

**Order.** The rows come part by part in the plan's order (the source's order, which is also the
order of a finished cache's manifest and shard list), each part's rows in its shard's order.
Training reads its dataset with Ray Data's ``preserve_order``, so a part still being labeled
holds back the parts after it: the worker waits for it rather than train on a later part
first. With ``train.shuffle=false`` a live run therefore trains on exactly the rows, in exactly
the order, of a run on the finished cache (with shuffle the parts come in a seeded permutation
of that order). The price is that training waits wherever it reaches a part the teacher has not
finished; the loop logs that wait as each step's ``data_s``.

**Afterwards.** :meth:`LiveFill.finish` labels what training did not reach (a run shorter than
an epoch), and the eval split's parts of sources it did not stream, through the before-training
path, and writes the manifests, so the cache is complete when the run ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Self

from raykd import console
from raykd.soft_labels.cache import Manifest, done_parts, read_entry
from raykd.soft_labels.schema import label_columns
from raykd.soft_labels.pipeline import live_label_rows
from raykd.soft_labels.plan import (
    Plan,
    print_labeling,
    finalize_splits,
    finished_caches,
    label_missing,
    missing_parts,
    start_labeling_teacher,
)

TRAIN = "train"


@dataclass
class LiveFill:
    """A train cache being filled during training: the plan, what it missed, and the teacher held for it.

    Use as a context manager around training: leaving it releases the teacher as labeling does
    (stopped if this run started it, unless ``teacher.keep_alive`` or on-policy training holds it).
    """

    plan: Plan
    missing: list[str]
    """The splits whose cache was not finished when the run started."""
    todo: dict[str, list[str]]
    """For each part of the train split's source still to label: the splits that miss it."""
    done_before: dict[str, set[str]]
    """Per split in :attr:`missing`, the parts committed when the run started."""
    stats: dict[str, Any]
    seconds: float = 0.0
    """Labeling time outside training (checks and teacher start, then :meth:`finish`)."""
    parts_live: dict[str, int] = field(default_factory=dict)

    def rows(self, shuffle: bool = False, seed: int = 0):
        """The train split's rows as a lazy Ray Dataset of undecoded cache rows (see the module
        docstring for the order). Every iteration (each epoch, each student) streams the parts
        again; a part committed meanwhile is read from its shard, never labeled twice."""
        plan, cfg = self.plan, self.plan.cfg
        data, parts = plan.sources[TRAIN]
        todo = self._still_missing(parts)
        return live_label_rows(parts, todo, {s: plan.targets()[s] for s in self.missing}, train=TRAIN,
                               columns=["input_ids", "attention_mask", "loss_mask", *label_columns(cfg.labels.form)],
                               app_name=cfg.teacher.name, tokenizer_path=str(plan.teacher_path),
                               vocab_size=plan.vocab_size, data=data, labels=cfg.labels, shuffle=shuffle, seed=seed)

    def _still_missing(self, parts) -> dict[str, list[str]]:
        targets = self.plan.targets()
        done = {s: done_parts(targets[s].cache_dir) for s in self.missing}
        out: dict[str, list[str]] = {}
        for spec in parts:
            if names := [s for s in self.todo.get(spec.digest(), []) if spec.digest() not in done[s]]:
                out[spec.digest()] = names
        return out

    def finish(self) -> tuple[dict[str, tuple[str, Manifest]], dict[str, Any]]:
        """Label the parts training did not reach, write every missing split's manifest.

        Returns:
            ``(caches, stats)`` as :func:`~raykd.soft_labels.plan.ensure_soft_labels` gives them;
            ``stats`` also holds ``fill`` (``live``), ``parts_live`` (per split, the parts
            committed while training ran) and ``parts_after`` (labeled after training);
            ``teacher_calls`` are summed over the ledger entries this run committed.

        Raises:
            raykd.soft_labels.cache.CacheError: a part is missing or corrupt (``error: ...``).
        """
        plan, stats = self.plan, self.stats
        start = time.perf_counter()
        targets, planned = plan.targets(), plan.planned_parts()
        self.parts_live = {s: len(done_parts(targets[s].cache_dir) - self.done_before[s]) for s in self.missing}
        todo_by_source = missing_parts(plan, targets, planned, self.missing, stats, quiet=True)
        after = {s: sum(s in names for todo in todo_by_source.values() for names in todo.values()) for s in self.missing}
        if any(todo_by_source.values()):
            label_missing(plan, targets, self.missing, todo_by_source, stats)
        for s in self.missing:
            stats["parts"][s]["labeled"] = self.parts_live[s] + after[s]
        self.seconds += time.perf_counter() - start
        caches = finished_caches(plan, targets, planned)
        caches.update(finalize_splits(plan, targets, planned, [s for s in self.missing if s not in caches], self.seconds))
        stats.update(label_s=self.seconds, parts_live=self.parts_live, parts_after=after,
                     teacher_calls=self._calls_committed(targets))
        print_labeling(caches, self.missing, stats)
        return caches, stats

    def _calls_committed(self, targets) -> int:
        """``score`` calls recorded in the ledger entries this run committed (every split)."""
        calls = 0
        for s in self.missing:
            t = targets[s]
            for part in done_parts(t.cache_dir) - self.done_before[s]:
                calls += int(read_entry(t.cache_dir, part, t.key)["teacher_calls"])
        return calls

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.plan.teacher.hold = self.plan.cfg.on_policy is not None
        self.plan.teacher.release()


def start_live_fill(plan: Plan, before_teacher: Callable[[], None] | None = None) -> LiveFill | None:
    """Check the committed parts and start the teacher for a live fill of the train cache.

    Everything that can fail runs here, before any training: committed parts are read (their
    key and shard size checked), and the teacher must be startable or running
    (``teacher.start=false`` with none running is refused). ``before_teacher`` runs when parts
    are missing, right before the teacher starts (e.g. a check that training fits beside it).

    Returns:
        None when every part of the train split is committed (nothing to label during training:
        the caller opens or finishes the caches as before training, and labels an eval part
        missing there); else the :class:`LiveFill`, its teacher up.

    Raises:
        raykd.teacher.apps.TeacherNotRunningError: parts are missing, none runs and
            ``teacher.start`` is false (``error: ...``, exit 2, before any compute).
        raykd.soft_labels.cache.CacheError, ValueError: a committed part is corrupt or of another
            key, ids repeat, or the running teacher is not the run's teacher (``error: ...``).
    """
    # lazy: keeps ray out of import time
    from raykd.teacher.apps import check_teacher_reachable

    start = time.perf_counter()
    targets, planned = plan.targets(), plan.planned_parts()
    caches = finished_caches(plan, targets, planned)
    if TRAIN in caches:
        return None
    missing = [s for s in targets if s not in caches]
    done_before = {s: done_parts(targets[s].cache_dir) & set(planned[s]) for s in missing}
    if done_before[TRAIN] == set(planned[TRAIN]):  # every train part committed (a manifest missing): nothing to stream
        return None
    why = "filling the cache misses live (labels.fill=live)"
    with console.user_errors(ValueError):
        check_teacher_reachable(plan.cfg.teacher, why)  # first: it reads nothing
    stats: dict[str, Any] = {"hit": False, "teacher_calls": 0, "label_s": 0.0, "teacher": None, "parts": {}, "fill": "live"}
    todo_by_source = missing_parts(plan, targets, planned, missing, stats)
    if before_teacher is not None:
        before_teacher()
    stats["teacher"] = start_labeling_teacher(plan, why, "train")
    plan.teacher.hold = True  # training labels through it
    todo = todo_by_source.get(id(plan.sources[TRAIN][1]), {})
    return LiveFill(plan, missing, todo, done_before, stats, seconds=time.perf_counter() - start)
