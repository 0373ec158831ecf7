"""Reading features out of a forward pass, for the feature losses (:mod:`raykd.losses.features`).

:func:`capture_features` wraps one forward of a transformers model (student or teacher, encoder
or decoder) and records, without changing its output:

- the input of block 0 (the embeddings) and the output of every block (forward hooks on the
  model's block list, :func:`raykd.students.build.transformer_layers`): block outputs *before*
  any final norm, so a layer-dropped student's block ``i`` equals the teacher block it was
  copied from, whichever is last;
- with ``attention=True``, each block's attention queries, keys, values and additive mask, as the
  attention used them (a decoder's after the rotary embedding): for the length of the ``with``
  block the model runs :func:`capture_attention`, an eager attention registered with transformers'
  ``AttentionInterface`` under the name ``raykd_capture``, which records its inputs and computes
  exactly what eager attention computes.

:class:`FeatureTeacher` is the online teacher of the feature methods: one no-grad forward per
micro-batch gives both the teacher's logits (dense targets) and its features.
:func:`teacher_features` runs it once over a data set instead (the cached form).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from raykd.losses import TeacherTargets, get_loss
from raykd.losses.features import FeatureLayout, Features, LayerMap, _repeat_heads, features_from_batch, term_modules
from raykd.models import load_causal_lm
from raykd.students.build import transformer_layers
from raykd.train.optim import adamw
from raykd.train.schedule import StackedSchedule

ATTENTION_NAME = "raykd_capture"
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("raykd_attention_record", default=None)


def capture_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """Eager attention that also records ``(query, key, value, mask, scaling)`` when a capture is on.

    Args:
        query: ``[B, heads, T, d]``; key, value: ``[B, kv_heads, T, d]``.
        attention_mask: additive ``[B, 1, T, T]`` mask or None.

    Returns:
        ``([B, T, heads, d]`` output, ``[B, heads, T, T]`` attention probabilities).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    record = _RECORD.get()
    if record is not None:
        record.append((query, key, value, attention_mask, scaling))
    k, v = _repeat_heads(key, query.shape[1]), _repeat_heads(value, query.shape[1])
    scores = query @ k.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.nn.functional.dropout(probs, p=dropout, training=module.training) @ v
    return out.transpose(1, 2).contiguous(), probs


_REGISTERED: list[bool] = []


def _register() -> None:
    """Register :func:`capture_attention` (and transformers' eager mask for it), once."""
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, capture_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    _REGISTERED.append(True)


@dataclass
class Capture:
    """What one :func:`capture_features` block recorded; :attr:`features` is set when it ends."""

    token_mask: Tensor
    embeddings: Tensor | None = None
    hidden: list[Tensor] = field(default_factory=list)
    attention: list = field(default_factory=list)
    features: Features | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def _block_modules(model: nn.Module, transformer_layers) -> tuple[list[nn.Module], int]:
    """The modules whose outputs are a forward's block outputs, and how many outputs one forward
    gives (``config.num_hidden_layers``): the block list, each block run once; or, for a model
    with cross-layer parameter sharing (ALBERT: fewer block modules than blocks, each run several
    times in order), every module of transformers' block class of that model (its
    ``_can_record_outputs["hidden_states"]``), whose hooks then fire once per block."""
    n = model.config.num_hidden_layers
    try:
        return list(transformer_layers(model)), n
    except ValueError:
        kind = getattr(model, "_can_record_outputs", None) or {}
        kind = kind.get("hidden_states")
        shared = [m for m in model.modules() if isinstance(kind, type) and isinstance(m, kind)]
        if not shared:
            raise
        return shared, n


