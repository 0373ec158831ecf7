"""A student's training objective: a weighted sum of named registry losses.

The config gives ``{loss name: weight}`` (and optionally ``{loss name: {hyper-param: value}}``);
:class:`Objective` computes every term once per micro-batch and returns *sums* over the valid
tokens, never means:

    loss_sum = sum_i weight_i * sum_{valid tokens} term_i

Normalisation is left to the training loop, which divides ``loss_sum`` by the GLOBAL number of
valid tokens of the optimizer step: ``num_tokens`` all-reduced over the workers and summed over
the gradient-accumulation micro-batches. Every token then carries the same weight 1 / N however
the step is split, so the gradients do not change with ``grad_accum`` or ``num_workers`` (a mean
per micro-batch would give the tokens of short micro-batches more weight). Where DDP averages
gradients over W workers, divide by N / W instead so the factor 1 / W cancels.

Terms with weight 0 are still computed, under ``torch.no_grad``, so they can be logged.

Feature terms (``kind="features"``, :mod:`raykd.losses.features`) read the student's and the
teacher's features through an explicit :class:`~raykd.losses.features.LayerMap`; their learned
projections (created only when the widths differ) belong to the objective
(:meth:`Objective.parameters`): train them with the student; they are not part of the student
and are dropped at export.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raykd.losses.chunked import at_positions, chunked_head_loss
from raykd.losses.features import Features, Intervened, LayerMap, term_modules, to_positions
from raykd.losses.interchange import check_interchange_params
from raykd.losses.reduction import count_tokens, masked_sum, shared_log_probs
from raykd.losses.registry import COMMON_ARGS as _COMMON_ARGS
from raykd.losses.registry import LossSpec, get_loss
from raykd.losses.targets import TeacherTargets


def validate_weights(weights: Mapping[str, float]) -> None:
    """Check an objective's ``{loss name: weight}`` mapping before any work starts.

    Raises:
        KeyError: a name is not a registered loss; the message lists the valid names.
        ValueError: the mapping is empty, a weight is not a finite number >= 0, or all
            weights are zero.
    """
    if not weights:
        raise ValueError("the objective has no terms; give {loss name: weight}, e.g. {'forward_kl': 1.0}")
    for name, weight in weights.items():
        get_loss(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"weight of {name!r} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name!r} must be finite and >= 0, got {weight}")
    if all(weight == 0 for weight in weights.values()):
        raise ValueError(f"all weights are zero in {dict(weights)}; give at least one term a weight > 0")


def validate_params(params: Mapping[str, Mapping[str, Any]], terms: list[str] | tuple[str, ...]) -> None:
    """Check ``{loss name: {hyper-param: value}}`` against the objective's ``terms`` and each
    loss's declared hyper-parameters (:class:`~raykd.losses.registry.Param`: type and range).

    Raises:
        KeyError: an unknown loss name (the message lists the valid ones).
        ValueError: params for a loss that is not a term, a hyper-parameter the loss does not
            accept (the message lists the ones it accepts), or a value of the wrong type or out
            of range (the message names the setting, the valid range and what the value means).
    """
    for name, p in params.items():
        spec = get_loss(name)
        if name not in terms:
            raise ValueError(f"params given for {name!r}, which is not a term of {sorted(terms)}")
        _check_params(spec, p)


def _check_params(spec: LossSpec, params: Mapping[str, Any]) -> None:
    accepted = sorted(spec.params)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {spec.name!r} has no hyper-parameters {unknown}; it accepts {accepted}")
    for key, value in params.items():
        declared = spec.params[key]
        if not declared.accepts(value):
            meaning = f" ({declared.meaning})" if declared.meaning else ""
            raise ValueError(f"train.loss_params.{spec.name}.{key}={value!r} is out of range: it must be "
                             f"{declared.describe()}{meaning}")


def with_defaults(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A loss's hyper-parameters: ``params`` over the defaults of its function's signature.

    Raises:
        KeyError: an unknown loss name.
    """
    signature = inspect.signature(get_loss(name).fn).parameters
    defaults = {k: p.default for k, p in signature.items()
                if p.kind is p.KEYWORD_ONLY and k not in _COMMON_ARGS and p.default is not p.empty}
    return {**defaults, **params}


