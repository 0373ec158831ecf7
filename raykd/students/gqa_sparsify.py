"""Structured sparsification of decoder LMs with grouped-query attention (Llama, SmolLM2, Qwen2).

The prunable units of decoder layer ``l`` are its **GQA head groups** and its **FFN neurons**:

- a group is one key/value head and the ``g = num_attention_heads / num_key_value_heads``
  query heads that read it: the group's ``g d`` rows of ``q_proj``, ``d`` rows of ``k_proj``
  and of ``v_proj``, and ``g d`` input columns of ``o_proj`` (``d`` = head size);
- a neuron is one row of ``gate_proj`` and of ``up_proj`` and one input column of ``down_proj``.

Why whole groups, not single query heads: a Llama attention computes ``repeat_kv``, every key
/value head serving exactly ``g`` consecutive query heads, the same ``g`` in every layer. Query
heads removed unevenly inside groups leave a model no Llama attention (nor vLLM's) can run; a
key/value head removed alone leaves its queries nothing to attend with. Removing a group keeps
every layer a plain GQA attention with ``g`` queries per key/value head (only the number of
groups varies), so :func:`densify` gives the masked model's exact outputs. The cost is a coarser
unit (SmolLM2-135M: 3 groups of 3 heads per layer, 295k parameters each, against 1,728 per neuron).

Embeddings, norms and the LM head are never pruned. *Sparsity* is the share of prunable
parameters removed. Units are scored with the first-order Taylor importance the classifier
path uses (Molchanov et al. 2019, ``sum |w * dL/dw|`` over a unit's parameters; heads as in
Michel et al. 2019) and chosen by :func:`raykd.students.sparsify.masks_for_sparsity` (one
ranking per parameter over groups and neurons); masks are the same :class:`Masks` (``heads``
holds one entry per group).

Pure torch + transformers; no Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from raykd.students.sparsify import MaskError, Masker, Masks, _keep_linear, masks_for_sparsity, summed_unit_scores

UNITS = ("heads", "neurons")
"""Unit kinds: ``heads`` = GQA head groups, ``neurons`` = FFN neurons."""


class UnrealisableSparsityError(ValueError):
    """A sparsity the model's units cannot reach (e.g. GQA head groups only, between two group counts)."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-like causal LM (``<base>.layers``).

    Raises:
        ValueError: the model has no Llama-style layers (``self_attn.{q,k,v,o}_proj`` and
            ``mlp.{gate,up,down}_proj``).
    """
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(base, "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        hasattr(lyr, "self_attn") and hasattr(lyr, "mlp") and hasattr(lyr.mlp, "down_proj") for lyr in layers)
    if not ok:
        raise ValueError(f"{type(model).__name__} is not a Llama-like decoder (layers[i].self_attn.q_proj/k_proj/v_proj/o_proj "
                         "and layers[i].mlp.gate_proj/up_proj/down_proj); GQA sparsification supports Llama, SmolLM2, Qwen2, Mistral")
    return layers


def gqa_shape(model: nn.Module) -> tuple[int, int]:
    """``(d, g)``: head size and query heads per key/value head (from the config; pruning keeps both)."""
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if c.num_attention_heads % kv:
        raise ValueError(f"num_attention_heads={c.num_attention_heads} is not a multiple of num_key_value_heads={kv}")
    return d, c.num_attention_heads // kv


def _groups(layer: nn.Module, d: int, g: int) -> int:
    return 0 if isinstance(layer.self_attn, _NoAttention) else layer.self_attn.o_proj.in_features // (g * d)


def _neurons(layer: nn.Module) -> int:
    return 0 if isinstance(layer.mlp, _NoMLP) else layer.mlp.down_proj.in_features


def structure(model: nn.Module) -> dict[str, list[int]]:
    """GQA groups and FFN neurons present per layer: ``{"heads": [...], "neurons": [...]}``."""
    d, g = gqa_shape(model)
    layers = decoder_layers(model)
    return {"heads": [_groups(lyr, d, g) for lyr in layers], "neurons": [_neurons(lyr) for lyr in layers]}


def unit_params(model: nn.Module) -> tuple[int, int]:
    """Parameters of one GQA group and of one FFN neuron: ``((2 g + 2) H d (+ biases), 3 H (+ biases))``."""
    c = model.config
    (d, g), h = gqa_shape(model), c.hidden_size
    group = (2 * g + 2) * h * d + ((g + 2) * d if getattr(c, "attention_bias", False) else 0)
    neuron = 3 * h + (2 if getattr(c, "mlp_bias", False) else 0)
    return group, neuron


def prunable_params(model: nn.Module) -> int:
    """Parameters in all GQA groups and FFN neurons now present (what sparsity is a share of)."""
    per_group, per_neuron = unit_params(model)
    s = structure(model)
    return per_group * sum(s["heads"]) + per_neuron * sum(s["neurons"])


def check_masks(model: nn.Module, masks: Masks) -> None:
    """Raise :class:`MaskError` unless ``masks`` has one mask per layer of the model's current sizes."""
    s = structure(model)
    got = {"heads": [int(m.numel()) for m in masks.heads], "neurons": [int(m.numel()) for m in masks.neurons]}
    if got != s:
        raise MaskError(f"masks do not match the model: model has GQA groups {s['heads']} and neurons {s['neurons']} per layer, "
                        f"masks have {got['heads']} and {got['neurons']}; derive the masks from this model")


