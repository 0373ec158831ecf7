"""One training step and one step loop for every student kind (no Ray).

Every student, a causal LM on a Ray Train worker or a classifier inside a Tune trial, trains
through the same three parts:

- :class:`StudentBatch`: a micro-batch in the terms of :class:`~raykd.losses.Objective`
  (model inputs, labels ``[B, P]``, mask ``[B, P]``, teacher targets over ``[B, P]``). A causal
  LM has one position per token (``P = T``); a classifier one position per sequence (``P = 1``),
  its class logits ``[B, C]`` seen as ``[B, 1, C]``.
- :func:`train_step`: forward and backward of every micro-batch of one optimizer step, each
  ``loss_sum`` divided by the *global* number of valid positions (all-reduced over workers and
  summed over the accumulation micro-batches, see :mod:`raykd.losses.objective`), then gradient
  clipping, the optimizer and the learning-rate schedule.
- :func:`run_steps`: the step loop, calling back after every step (logging, checkpoints,
  evaluation, Tune reports).

With ``chunk_positions`` a causal LM's step never holds the logits of a whole micro-batch: the
forward stops at the LM head's input (:func:`head_input`) and the objective runs the head and
every logit term on chunks of positions (:meth:`raykd.losses.Objective.from_hidden`).

The Ray Train worker (:mod:`raykd.train.loop`) adds the dataset shard, DDP and checkpoints on
top; :mod:`raykd.train.local` adds in-memory classification data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from raykd.losses import Objective, TeacherTargets
from raykd.losses.features import Features
from raykd.train.features import capture_features
from raykd.train.interventions import interchange_forwards
from raykd.train.optim import adamw
from raykd.train.parallel import unwrapped

LogitsFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
"""``(model, inputs) -> logits [B, P, V]``: how a student kind's logits are read."""


def causal_lm_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Next-token logits ``[B, T, V]`` of a causal LM (position ``t`` predicts token ``t + 1``)."""
    return model(**inputs).logits


def classifier_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Class logits ``[B, C]`` of a sequence classifier as one position, ``[B, 1, C]``."""
    return model(**inputs).logits[:, None, :]


STUDENT_KINDS: dict[str, LogitsFn] = {"causal_lm": causal_lm_logits, "classifier": classifier_logits}
"""Student kind -> how its logits are read."""


@dataclass
class HeadInput:
    """What :func:`head_input` caught: the LM head and its input.

    Attributes:
        head: the model's output embeddings (the LM head, an ``nn.Linear`` ``[..., H] -> [..., V]``).
        hidden: ``[B, T, H]`` the final hidden states of the last forward in the block (with
            grad), or None before one ran.
    """

    head: nn.Linear
    hidden: Tensor | None = None


@contextmanager
def head_input(model: nn.Module) -> Iterator[HeadInput]:
    """Inside the block, a forward of the causal LM ``model`` (a DDP wrapper of one too) hands
    its LM head's input to the yielded :class:`HeadInput` and runs the head on no position: its
    logits come out ``[B, 0, V]``, so the full ``[B, T, V]`` is never made. The forward itself
    (and DDP's bookkeeping) is the model's own. A forward pre-hook on
    ``get_output_embeddings()``; :func:`check_head_input` checks a model's logits are the head of
    that input.

    Raises:
        ValueError: the model's output embeddings are not an ``nn.Linear``, or it calls them
            without a positional input.
    """
    head = unwrapped(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(unwrapped(model)).__name__}'s LM head (get_output_embeddings()) is "
                         f"{type(head).__name__}, not an nn.Linear: train it with train.loss_chunk_positions=null")
    caught = HeadInput(head)

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        if not args:
            raise ValueError("the model calls its LM head without a positional input; set train.loss_chunk_positions=null")
        caught.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield caught
    finally:
        handle.remove()