@contextlib.contextmanager
def capture_features(model: nn.Module, inputs: dict[str, Tensor], *, attention: bool = False,
                     enabled: bool = True) -> Iterator[Capture | None]:
    """Record the features of the forward passes of ``model`` run inside the block.

    Args:
        model: a transformers model (or a DDP wrapper of one).
        inputs: the forward's inputs; ``attention_mask`` ``[B, T]`` (or all ones) gives
            :attr:`Features.token_mask`.
        attention: also record queries, keys, values and masks (eager attention for the block).
        enabled: False yields None and records nothing (no hooks, the model's own attention).

    Yields:
        A :class:`Capture` whose ``features`` is filled in when the block ends.

    A shared-block model (ALBERT's cross-layer sharing) gives ``config.num_hidden_layers``
    hidden states and attentions too: its shared block's hooks fire once per block it stands for.

    Raises:
        ValueError: the forward ran no block, or ran them more than once.
    """
    if not enabled:
        yield None
        return

    if attention:
        _register()
    inner = _unwrap(model)
    layers, n = _block_modules(inner, transformer_layers)
    ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
    token_mask = inputs.get("attention_mask")
    token_mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device) if token_mask is None else token_mask.bool()
    cap = Capture(token_mask)

    def pre_hook(_module, args, kwargs):
        if cap.embeddings is None:  # a shared block (ALBERT) runs again on its own output
            cap.embeddings = args[0] if args else kwargs["hidden_states"]

    def hook(_module, _args, out):
        cap.hidden.append(out[0] if isinstance(out, tuple) else out)

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(hook) for layer in layers]
    before = inner.config._attn_implementation
    token = _RECORD.set(cap.attention if attention else None)
    try:
        if attention and before != ATTENTION_NAME:
            inner.set_attn_implementation(ATTENTION_NAME)
        yield cap
    finally:
        _RECORD.reset(token)
        for h in handles:
            h.remove()
        if attention and before != ATTENTION_NAME:
            inner.set_attn_implementation(before)
    if len(cap.hidden) != n or (attention and len(cap.attention) != n):
        raise ValueError(f"captured {len(cap.hidden)} block outputs and {len(cap.attention)} attentions for a model of {n} "
                         "blocks; run exactly one forward inside capture_features")
    q, k, v, m, s = zip(*cap.attention) if attention else ((), (), (), (), (None,))
    cap.features = Features(cap.embeddings, cap.hidden, token_mask, list(q), list(k), list(v), list(m), s[0])


class FeatureTeacher:
    """The online teacher of the feature methods: one no-grad forward gives its logits and features.

    Args:
        model: the frozen teacher (put in eval mode here).
        logits_fn: how its logits are read (:data:`raykd.train.step.STUDENT_KINDS`); they become
            dense targets ``[B, P, V]``. None: features only (the forward stops before the head,
            ``model.base_model``; the logit terms keep their cached targets).
        attention: capture queries, keys and values too (an objective's ``needs_attention``).
    """

    def __init__(self, model: nn.Module, logits_fn, *, attention: bool):
        self.model, self.logits_fn, self.attention = model.eval(), logits_fn, attention

    @classmethod
    def load(cls, path: str, *, attention: bool) -> FeatureTeacher:
        """The features-only teacher of the causal LM folder ``path``: what the feature cache is
        filled with (:func:`raykd.soft_labels.feature_cache.label_features` receives this loader)."""
        return cls(load_causal_lm(path), None, attention=attention)

    def __call__(self, batch) -> tuple[TeacherTargets | None, Features]:
        """A :class:`~raykd.train.step.StudentBatch` -> (dense targets or None, teacher features)."""
        return self.forward(batch.inputs)

    @torch.no_grad()
    def forward(self, inputs: dict[str, Tensor]) -> tuple[TeacherTargets | None, Features]:
        """Model inputs (``input_ids``, ``attention_mask`` ``[B, T]``) -> (dense targets or None, features)."""
        with capture_features(self.model, inputs, attention=self.attention) as cap:
            if self.logits_fn is None:
                self.model.base_model(**inputs)
            else:
                logits = self.logits_fn(self.model, inputs)
        return (None if self.logits_fn is None else TeacherTargets.dense(logits.float())), cap.features