def full_masks(model: nn.Module) -> Masks:
    """Masks that keep every group and neuron the model has."""
    s = structure(model)
    return Masks([torch.ones(n, dtype=torch.bool) for n in s["heads"]], [torch.ones(n, dtype=torch.bool) for n in s["neurons"]])


def _wg(p: Tensor | None) -> Tensor:
    if p is None or p.grad is None:
        return torch.zeros(0) if p is None else torch.zeros_like(p)
    return (p.detach() * p.grad).abs()


def _layer_scores(layer: nn.Module, d: int, g: int) -> tuple[Tensor, Tensor]:
    """``|w * grad|`` summed per GQA group ``[G]`` and per neuron ``[I]`` of one layer."""
    n_groups, heads = _groups(layer, d, g), torch.zeros(0)
    if n_groups:
        att = layer.self_attn
        heads = _wg(att.q_proj.weight).sum(1).view(n_groups, g * d).sum(1)
        heads = heads + _wg(att.o_proj.weight).sum(0).view(n_groups, g * d).sum(1)
        for lin in (att.k_proj, att.v_proj):
            heads = heads + _wg(lin.weight).sum(1).view(n_groups, d).sum(1)
        for lin, width in ((att.q_proj, g * d), (att.k_proj, d), (att.v_proj, d)):
            if lin.bias is not None:
                heads = heads + _wg(lin.bias).view(n_groups, width).sum(1)
    neurons = torch.zeros(0)
    if _neurons(layer):
        mlp = layer.mlp
        neurons = _wg(mlp.gate_proj.weight).sum(1) + _wg(mlp.up_proj.weight).sum(1) + _wg(mlp.down_proj.weight).sum(0)
        for lin in (mlp.gate_proj, mlp.up_proj):
            if lin.bias is not None:
                neurons = neurons + _wg(lin.bias)
    return heads.detach().cpu(), neurons.detach().cpu()


def taylor_importance(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> Masks:
    """First-order Taylor importance of every GQA group and FFN neuron (Molchanov et al. 2019).

    For each batch, ``loss_fn(model, batch)`` is back-propagated and ``|w * dL/dw|`` summed over
    each unit's parameters, then over batches. Weights are not changed; gradients are cleared.

    Args:
        model: a Llama-like causal LM (any current group/neuron counts).
        batches: a few batches (e.g. 2-8 train batches with cached teacher targets).
        loss_fn: scalar loss of the model on a batch (e.g. the KD objective against the teacher).

    Returns:
        A :class:`Masks`-shaped object of float scores (``heads``: one per group).

    Raises:
        ValueError: no batch was given, or the model is not Llama-like.
    """
    layers, (d, g) = decoder_layers(model), gqa_shape(model)
    return summed_unit_scores(model, layers, structure(model), batches, loss_fn, lambda layer: _layer_scores(layer, d, g))


def nearest_realisable(sparsity: float, model: nn.Module, units: Sequence[str] = UNITS) -> float:
    """The sparsity closest to ``sparsity`` that whole units of kinds ``units`` can remove.

    A removal of ``a`` groups and ``b`` neurons reaches ``(a P_g + b P_n) / P``; with neurons in
    ``units`` every sparsity is within one neuron, with GQA groups only the reachable sparsities
    are multiples of one group's share.

    Raises:
        ValueError: an unknown unit kind.
    """
    bad = [u for u in units if u not in UNITS]
    if bad or not units:
        raise ValueError(f"sparsify.units={list(units)}: choose from {list(UNITS)}")
    per_group, per_neuron = unit_params(model)
    s = structure(model)
    n_groups = sum(s["heads"]) if "heads" in units else 0
    n_neurons = sum(s["neurons"]) if "neurons" in units else 0
    total = prunable_params(model)
    want = sparsity * total
    best = 0.0
    for a in range(n_groups + 1):
        b = min(max(round((want - a * per_group) / per_neuron), 0), n_neurons) if n_neurons else 0
        got = a * per_group + b * per_neuron
        if abs(got - want) < abs(best - want):
            best = got
    return best / total


def check_sparsity_grid(grid: Sequence[float], model: nn.Module, units: Sequence[str] = UNITS, tolerance: float = 0.005) -> None:
    """Refuse grid sparsities the model's GQA groups (and neurons, when pruned) cannot realise.

    Args:
        grid: sparsities (share of prunable parameters) of the search.
        model: the dense teacher (or a model of its shape, e.g. built from its config).
        units: the unit kinds pruned (``heads`` = GQA groups, ``neurons``).
        tolerance: the largest gap allowed between a grid point and what whole units reach.

    Raises:
        UnrealisableSparsityError: naming the point, the nearest valid sparsity and the group size.
    """
    per_group, _ = unit_params(model)
    total = prunable_params(model)
    for s in grid:
        near = nearest_realisable(s, model, units)
        if abs(near - s) > tolerance:
            d, g = gqa_shape(model)
            raise UnrealisableSparsityError(
                f"sparsity {s:g} cannot be realised with units {list(units)}: one GQA head group ({g} query heads + 1 KV head "
                f"of size {d}) is {per_group / total:.4f} of the prunable parameters; the nearest valid sparsity is {near:.4f}")


def gqa_masks_for_sparsity(importance: Masks, sparsity: float, model: nn.Module, units: Sequence[str] = UNITS) -> Masks:
    """Keep masks removing ``sparsity`` of the prunable parameters, least important units first,
    only units of kinds ``units`` (the others count in the total but stay).

    Raises:
        ValueError: ``sparsity`` outside [0, 1] or an unknown unit kind.
    """
    nearest_realisable(0.0, model, units)  # checks the unit kinds
    return masks_for_sparsity(importance, sparsity, *unit_params(model), removable=set(units))


class GQAMasker(Masker):
    """Apply :class:`Masks` to a Llama-like model through forward pre-hooks, weights unchanged.

    The input of each ``o_proj`` ``[B, T, G g d]`` is multiplied by the group mask (each group's
    ``g d`` columns) and the input of each ``down_proj`` ``[B, T, I]`` by the neuron mask: a
    removed unit then adds nothing to the residual stream and gets no gradient, as if cut out
    (:func:`densify`). Use ``with masker.use(masks): model(...)`` (:class:`~raykd.students.sparsify.Masker`'s
    ``use`` and ``remove``; only the hooked modules differ).
    """

    def __init__(self, model: nn.Module) -> None:  # not super().__init__: that hooks a BERT-like model
        self.model = model
        self.masks: Masks | None = None
        d, g = gqa_shape(model)
        self._handles = []
        for i, layer in enumerate(decoder_layers(model)):
            self._handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._hook("heads", i, g * d)))
            self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._hook("neurons", i, 1)))

    def _check(self, masks: Masks) -> None:
        """Raise :class:`MaskError` when ``masks`` do not fit the model (GQA groups)."""
        check_masks(self.model, masks)