def check_head_input(model: nn.Module, tokens: int = 8) -> None:
    """Check that ``model``'s logits are its LM head applied to the head's input, which the chunked
    step (:func:`head_input`) relies on: one no-grad forward of ``tokens`` ids in eval mode, with
    and without the hook. Run it once, before training.

    Raises:
        ValueError: the two differ (the model transforms the logits after the head, e.g. Gemma 2's
            final logit soft-capping), naming the model and the setting to change.
    """
    core = unwrapped(model)
    was_training = core.training
    core.eval()
    try:
        with torch.no_grad():
            with head_input(core) as caught:
                ids = torch.arange(tokens, device=caught.head.weight.device)[None] % caught.head.weight.shape[0]
                core(input_ids=ids)
            have = caught.head(caught.hidden).float()  # the hook is gone: the head runs on every position
            want = core(input_ids=ids).logits.float()
    finally:
        core.train(was_training)
    if have.shape != want.shape or not torch.allclose(have, want, rtol=1e-4, atol=1e-4):
        raise ValueError(f"{type(core).__name__}'s logits are not its LM head applied to its last hidden states (it "
                         "transforms them after the head, e.g. logit soft-capping): the chunked loss cannot compute "
                         "them; set train.loss_chunk_positions=null")


@dataclass
class StudentBatch:
    """One micro-batch of a student.

    Attributes:
        inputs: model keyword inputs, e.g. ``input_ids`` / ``attention_mask`` ``[B, T]``.
        labels: ``[B, P]`` hard labels (next-token or class ids), -100 where ignored.
        mask: ``[B, P]`` bool, True where a position counts.
        targets: teacher targets over ``[B, P]`` (and ``V``, if dense), or None when no term
            needs a teacher or the teacher runs online (:func:`train_step`'s ``teacher``).
        context: entered around this micro-batch's forward (e.g. a sparsity mask applied to the
            student, as MiniDisc's sandwich rule does); None for none.
        teacher_features: the teacher's features of these rows (cached), for feature terms; None
            when no term reads features or the teacher runs online (``feature_teacher``).
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    mask: Tensor
    targets: TeacherTargets | None = None
    context: Callable[[], AbstractContextManager] | None = None
    teacher_features: Features | None = None

    @property
    def num_positions(self) -> int:
        """Valid positions of this micro-batch (the denominator's share)."""
        return int(self.mask.sum())


def objective_loss(model: nn.Module, batch: StudentBatch, objective: Objective, temperature: float,
                   logits_fn: LogitsFn = causal_lm_logits) -> Tensor:
    """The objective's mean over the valid positions of one batch (a scalar with grad), e.g. the
    loss a Taylor importance score differentiates."""
    logits = logits_fn(model, batch.inputs)
    out = objective(logits.float(), batch.labels, batch.mask, batch.targets, temperature)
    return out.loss_sum / max(batch.num_positions, 1)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, group: Sequence[StudentBatch], objective: Objective,
    temperature: float, *, logits_fn: LogitsFn = causal_lm_logits, scheduler: Any = None,
    max_grad_norm: float | None = None, world: int = 1, all_reduce: Callable[[list[float]], list[float]] | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    teacher: Callable[[StudentBatch], TeacherTargets] | None = None,
    on_logits: Callable[[StudentBatch, Tensor], None] | None = None,
    feature_teacher: Callable[[StudentBatch], tuple[TeacherTargets | None, Features]] | None = None,
    chunk_positions: int | None = None,
) -> dict[str, float]:
    """One optimizer step over the micro-batches ``group`` (gradient accumulation).

    Each micro-batch's ``loss_sum * world / N`` is back-propagated, ``N`` being the valid
    positions of the whole step over all workers, so every position weighs ``1 / N`` however
    the step is split (DDP averages gradients over the ``world`` workers; the factor cancels).

    Args:
        model: the student (DDP-wrapped: gradients sync on the last micro-batch only).
        optimizer: its optimizer; scheduler: a learning-rate scheduler stepped after it, or None.
        group: the step's micro-batches (at least one).
        objective: the step's weighted loss terms; temperature: the teacher terms' tau.
        logits_fn: the student kind's logits (:data:`STUDENT_KINDS`).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        world: data-parallel workers; all_reduce: sums a list of floats over them (None: one).
        autocast: context of the student's forward (mixed precision).
        teacher: a frozen in-process teacher giving a micro-batch's targets (replacing ``batch.targets``).
        on_logits: called with every micro-batch and its logits (e.g. a teacher-selection policy).
        feature_teacher: an online teacher giving a micro-batch's ``(targets, features)`` in one
            forward (:class:`raykd.train.features.FeatureTeacher`).
        chunk_positions: a causal LM's logit terms run on chunks of this many positions with the
            LM head inside the chunk (``train.loss_chunk_positions``; the model passed
            :func:`check_head_input`); None or 0: on the whole micro-batch's logits.

    Returns:
        Per-position means over the step of every term (weight 0 included) and ``loss``; ``positions`` (``N``).

    Raises:
        ValueError: an empty group, an intervention term without an online feature teacher,
            ``chunk_positions`` with a student kind other than ``causal_lm`` or with ``on_logits``
            (no whole logits to hand over), or what :class:`~raykd.losses.Objective` raises.
    """
    _check_step(group, objective, feature_teacher, chunked=bool(chunk_positions),
                whole_logits=logits_fn is not causal_lm_logits or on_logits is not None)
    reduce = all_reduce or (lambda values: values)
    n_global = max(reduce([float(sum(b.num_positions for b in group))])[0], 1.0)
    sums: dict[str, float] = {}
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        with model.no_sync() if (world > 1 and not last and hasattr(model, "no_sync")) else nullcontext():
            out, logits = _backward(model, batch, objective, temperature, world, n_global, logits_fn=logits_fn,
                                    autocast=autocast, teacher=teacher, feature_teacher=feature_teacher,
                                    chunk_positions=chunk_positions)
        if on_logits is not None:
            on_logits(batch, logits)
        for name, value in [*out.term_sums.items(), ("loss", out.loss_sum.detach())]:
            sums[name] = sums.get(name, 0.0) + float(value)
    _update(optimizer, scheduler, max_grad_norm)
    totals = reduce(list(sums.values()))
    return {**{k: v / n_global for k, v in zip(sums, totals)}, "positions": n_global}