def compact(f: Features, *, hidden: Sequence[int] = (), attention: Sequence[int] = (), embeddings: bool = False,
            first_token_only: bool = False, causal: bool = False, dtype: torch.dtype = torch.float16) -> Features:
    """The compact form of teacher features to cache: only the blocks a method reads, in ``dtype``,
    on the CPU, without the ``[B, 1, T, T]`` masks (rebuilt from the token mask and ``causal``).

    Args:
        f: features of a batch (detached, e.g. from :class:`FeatureTeacher`).
        hidden: blocks whose outputs are kept; attention: blocks whose queries, keys and values
            are kept; embeddings: keep the embeddings.
        first_token_only: keep only the first token of the hidden states (PKD, ALP-KD on [CLS]).
        causal: the model is a decoder (see :attr:`Features.causal`).

    Returns:
        :class:`Features` with ``None`` for every block not kept.
    """
    keep = lambda x: None if x is None else x.detach().to("cpu", dtype)  # noqa: E731
    n = f.num_layers
    h = [keep(f.hidden[i][:, :1] if first_token_only else f.hidden[i]) if i in set(hidden) else None for i in range(n)]
    att = set(attention)
    qkv = [[keep(xs[i]) if i in att else None for i in range(n)] for xs in (f.queries, f.keys, f.values)] if att else [[], [], []]
    return Features(keep(f.embeddings) if embeddings else None, h, f.token_mask.cpu(), *qkv,
                    [None] * n if att else [], f.scaling, causal)