class _NoAttention(nn.Module):
    """Stands in for an attention whose every GQA group was removed: adds nothing to the residual."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        return torch.zeros_like(hidden_states), None


class _NoMLP(nn.Module):
    """Stands in for an MLP whose every neuron was removed."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def _keep(lin: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    if lin.bias is not None:
        return _keep_linear(lin, index, dim)
    index = index.to(lin.weight.device)
    new = nn.Linear(lin.in_features if dim == 0 else len(index), len(index) if dim == 0 else lin.out_features, bias=False,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight.detach().index_select(dim, index))
    return new


def densify(model: nn.Module, masks: Masks, *, inplace: bool = False) -> nn.Module:
    """Remove the masked GQA groups and FFN neurons for real (the masked model's outputs, smaller).

    Each kept group keeps its ``g`` query heads and its key/value head, so every attention stays
    a GQA attention with ``g`` queries per key/value head. A layer that loses every group (or
    every neuron) keeps a stand-in that adds zero.

    Args:
        model: a Llama-like causal LM.
        masks: keep masks of the model's current sizes.
        inplace: change ``model`` itself instead of a copy.

    Raises:
        MaskError: the masks do not fit the model.
    """
    check_masks(model, masks)
    if not inplace:
        model = copy.deepcopy(model)
    d, g = gqa_shape(model)
    for layer, hm, nm in zip(decoder_layers(model), masks.heads, masks.neurons):
        kept = hm.nonzero().flatten()
        if len(kept) == 0:
            if not isinstance(layer.self_attn, _NoAttention):
                layer.self_attn = _NoAttention()
        elif len(kept) < len(hm):
            att = layer.self_attn
            q_rows = (kept[:, None] * (g * d) + torch.arange(g * d)).flatten()
            kv_rows = (kept[:, None] * d + torch.arange(d)).flatten()
            att.q_proj = _keep(att.q_proj, q_rows, 0)
            att.k_proj = _keep(att.k_proj, kv_rows, 0)
            att.v_proj = _keep(att.v_proj, kv_rows, 0)
            att.o_proj = _keep(att.o_proj, q_rows, 1)
        keep_n = nm.nonzero().flatten()
        if len(keep_n) == 0:
            if not isinstance(layer.mlp, _NoMLP):
                layer.mlp = _NoMLP()
        elif len(keep_n) < len(nm):
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _keep(mlp.gate_proj, keep_n, 0), _keep(mlp.up_proj, keep_n, 0)
            mlp.down_proj = _keep(mlp.down_proj, keep_n, 1)
    return model