def _check_step(group: Sequence[StudentBatch], objective: Objective, feature_teacher: Any, *, chunked: bool,
                whole_logits: bool) -> None:
    if chunked and whole_logits:
        raise ValueError("chunk_positions runs a causal LM's head chunk by chunk: it needs logits_fn=causal_lm_logits "
                         "and no on_logits (the whole logits are never made)")
    if not group:
        raise ValueError("a training step needs at least one micro-batch")
    if objective.needs_interventions and feature_teacher is None:
        raise ValueError("diito intervenes on the teacher's forward: it needs the teacher online (feature_teacher, "
                         "train.feature_teacher=online), not cached teacher features")


def _backward(model: nn.Module, batch: StudentBatch, objective: Objective, temperature: float, world: int,
              n_global: float, *, logits_fn: LogitsFn, autocast: Callable[[], AbstractContextManager],
              teacher: Callable[[StudentBatch], TeacherTargets] | None,
              feature_teacher: Callable[[StudentBatch], tuple[TeacherTargets | None, Features]] | None,
              chunk_positions: int | None = None):
    """One micro-batch of :func:`train_step`: its teacher targets and features, the student's
    forward, the objective, and ``loss_sum * world / n_global`` back-propagated. With
    ``chunk_positions`` the forward stops at the LM head's input and the objective runs the head
    chunk by chunk, under the same ``autocast`` as the forward (:meth:`~raykd.losses.Objective.from_hidden`).

    A ``feature_teacher``'s targets replace ``batch.targets`` unless None, its features
    ``batch.teacher_features``. The student's own features are captured around its forward when
    the objective has feature terms. An objective with an intervention term (DIITO) also gets the
    intervened forwards of student and teacher (:func:`raykd.train.interventions.interchange_forwards`),
    which need this online teacher.

    Returns:
        ``(the objective's output, the student's logits)`` (``[B, 0, V]`` when chunked).
    """
    targets = teacher(batch) if teacher is not None else batch.targets
    teacher_features = batch.teacher_features
    if feature_teacher is not None:
        online, teacher_features = feature_teacher(batch)
        targets = online if online is not None else targets
    with batch.context() if batch.context is not None else nullcontext(), autocast(), \
            capture_features(model, batch.inputs, attention=objective.needs_attention,
                             enabled=objective.needs_features) as captured, \
            head_input(model) if chunk_positions else nullcontext() as caught:
        logits = logits_fn(model, batch.inputs)
    features = (captured.features, teacher_features) if captured is not None else None
    intervened = None
    if objective.needs_interventions:  # a second, intervened forward of student and teacher
        context = batch.context() if batch.context is not None else nullcontext()
        with context, autocast():
            intervened = interchange_forwards(model, batch, objective, logits_fn, feature_teacher)
    if caught is not None:
        with autocast():
            out = objective.from_hidden(caught.hidden, caught.head, batch.labels, batch.mask, targets, temperature,
                                        features, intervened, chunk_positions=chunk_positions)
    else:
        out = objective(logits.float(), batch.labels, batch.mask, targets, temperature, features, intervened)
    (out.loss_sum * world / n_global).backward()
    return out, logits


