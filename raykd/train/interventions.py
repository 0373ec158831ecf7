"""Interchange interventions for DIITO (Wu et al. 2022, "Causal Distillation for Language
Models", NAACL): a second forward of student and teacher in which one aligned block's outputs at
sampled positions are replaced by those of a *dual* example.

The dual of batch row ``b`` is row ``b + 1`` (the batch rolled by one, the last row taking the
first), as the seed does. Blocks before the intervened one see the plain inputs, so the dual
row's states there are the ones of this very forward: :func:`interchange` swaps them in place
inside the forward (a forward hook on the block), and one forward gives the intervened outputs.
Works on encoders and decoders (any model :func:`raykd.students.build.transformer_layers` reads).

:func:`interchange_forwards` is what the shared step (:func:`raykd.train.step.train_step`) runs
for a micro-batch when the objective has an intervention term (``diito``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from raykd.losses.features import Intervened, LayerMap
from raykd.losses.interchange import ALIGNMENTS
from raykd.students.build import transformer_layers
from raykd.train.features import _unwrap, capture_features


def choose_pair(layer_map: LayerMap, alignment: str, rng: random.Random | None = None) -> tuple[int, int]:
    """The aligned ``(student block, teacher block)`` of one step.

    ``full``: a pair of the layer map drawn at random per step; ``middle``: its middle pair
    (``pairs[len // 2]``); ``late``: its last pair.

    Raises:
        ValueError: an unknown ``alignment``.
    """
    if alignment == "full":
        return (rng or random).choice(layer_map.pairs)
    if alignment == "middle":
        return layer_map.pairs[len(layer_map.pairs) // 2]
    if alignment == "late":
        return layer_map.last
    raise ValueError(f"diito alignment must be one of {ALIGNMENTS}, got {alignment!r}")


def interchange_masks(token_mask: Tensor, prop: float = 0.3, max_tokens: int = -1,
                      rng: random.Random | None = None) -> tuple[Tensor, Tensor]:
    """Sample the positions to swap: per row a consecutive span of ``int(prop * min(n, n_dual))``
    real tokens (at most ``max_tokens``; -1: no cap), ``n`` and ``n_dual`` the real-token counts of
    the row and of its dual (the next row), placed at random in each of the two rows (the seed's
    ``diito_interchange_way=consecutive``).

    Args:
        token_mask: ``[B, T]`` bool, True at real tokens (left or right padding).
        prop: share of the shorter row's tokens swapped, in ``[0, 1]``.

    Returns:
        ``(mask, dual_mask)``, ``[B, T]`` bool: row ``b``'s positions to replace, and row
        ``b + 1``'s positions they take their states from (the same count per row, in order).
    """
    token_mask = token_mask.bool()
    dual = torch.roll(token_mask, -1, 0)
    rng = rng or random
    mask, dual_mask = torch.zeros_like(token_mask), torch.zeros_like(token_mask)
    for b in range(token_mask.shape[0]):
        real, dual_real = token_mask[b].nonzero().view(-1), dual[b].nonzero().view(-1)
        count = int(min(len(real), len(dual_real)) * prop)
        count = min(count, max_tokens) if max_tokens >= 0 else count
        if count <= 0:
            continue
        start, dual_start = rng.randint(0, len(real) - count), rng.randint(0, len(dual_real) - count)
        mask[b, real[start:start + count]] = True
        dual_mask[b, dual_real[dual_start:dual_start + count]] = True
    return mask, dual_mask


@contextlib.contextmanager
def interchange(model: nn.Module, layer: int, mask: Tensor, dual_mask: Tensor) -> Iterator[None]:
    """Inside the block, every forward of ``model`` has block ``layer``'s output ``h`` ``[B, T, H]``
    replaced at ``mask`` by the dual rows' states at ``dual_mask``:
    ``h'[b, mask[b]] = h[b + 1, dual_mask[b]]`` (out of place, so gradients flow through both).

    Raises:
        ValueError: ``mask`` and ``dual_mask`` differ in count in some row.
    """
    if not torch.equal(mask.sum(1), dual_mask.sum(1)):
        raise ValueError("interchange needs as many dual positions as replaced positions in every row")
    block = transformer_layers(_unwrap(model))[layer]

    def hook(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        swapped = h.clone()
        swapped[mask.to(h.device)] = torch.roll(h, -1, 0)[dual_mask.to(h.device)]
        return (swapped, *out[1:]) if isinstance(out, tuple) else swapped

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def interchange_forwards(model: nn.Module, batch, objective, logits_fn, feature_teacher) -> Intervened:
    """The intervened forwards of one micro-batch for the objective's intervention term.

    Args:
        model: the student (with grad).
        batch: a :class:`~raykd.train.step.StudentBatch`.
        objective: its :attr:`~raykd.losses.Objective.intervention_params` (``alignment``,
            ``interchange_prop``, ``max_tokens``) and layer map choose the pair and the positions.
        logits_fn: the student kind's logits.
        feature_teacher: the online :class:`~raykd.train.features.FeatureTeacher` (its model runs
            the teacher's intervened forward, without gradients).

    Returns:
        :class:`~raykd.losses.features.Intervened`.

    Raises:
        ValueError: no online teacher (cached teacher features cannot be intervened on).
    """
    if feature_teacher is None:
        raise ValueError("diito intervenes on the teacher's forward: it needs the teacher online (a FeatureTeacher; "
                         "train.feature_teacher=online), not cached teacher features")
    p = objective.intervention_params
    pair = choose_pair(objective.layer_map, p["alignment"])
    mask, dual_mask = interchange_masks(batch.inputs["attention_mask"] if "attention_mask" in batch.inputs
                                        else torch.ones(batch.inputs["input_ids"].shape, dtype=torch.bool),
                                        p["interchange_prop"], int(p["max_tokens"]))
    teacher = feature_teacher.model
    teacher_logits_fn = feature_teacher.logits_fn or (lambda m, inputs: m(**inputs).logits)
    with torch.no_grad(), interchange(teacher, pair[1], mask, dual_mask), \
            capture_features(teacher, batch.inputs) as t_cap:
        t_logits = teacher_logits_fn(teacher, batch.inputs)
    with interchange(model, pair[0], mask, dual_mask), capture_features(model, batch.inputs) as s_cap:
        s_logits = logits_fn(model, batch.inputs)
    return Intervened(s_logits.float(), t_logits.float(), s_cap.features, t_cap.features, pair, mask, dual_mask)
