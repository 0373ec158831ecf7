"""The Ray Train worker loop's parts for language-model students: its settings (:class:`LoopConfig`),
cache batches decoded into the student's micro-batches (:func:`student_batch`), the shard's groups of
micro-batches (:func:`micro_batch_groups`) and the frozen teacher run in the worker for dense
targets (:func:`online_teacher`). The loop itself, its setup, resume and steps, is
:mod:`raykd.train.worker`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from raykd.config import OnPolicyConfig, Strict, TrainConfig
from raykd.losses import Objective, TeacherTargets
from raykd.losses.targets import retemper, truncate_topk
from raykd.models import load_causal_lm
from raykd.students.vocab import map_ids, map_targets
from raykd.train.features import FeatureTerms
from raykd.train.parallel import shard
from raykd.train.schedule import schedule_at
from raykd.train.step import StudentBatch
from raykd.train.teachers import TeacherMix

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
RESUMES_FILE = "resumed_from.json"
"""JSON list of the steps a run resumed from (one per restart), beside the history."""


def batch_to_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TeacherTargets]:
    """Split a decoded soft-label batch into model inputs, labels, mask and teacher targets.

    Args:
        batch: ``input_ids`` / ``attention_mask`` / ``loss_mask`` ``[B, T]``, ``topk_ids`` /
            ``topk_logprobs`` ``[B, T, K]``, ``tail_logmass`` ``[B, T]``.

    Returns:
        ``(input_ids [B, T] long, attention_mask [B, T] long, labels [B, T] long (-100 where
        masked), loss_mask [B, T] bool, targets)``.
    """
    ids = batch["input_ids"].long()
    mask = batch["loss_mask"].bool()
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, :-1], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    targets = TeacherTargets.sparse(batch["topk_ids"].long(), batch["topk_logprobs"].float(), batch["tail_logmass"].float())
    return ids, batch["attention_mask"].long(), labels, mask, targets


def step_inputs(batch: dict[str, torch.Tensor], cached_temperature: float, temperature: float,
                mix: TeacherMix | None = None, vocab_table: torch.Tensor | None = None, target_k: int | None = None):
    """:func:`batch_to_inputs`, with the targets of several teachers mixed into one (``mix``),
    cut to the top ``target_k`` (:func:`~raykd.losses.targets.truncate_topk`), ids, labels and
    targets mapped into a compressed student vocabulary (``vocab_table``, see
    :mod:`raykd.students.vocab`), and the targets moved from the cache's temperature to the
    step's (:func:`~raykd.losses.targets.retemper`)."""
    ids, am, labels, mask, targets = batch_to_inputs(batch)
    if mix is not None:
        targets = mix(batch, mask)
    if target_k is not None:
        targets = truncate_topk(targets, target_k)
    if vocab_table is not None:
        ids, labels, targets = map_ids(ids, vocab_table), map_ids(labels, vocab_table), map_targets(targets, vocab_table)
    return ids, am, labels, mask, retemper(targets, cached_temperature, temperature)


def student_batch(batch: dict[str, torch.Tensor], cached_temperature: float, temperature: float,
                  mix: TeacherMix | None = None, vocab_table: torch.Tensor | None = None,
                  target_k: int | None = None) -> StudentBatch:
    """:func:`step_inputs` as the :class:`~raykd.train.step.StudentBatch` of a causal-LM student."""
    ids, am, labels, mask, targets = step_inputs(batch, cached_temperature, temperature, mix, vocab_table, target_k)
    return StudentBatch({"input_ids": ids, "attention_mask": am}, labels, mask, targets)