def concat_features(parts: Sequence[Features]) -> Features:
    """Features of several batches (same layout) as one, rows in order."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    first = parts[0]
    per_layer = lambda name: [cat([getattr(p, name)[i] for p in parts]) for i in range(len(getattr(first, name)))]  # noqa: E731
    return Features(cat([p.embeddings for p in parts]), per_layer("hidden"), torch.cat([p.token_mask for p in parts]),
                    per_layer("queries"), per_layer("keys"), per_layer("values"), list(first.attention_masks),
                    first.scaling, first.causal)


def feature_bytes(f: Features) -> int:
    """Bytes of the tensors a (compact) :class:`Features` holds, token mask excluded."""
    tensors = [f.embeddings, *f.hidden, *f.queries, *f.keys, *f.values, *f.attention_masks]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class FeatureTerms:
    """The feature side of a training run: the teacher's features (a frozen :class:`FeatureTeacher`
    in this process, or None when they come cached on the batch), the checked layer map, and the
    learned projections of the terms that have them (created only when the widths differ, trained
    by an AdamW of their own, stepped after each student step; they are not part of the student
    and are dropped at export).

    Args:
        student: the student (unwrapped), for its width and block count.
        layer_map: the ``(student layer, teacher layer)`` pairs, checked against both models here.
        terms: every feature term any objective of the run uses.
        teacher: the frozen teacher model (same tokenizer as the student), or None (cached features).
        teacher_shape: ``(blocks, width)`` of the teacher when ``teacher`` is None.
        attention: capture queries, keys and values (some term reads them).
        dense_logits: the teacher's forward also gives dense targets (``train.online_teacher``);
            False: features only, the logit terms keep their cached targets.
        lr: learning rate of the projections.
        params: ``{term: {hyper-param: value}}`` (a term's learned maps may be sized by them).
        stages: SID's :class:`~raykd.train.schedule.StackedSchedule` when a term is ``sid``: the
            loop applies it to every step's weights and steps it here; its stage is in the state.

    Raises:
        ValueError: the layer map does not fit the two models' block counts.
    """

    def __init__(self, student: nn.Module, layer_map, terms: Sequence[str], *, teacher: nn.Module | None = None,
                 teacher_shape: tuple[int, int] | None = None, attention: bool = False, dense_logits: bool = False,
                 lr: float = 1e-3, params: dict | None = None, stages=None):
        blocks, width = ((teacher.config.num_hidden_layers, teacher.config.hidden_size) if teacher is not None
                         else teacher_shape)
        self.layer_map = LayerMap(tuple(map(tuple, layer_map)), student.config.num_hidden_layers, blocks)
        lm_logits = lambda m, inputs: m(**inputs).logits  # noqa: E731  (step.causal_lm_logits; step imports this module)
        self.teacher = (FeatureTeacher(teacher, lm_logits if dense_logits else None, attention=attention)
                        if teacher is not None else None)
        widths = (student.config.hidden_size, width)
        built = {n: term_modules(get_loss(n), widths, self.layer_map, (params or {}).get(n)) for n in terms}
        self.projections = nn.ModuleDict({n: m for n, m in built.items() if m is not None}).to(next(student.parameters()).device)
        trained = list(self.projections.parameters())
        self.optimizer = adamw(trained, lr=lr, weight_decay=0.01) if trained else None  # torch's default decay, as before
        self.stages = stages
        self.cached = None
        """``(layout, shapes)`` of cached teacher features on the batches, or None (online)."""

    @classmethod
    def for_run(cls, layer_map, terms: Sequence[str], student: nn.Module, device, *, teacher_path: str | None = None,
                layout: dict | None = None, shapes: dict | None = None, dense_logits: bool = False,
                lr: float = 1e-3, params: dict | None = None, total_steps: int | None = None) -> FeatureTerms | None:
        """The feature side of a Train worker's run (None without a layer map: no feature term).

        Args:
            layer_map: the checked pairs; terms: every loss of the run (the feature ones are kept).
            teacher_path: the teacher folder to run here (online); or
            layout, shapes: the cached features' layout and shapes, read from the batches.
            params: the terms' hyper-parameters; total_steps: the run's steps (SID's stages).

        Raises:
            ValueError: neither a teacher folder nor a cached layout.
        """
        if layer_map is None:
            return None

        stages = None
        if "sid" in terms:
            gated = [n for n in terms if get_loss(n).kind == "logits"]
            stages = StackedSchedule(len(layer_map), total_steps or 1, gated,
                                     float((params or {}).get("sid", {}).get("threshold", 0.0)))
        terms = [n for n in terms if get_loss(n).kind == "features"] + (["sid_cos"] if stages is not None else [])
        kw = {"lr": lr, "params": params, "stages": stages}
        if layout is not None:
            out = cls(student, layer_map, terms, teacher_shape=(shapes["layers"], shapes["hidden"]), **kw)

            out.cached = (FeatureLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in layout.items()}), shapes)
            return out
        if teacher_path is None:
            raise ValueError("feature terms need the teacher's folder (online) or its cached features' layout")

        teacher = load_causal_lm(teacher_path).requires_grad_(False).to(device)
        return cls(student, layer_map, terms, teacher=teacher, attention=any(get_loss(n).attention for n in terms),
                   dense_logits=dense_logits, **kw)

    def attach(self, sb, batch: dict[str, Tensor]):
        """``sb`` (a :class:`~raykd.train.step.StudentBatch`) with the cached teacher features of
        its rows (the batch's ``f.*`` columns); unchanged when the teacher runs online."""
        if self.cached is not None:
            sb.teacher_features = features_from_batch(batch, *self.cached)
        return sb

    def step(self, step: int | None = None, metrics: dict[str, float] | None = None) -> None:
        """Step the projections' optimizer (after the student's step: their gradients accumulated
        over its micro-batches), and SID's stages with the 1-based ``step`` and its ``metrics``."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.stages is not None and step is not None:
            self.stages.update(step, metrics or {})

    def weights_at(self, weights: dict[str, float], params: dict[str, dict]) -> tuple[dict[str, float], dict[str, dict]]:
        """The step's weights and params: SID's stage applied (:meth:`StackedSchedule.apply`), else unchanged."""
        return self.stages.apply(weights, params) if self.stages is not None else (weights, params)

    def state_dict(self) -> dict:
        return {"projections": self.projections.state_dict(),
                "optim": self.optimizer.state_dict() if self.optimizer is not None else None,
                "stages": self.stages.state_dict() if self.stages is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.projections.load_state_dict(state["projections"])
        if self.optimizer is not None and state.get("optim") is not None:
            self.optimizer.load_state_dict(state["optim"])
        if self.stages is not None and state.get("stages") is not None:
            self.stages.load_state_dict(state["stages"])