def _update(optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float | None) -> None:
    """Clip the global gradient norm (when set), step the optimizer and the scheduler, clear the gradients."""
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_group: Callable[[float], Sequence[StudentBatch]],
    objective_at: Callable[[int], tuple[Objective, float]],
    *,
    max_steps: int,
    start: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **step_kwargs: Any,
) -> list[dict[str, float]]:
    """Train from step ``start`` to ``max_steps``: one :func:`train_step` per group of micro-batches.

    Args:
        next_group: the step's temperature -> its micro-batches (targets re-tempered to it where
            the caller needs that).
        objective_at: 0-based step -> ``(objective, temperature)`` (a schedule, or constant).
        on_step: called after every step with the 1-based step and its metrics (and whatever
            the caller adds to them, e.g. the learning rate). It may evaluate the model: the
            next step puts it back in training mode (dropout on).
        step_kwargs: passed to :func:`train_step` (``logits_fn``, ``scheduler``, ...).

    Returns:
        The metrics of every step run here, in order.
    """
    history = []
    for step in range(start, max_steps):
        model.train()  # every step: an on_step that evaluates (accuracy, held-out ppl) leaves it in eval mode
        objective, tau = objective_at(step)
        metrics = {**train_step(model, optimizer, next_group(tau), objective, tau, **step_kwargs), "temperature": tau}
        history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
    model.eval()
    return history


def lr_multiplier(kind: Literal["cosine", "linear", "constant"], warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of 0-based step ``step`` (for ``LambdaLR``).

    ``cosine``: linear warm-up over ``warmup`` steps, then a cosine decay to 0.1 of the peak at
    ``total``; ``linear``: linear warm-up, then a linear decay to 0 at ``total`` (transformers'
    ``get_linear_schedule_with_warmup``, the default of the MCKD and MUKI code); ``constant``: 1
    throughout.
    """
    if kind == "constant":
        return lambda step: 1.0
    if kind == "linear":
        return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def build_optimizer(params: Sequence[nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                    schedule: Literal["cosine", "linear", "constant"] = "constant", warmup: int = 0,
                    total: int = 1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (:func:`adamw`) and its learning-rate schedule (:func:`lr_multiplier`)."""
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, warmup, total))