class LoopConfig(Strict):
    """Everything a Ray Train worker needs to train one language-model student.

    Built on the driver (:func:`raykd.train.trainer.train_student`) and handed to the workers as
    a dict (``model_dump``); the worker validates it again, so a field that does not exist fails
    on both sides with its name.
    """

    run_label: str
    """Student name (log prefix, Ray Train run folder)."""
    student_path: str
    """Initial weights folder."""
    weights: dict[str, float]
    """The student's objective ``{loss name: weight}``."""
    terms: list[str] = Field(default_factory=list)
    """Every loss any phase uses (logged with weight 0 where unused)."""
    loss_params: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Loss hyper-parameters, e.g. ``{generalized_jsd: {beta: 0.9}}``."""
    temperature: float = Field(gt=0)
    """The soft-label cache's temperature (targets are re-tempered from it)."""
    train: TrainConfig
    """Batch, steps, optimizer, schedule (``phases``), devices."""
    combine: str | None = None
    """Multi-teacher rule (:mod:`raykd.losses.multi_teacher`), None for one teacher."""
    num_teachers: int = Field(default=1, ge=1)
    """Teachers whose labels the joined cache holds (>= 1; ``combine`` mixes them when above 1)."""
    weight_temperature: float = Field(default=1.0, gt=0)
    """Softness of the per-example teacher weights (> 0; ``multi_teacher.weight_temperature``)."""
    policy_lr: float = Field(default=0.05, gt=0)
    """Learning rate of the ``policy`` teacher-selection rule (> 0; ``multi_teacher.policy_lr``)."""
    mlflow_uri: str | None = None
    """Log every step's metrics to this MLflow tracking URI (Ray's ``setup_mlflow``), or None."""
    mlflow_experiment: str = "raykd"
    """MLflow experiment of the run (``tracking.experiment``); used only with ``mlflow_uri``."""
    online_teacher: str | None = None
    """Folder of a teacher run in the worker for dense targets (``train.online_teacher``), or None."""
    on_policy: OnPolicyConfig | None = None
    """On-policy steps (:mod:`raykd.train.on_policy`): the student's samples scored by the running
    teacher application ``teacher_app`` (top-``teacher_k``, at ``temperature``), or None."""
    teacher_app: str | None = None
    """Serve application name of the running teacher the on-policy samples are scored by (needed with
    ``on_policy``), or None."""
    teacher_k: int = Field(default=32, ge=1)
    """Top-``K`` logprobs the teacher returns per on-policy position (>= 1; the cache's ``labels.k``)."""
    teacher_tokenizer: str | None = None
    """Folder of the teacher's tokenizer when the student's differs (``student.tokenizer_alignment``):
    each batch of teacher blocks is re-tokenised for the student and aligned
    (:class:`raykd.train.cross_tokenizer.TokenizerAlignment`); None: the student reads the blocks as they are."""
    layer_map: list[tuple[int, int]] | None = None
    """The feature terms' ``(student layer, teacher layer)`` pairs (checked on the driver,
    :attr:`raykd.soft_labels.plan.Plan.layer_map`); None when no term reads features."""
    feature_teacher: str | None = None
    """Folder of the teacher run in the worker for the feature terms' features, or None."""
    feature_layout: dict[str, Any] | None = None
    """The cached teacher features' layout (:class:`raykd.soft_labels.feature_cache.FeatureLayout`)
    when they come with the batches (``f.*`` columns), or None."""
    feature_shapes: dict[str, Any] | None = None
    """Their shapes (the feature shards' ``raykd.feature_shapes`` metadata)."""
    checkpoint_root: str | None = None
    """Ray Train's local mode (``train.num_workers = 0``) keeps no checkpoint of its own: the loop
    then writes them into ``<checkpoint_root>/checkpoint_<step>`` (the last two kept), and a run
    under the same name continues from the latest, as Ray Train's own storage does with workers."""

    def objective_at(self, step: int, features: FeatureTerms | None = None) -> tuple[Objective, float]:
        """The objective and temperature of 0-based ``step``, from ``train.phases`` (with the
        layer map and projections of ``features`` for the feature terms)."""
        weights, tau = schedule_at(self.train.phases, step, self.train.total_steps, self.weights, self.temperature,
                                   self.terms)
        params = {n: p for n, p in self.loss_params.items() if n in weights}
        if features is None:
            return Objective(weights, params), tau
        weights, params = features.weights_at(weights, params)  # SID's stage
        return Objective(weights, params, layer_map=features.layer_map, projections=features.projections), tau


def autocast_for(mode: str, device: torch.device):
    """The student forward's mixed-precision context for ``train.autocast`` on ``device``."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def micro_batch_groups(shard, per_worker: int, train: TrainConfig, device, position: dict[str, int]):
    """Endless iterator over lists of ``grad_accum`` decoded micro-batches (epochs repeat the shard).

    Args:
        position: ``{"epoch": e, "group": g}``, where the data stands: the first group yielded is
            group ``g`` of epoch ``e`` (the groups before it are read and dropped, so a resumed run
            sees the data a run without a failure would). Updated as groups are handed out, so a
            checkpoint taken after a step records where the next step starts.
    """
    micro = per_worker // train.grad_accum
    skip = position["group"]
    while True:
        group, groups = [], 0
        kwargs = ({"local_shuffle_buffer_size": 4 * micro, "local_shuffle_seed": train.seed + position["epoch"]}
                  if train.shuffle else {})
        for batch in shard.iter_torch_batches(batch_size=micro, drop_last=True, device=device, **kwargs):
            group.append(batch)
            if len(group) < train.grad_accum:
                continue
            groups += 1
            if groups > skip:
                position["group"] = groups
                yield group
            group = []
        skip = max(0, skip - groups)  # a position past the epoch's end (an older checkpoint) carries over
        position["epoch"], position["group"] = position["epoch"] + 1, 0


def all_reduce_sum(values: list[float], world: int, device) -> list[float]:
    """``values`` summed over the ``world`` workers (float64; unchanged for one worker)."""
    import torch.distributed as dist

    t = torch.tensor(values, device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def online_teacher(path: str, device: torch.device, shards: int = 1) -> Callable[[StudentBatch], TeacherTargets]:
    """A frozen causal-LM teacher in this process: a micro-batch -> dense targets ``[B, T, V]``
    (fp32 logits of the batch's own ``input_ids``; the loss applies the temperature). With
    ``shards`` > 1 it is sharded over the workers as an FSDP student is (every worker must call it
    for every micro-batch)."""

    model = load_causal_lm(Path(path)).eval().requires_grad_(False)
    model = shard(model, shards, device) if shards > 1 else model.to(device)

    @torch.no_grad()
    def targets(batch: StudentBatch) -> TeacherTargets:
        return TeacherTargets.dense(model(**batch.inputs, use_cache=False).logits.float())

    return targets