@dataclass(frozen=True)
class ObjectiveOutput:
    """What :class:`Objective` returns for one micro-batch.

    Attributes:
        loss_sum: scalar fp32, sum over terms of weight * masked sum of the term; divide by
            the global token count (see the module docstring) before ``backward``.
        term_sums: each term's masked sum, detached (weight-0 terms included), for logging.
        num_tokens: scalar int64, valid tokens in this micro-batch.
    """

    loss_sum: Tensor
    term_sums: dict[str, Tensor]
    num_tokens: Tensor


class Objective:
    """Weighted sum of registry losses, e.g. ``Objective({"forward_kl": 0.5, "ce": 0.5})``.

    Args:
        weights: ``{loss name: weight}``; see :func:`validate_weights`.
        params: optional ``{loss name: {hyper-param: value}}``, e.g.
            ``{"generalized_jsd": {"beta": 0.9}}``; defaults come from the loss functions.
        layer_map: the ``(student layer, teacher layer)`` pairs of the feature terms (required
            when there is one).
        widths: ``(student width, teacher width)`` of the hidden states; the feature terms'
            projections are created when they differ.
        projections: the feature terms' projections ``{term: {name: module}}`` owned by the
            caller (kept across the objectives of a schedule, trained by the caller's
            optimizer); given, ``widths`` is not used.

    Raises:
        KeyError: an unknown loss name (the message lists the valid ones).
        ValueError: invalid weights, params for a loss that is not a term or that the loss
            does not accept, a feature term without a layer map, or DIITO's plan out of range.
    """

    def __init__(self, weights: Mapping[str, float], params: Mapping[str, Mapping[str, Any]] | None = None, *,
                 layer_map: LayerMap | None = None, widths: tuple[int, int] | None = None,
                 projections: nn.ModuleDict | None = None):
        validate_weights(weights)
        self.weights = {name: float(w) for name, w in weights.items()}
        self.specs = {name: get_loss(name) for name in self.weights}
        self.params = {name: dict(p) for name, p in (params or {}).items()}
        validate_params(self.params, list(self.specs))
        if self.needs_features and layer_map is None:
            raise ValueError(f"feature terms {self._feature_terms()} need a layer map: Objective(..., layer_map="
                             "LayerMap.from_keep_layers(keep_layers, teacher_layers)) or explicit (student, teacher) pairs")
        self.layer_map = layer_map
        if self.needs_interventions:
            check_interchange_params(self.intervention_params)
        built = {name: term_modules(self.specs[name], widths, layer_map, self.params.get(name))
                 for name in self._feature_terms()} if projections is None else {}
        self.projections = projections if projections is not None else nn.ModuleDict(
            {name: m for name, m in built.items() if m is not None})

    def _feature_terms(self) -> list[str]:
        return [n for n, s in self.specs.items() if s.kind == "features"]

    @property
    def needs_teacher(self) -> bool:
        """Whether any logit term (weight 0 included, it is still logged) needs teacher targets."""
        return any(spec.needs_teacher and spec.kind == "logits" for spec in self.specs.values())

    @property
    def needs_features(self) -> bool:
        """Whether any term reads student and teacher features."""
        return bool(self._feature_terms())

    @property
    def needs_attention(self) -> bool:
        """Whether any feature term reads the attention's queries, keys and values."""
        return any(self.specs[n].attention for n in self._feature_terms())

    @property
    def needs_interventions(self) -> bool:
        """Whether any term reads an interchange-intervened forward (:class:`~raykd.losses.features.Intervened`)."""
        return any(self.specs[n].interventions for n in self._feature_terms())

    @property
    def intervention_params(self) -> dict[str, Any]:
        """The hyper-parameters of the intervention term (defaults from its function filled in),
        which the step reads to plan the interchange."""
        name = next(n for n in self._feature_terms() if self.specs[n].interventions)
        return with_defaults(name, self.params.get(name, {}))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The learned projections of the feature terms (none when the widths agree): give them
        to the optimizer with the student's parameters."""
        return self.projections.parameters()

    def __call__(self, student_logits: Tensor, labels: Tensor, mask: Tensor, targets: TeacherTargets | None,
                 temperature: float, features: tuple[Features, Features] | None = None,
                 intervened: Intervened | None = None) -> ObjectiveOutput:
        """Compute every term on one micro-batch.

        Args:
            student_logits: [B, T, V] student logits (position t predicts token t + 1).
            labels: [B, T] next-token ids, -100 where ignored.
            mask: [B, T] bool (or 0/1), True where a token counts; False wherever labels < 0.
            targets: teacher targets over the same [B, T] (and V, if dense), or None when no
                term needs a teacher.
            temperature: softmax temperature tau > 0 of the teacher terms.
            features: ``(student, teacher)`` features of this micro-batch, needed by feature
                terms (each returns per-token or per-sequence losses, reduced to the ``[B, P]``
                positions by :func:`~raykd.losses.features.to_positions`).
            intervened: the interchange-intervened forwards of this micro-batch, needed by an
                intervention term (DIITO; :func:`raykd.train.interventions.interchange_forwards`).

        Returns:
            :class:`ObjectiveOutput` with the weighted sum, per-term sums and token count.

        Raises:
            ValueError: inputs disagree in shape, a term needs targets and got None or a form
                it does not accept, teacher ids fall outside V, or a masked-in label is < 0.
        """
        self._check_all(tuple(student_logits.shape), labels, mask, targets, temperature, features, intervened)

        def term(name: str) -> Tensor:
            return masked_sum(self._term(name, student_logits, labels, targets, temperature, features, intervened), mask)

        with shared_log_probs():
            loss_sum, term_sums = self._weighted(self.weights, term)
        return ObjectiveOutput(loss_sum=loss_sum, term_sums=term_sums, num_tokens=count_tokens(mask))

    def from_hidden(self, hidden: Tensor, head: nn.Linear, labels: Tensor, mask: Tensor,
                    targets: TeacherTargets | None, temperature: float, features: tuple[Features, Features] | None = None,
                    intervened: Intervened | None = None, *, chunk_positions: int) -> ObjectiveOutput:
        """The objective of the logits ``head(hidden)``, with the LM head and every logit term run
        on chunks of ``chunk_positions`` valid positions (:mod:`raykd.losses.chunked`), so the
        logits of the whole micro-batch are never held at once. Values and gradients equal
        ``self(head(hidden), ...)`` up to the order of the sums; feature terms run as there.

        Only the positions where ``mask`` is True are read (a masked position adds nothing to any
        term), so padding costs no head matmul.

        Args:
            hidden: ``[B, T, H]`` the student's final hidden states (the LM head's input, with grad).
            head: the LM head, an ``nn.Linear`` ``[..., H] -> [..., V]`` (``weight`` ``[V, H]``:
                the model's ``get_output_embeddings()``).
            chunk_positions: positions per chunk, >= 1 (the last chunk may be shorter).
            labels, mask, targets, temperature, features, intervened: as in :meth:`__call__`.

        Returns:
            :class:`ObjectiveOutput` as :meth:`__call__` gives it.

        Raises:
            ValueError: as :meth:`__call__`, ``hidden`` is not ``[B, T, H]``, the head is not an
                ``nn.Linear``, or ``chunk_positions < 1``.
        """
        _check(hidden.dim() == 3, f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
        self._check_all((*hidden.shape[:2], head.weight.shape[0]), labels, mask, targets, temperature, features,
                        intervened)
        valid = mask.bool().flatten().nonzero().squeeze(-1)
        flat_labels = labels.flatten()
        logit_terms = [n for n in self.weights if self.specs[n].kind == "logits"]

        def chunk_loss(logits: Tensor, index: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
            chunk = (logits.unsqueeze(0), flat_labels[index].unsqueeze(0), at_positions(targets, index))
            with shared_log_probs():
                return self._weighted(logit_terms, lambda n: self._term(n, *chunk, temperature, None).sum())

        loss_sum, term_sums = chunked_head_loss(hidden.flatten(0, 1)[valid], head, chunk_loss, chunk_positions, valid)
        rest, rest_sums = self._weighted([n for n in self.weights if n not in logit_terms], lambda n: masked_sum(
            self._term(n, None, labels, targets, temperature, features, intervened), mask))
        sums = {**term_sums, **rest_sums}
        zero = hidden.new_zeros((), dtype=torch.float32)
        return ObjectiveOutput(loss_sum=loss_sum if rest is None else loss_sum + rest,
                               term_sums={n: sums.get(n, zero) for n in self.weights}, num_tokens=count_tokens(mask))

    def _weighted(self, names, term) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The weighted sum of the terms ``names`` (``term(name)``: the term's sum, computed under
        no_grad where its weight is 0, logged only), or None when none has a weight; and each
        term's sum, detached."""
        loss_sum, term_sums = None, {}
        for name in names:
            weight = self.weights[name]
            with torch.set_grad_enabled(weight > 0 and torch.is_grad_enabled()):
                value = term(name)
            term_sums[name] = value.detach()
            if weight > 0:
                loss_sum = weight * value if loss_sum is None else loss_sum + weight * value
        return loss_sum, term_sums

    def _check_all(self, shape: tuple[int, int, int], labels: Tensor, mask: Tensor, targets: TeacherTargets | None,
                   temperature: float, features: tuple[Features, Features] | None,
                   intervened: Intervened | None) -> None:
        self._check_inputs(shape, labels, mask, targets, temperature)
        self._check_features(features)
        if self.needs_interventions and intervened is None:
            raise ValueError("an intervention term (diito) needs the intervened forwards of the batch; train through "
                             "raykd.train.step.train_step with the teacher online (feature_teacher)")

    def _term(self, name: str, student_logits: Tensor, labels: Tensor, targets: TeacherTargets | None,
              temperature: float, features: tuple[Features, Features] | None,
              intervened: Intervened | None = None) -> Tensor:
        """One term's unreduced loss over the ``[B, P]`` positions."""
        spec, params = self.specs[name], self.params.get(name, {})
        if spec.kind == "logits":
            return spec.fn(student_logits, targets=targets, labels=labels, temperature=temperature, **params)
        student, teacher = features
        projections = dict(self.projections[name]) if name in self.projections else {}
        extra = {"intervened": intervened, "temperature": temperature} if spec.interventions else {}
        loss = spec.fn(student, teacher, layer_map=self.layer_map, projections=projections, **extra, **params)
        return to_positions(loss, student.token_mask, labels.shape[1])

    def _check_features(self, features: tuple[Features, Features] | None) -> None:
        if not self.needs_features:
            return
        if features is None:
            raise ValueError(f"feature terms {self._feature_terms()} need (student, teacher) features, got None; "
                             "train with a feature teacher (raykd.train.features.FeatureTeacher) or cached teacher features")
        student, teacher = features
        self.layer_map.check(student, teacher)
        if self.needs_attention and not (student.has_attention() and teacher.has_attention()):
            raise ValueError(f"terms {[n for n in self._feature_terms() if self.specs[n].attention]} need attention "
                             "features; capture them with attention=True")
        if None not in (student.width, teacher.width) and student.width != teacher.width:
            missing = [n for n in self._feature_terms()
                       if (self.specs[n].projections or self.specs[n].modules) and n not in self.projections]
            if missing:
                raise ValueError(f"student width {student.width} != teacher width {teacher.width}, and terms {missing} "
                                 "have no projection: build the Objective with widths=(student, teacher)")

    def _check_inputs(self, shape: tuple[int, ...], labels: Tensor, mask: Tensor,
                      targets: TeacherTargets | None, temperature: float) -> None:
        _check(len(shape) == 3, f"student_logits must be [B, T, V], got {shape}")
        _check(labels.shape == mask.shape == shape[:2],
               f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must be [B, T] = {shape[:2]}")
        _check(0.0 < temperature < math.inf, f"temperature must be positive and finite, got {temperature}")
        for name, spec in self.specs.items():
            if spec.kind == "logits" and spec.needs_teacher and (targets is None or targets.form not in spec.forms):
                got = "None" if targets is None else f"{targets.form} targets"
                raise ValueError(f"loss {name!r} accepts teacher targets of forms {spec.forms}, got {got}")
        if not all(spec.needs_teacher for spec in self.specs.values()):  # a term reads the hard labels
            _check(not bool((mask.bool() & (labels < 0)).any()),
                   "mask is True where labels < 0 (-100 = ignored); mask those positions out")
        if targets is not None and self.needs_teacher:
            _check_targets(targets, shape)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_targets(targets: TeacherTargets, student_shape: tuple[int, int, int]) -> None:
    """Teacher and student must agree on [B, T] and on the vocabulary."""
    (b, t, v) = student_shape
    bt = targets.batch_shape
    _check(bt == (b, t), f"teacher targets are [B, T] = {bt}, student logits are {(b, t)}")
    if targets.form == "dense":
        teacher_v = targets.logits.shape[-1]
        _check(teacher_v == v, f"teacher vocab {teacher_v} != student vocab {v}; they must be the same")
    else:
        top = int(targets.topk_ids.max())
        _check(top < v, f"teacher top-k ids reach {top}, outside the student vocab of {v}")
