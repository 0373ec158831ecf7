"""Structured sparsification of BERT-like encoders: rank, mask and remove attention heads and
feed-forward neurons.

The prunable units of layer ``l`` are its attention heads (the ``d`` rows of the query, key and
value projections that belong to the head, their biases, and the ``d`` input columns of the
attention output projection) and its feed-forward neurons (one row and bias of the intermediate
projection, one input column of the output projection). Embeddings, layer norms, the pooler
and the classifier are never pruned. *Sparsity* is the share of prunable parameters removed.

- :func:`taylor_importance`: first-order Taylor importance of every unit, ``sum |w * dL/dw|``
  over the unit's parameters, accumulated over a few batches (Molchanov et al. 2019,
  "Importance Estimation for Neural Network Pruning"; applied to heads as in Michel et al. 2019,
  "Are Sixteen Heads Really Better than One?").
- :func:`masks_for_sparsity`: keep/remove masks that remove the least important units (by
  importance per parameter, so heads and neurons compare on one scale) up to a sparsity.
- :class:`Masker`: apply masks to a model without changing its weights (used to train one
  "sandwich" model at many sparsities at once, as MiniDisc does).
- :func:`densify`: really remove the masked units (a smaller, faster model with the same
  outputs); :func:`save_dense` / :func:`load_dense` store and reload such a model.

Pure torch + transformers; no Ray.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STRUCTURE_FILE = "raykd_structure.json"


class MaskError(ValueError):
    """Masks that do not fit the model they are applied to."""


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-like model (``<base>.encoder.layer``).

    Raises:
        ValueError: the model has no BERT-style encoder (attention ``self.query`` /
            ``output.dense`` and ``intermediate.dense`` / ``output.dense`` per layer).
    """
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    ok = isinstance(layers, nn.ModuleList) and all(
        hasattr(lyr, "attention") and hasattr(lyr, "intermediate") and hasattr(lyr, "output") for lyr in layers
    )
    if not ok:
        raise ValueError(
            f"{type(model).__name__} is not a BERT-like encoder (no encoder.layer[i].attention/intermediate/output); "
            "structured sparsification supports BERT, MiniLM and similar models"
        )
    return layers


def head_size(model: nn.Module) -> int:
    """Per-head width ``d`` (hidden size / configured heads; unchanged by pruning)."""
    return model.config.hidden_size // model.config.num_attention_heads


def _head_count(layer: nn.Module, d: int) -> int:
    return layer.attention.output.dense.in_features // d


def structure(model: nn.Module) -> dict[str, list[int]]:
    """Heads and feed-forward neurons currently present per layer: ``{"heads": [...], "neurons": [...]}``."""
    d = head_size(model)
    layers = encoder_layers(model)
    return {
        "heads": [_head_count(lyr, d) for lyr in layers],
        "neurons": [lyr.intermediate.dense.out_features for lyr in layers],
    }


def unit_params(model: nn.Module) -> tuple[int, int]:
    """Parameters of one head and of one feed-forward neuron: ``(4 H d + 3 d, 2 H + 1)``."""
    h, d = model.config.hidden_size, head_size(model)
    return 4 * h * d + 3 * d, 2 * h + 1


def prunable_params(model: nn.Module) -> int:
    """Parameters in all heads and feed-forward neurons now present (what sparsity is a share of)."""
    per_head, per_neuron = unit_params(model)
    s = structure(model)
    return per_head * sum(s["heads"]) + per_neuron * sum(s["neurons"])


@dataclass
class Masks:
    """Keep masks of the prunable units (True = keep).

    Attributes:
        heads: one bool tensor ``[heads of layer l]`` per layer.
        neurons: one bool tensor ``[neurons of layer l]`` per layer.
    """

    heads: list[Tensor]
    neurons: list[Tensor]

    @classmethod
    def full(cls, model: nn.Module) -> Masks:
        """Masks that keep everything the model has."""
        s = structure(model)
        return cls([torch.ones(n, dtype=torch.bool) for n in s["heads"]], [torch.ones(n, dtype=torch.bool) for n in s["neurons"]])

    def removed_params(self, per_head: int, per_neuron: int) -> int:
        """Parameters the masks remove, given the size of one head and one neuron."""
        return sum(int((~m).sum()) * per_head for m in self.heads) + sum(int((~m).sum()) * per_neuron for m in self.neurons)


def check_masks(model: nn.Module, masks: Masks) -> None:
    """Raise :class:`MaskError` unless ``masks`` has one mask per layer of the model's current sizes."""
    s = structure(model)
    got = {"heads": [int(m.numel()) for m in masks.heads], "neurons": [int(m.numel()) for m in masks.neurons]}
    if got != s:
        raise MaskError(
            f"masks do not match the model: model has heads {s['heads']} and neurons {s['neurons']} per layer, "
            f"masks have heads {got['heads']} and neurons {got['neurons']}; derive the masks from this model"
        )


def _unit_scores(layer: nn.Module, d: int) -> tuple[Tensor, Tensor]:
    """``|w * grad|`` summed per head ``[nH]`` and per neuron ``[I]`` of one layer (grads must be set)."""

    def wg(p: Tensor) -> Tensor:
        return (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)

    att, n_heads = layer.attention, _head_count(layer, d)
    heads = torch.zeros(n_heads, device=att.output.dense.weight.device)
    if n_heads:
        for lin in (att.self.query, att.self.key, att.self.value):
            heads += wg(lin.weight).sum(1).view(n_heads, d).sum(1) + wg(lin.bias).view(n_heads, d).sum(1)
        heads += wg(att.output.dense.weight).sum(0).view(n_heads, d).sum(1)
    inter, out = layer.intermediate.dense, layer.output.dense
    neurons = wg(inter.weight).sum(1) + wg(inter.bias) + wg(out.weight).sum(0)
    return heads, neurons


def taylor_importance(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> Masks:
    """First-order Taylor importance of every head and neuron (Molchanov et al. 2019).

    For each batch, ``loss_fn(model, batch)`` is back-propagated and ``|w * dL/dw|`` is summed
    over each unit's parameters; the per-batch sums are added over batches. The model's weights
    are not changed and its gradients are cleared afterwards.

    Args:
        model: a BERT-like model (any current head/neuron counts).
        batches: a few batches (e.g. 4-8 dev batches).
        loss_fn: scalar loss of the model on a batch (e.g. KD loss against the teacher).

    Returns:
        A :class:`Masks`-shaped object whose tensors hold float scores instead of booleans.

    Raises:
        ValueError: no batch was given, or the model is not BERT-like.
    """
    layers, d = encoder_layers(model), head_size(model)
    return summed_unit_scores(model, layers, structure(model), batches, loss_fn, lambda layer: _unit_scores(layer, d))


def summed_unit_scores(model: nn.Module, layers: Sequence[nn.Module], units: dict[str, list[int]], batches: Iterable[Any],
                       loss_fn: Callable[[nn.Module, Any], Tensor],
                       layer_scores: Callable[[nn.Module], tuple[Tensor, Tensor]]) -> Masks:
    """The Taylor scores of every layer's units, summed over ``batches``: the loop that the BERT
    (:func:`taylor_importance`) and GQA (``gqa_sparsify.taylor_importance``) scorers share.

    Per batch the gradients are cleared, ``loss_fn(model, batch)`` is back-propagated and
    ``layer_scores(layer)`` (``(heads, neurons)`` scores of one layer) is added for each layer;
    ``units`` holds the unit counts per layer (the model family's ``structure(model)``).
    The model runs in eval mode (no dropout: the score measures the deterministic network); its
    training mode is restored and its gradients cleared afterwards.

    Raises:
        ValueError: no batch was given.
    """
    scores = Masks([torch.zeros(n) for n in units["heads"]], [torch.zeros(n) for n in units["neurons"]])
    was_training, seen = model.training, 0
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for i, layer in enumerate(layers):
            h, n = layer_scores(layer)
            scores.heads[i] += h.cpu()
            scores.neurons[i] += n.cpu()
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if not seen:
        raise ValueError("taylor_importance needs at least one batch")
    return scores


def masks_for_sparsity(importance: Masks, sparsity: float, per_head: int, per_neuron: int,
                       removable: set[str] | frozenset[str] = frozenset({"heads", "neurons"})) -> Masks:
    """Masks that remove a ``sparsity`` share of the prunable parameters, least important first.

    Units are ranked by importance per parameter (``score / unit size``) so heads and neurons
    compare on one scale. Walking that ranking from the least important unit, a unit is removed
    when it still fits in the budget ``round(sparsity * prunable)``; a head that would overshoot
    is skipped and smaller neurons fill the rest. The removed count therefore never exceeds the
    budget and falls short by less than one neuron (when enough neurons remain).

    Args:
        importance: scores from :func:`taylor_importance` (current sizes of the model).
        sparsity: share of prunable parameters to remove, in [0, 1].
        per_head: parameters of one head; per_neuron: of one neuron (see :func:`unit_params`).
        removable: the unit kinds that may be removed (``heads``, ``neurons``); the others count
            in the total the sparsity is a share of, but are kept.

    Returns:
        Bool keep masks of the same shapes as ``importance``.

    Raises:
        ValueError: ``sparsity`` outside [0, 1].
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    units: list[tuple[float, int, str, int, int]] = []  # (score per param, size, kind, layer, index)
    for kind, per, groups in (("heads", per_head, importance.heads), ("neurons", per_neuron, importance.neurons)):
        for layer, scores in enumerate(groups):
            units += [(float(s) / per, per, kind, layer, j) for j, s in enumerate(scores.tolist())]
    total = sum(u[1] for u in units)
    budget = round(sparsity * total)
    keep = Masks([torch.ones_like(m, dtype=torch.bool) for m in importance.heads], [torch.ones_like(m, dtype=torch.bool) for m in importance.neurons])
    removed = 0
    for _, size, kind, layer, j in sorted(units, key=lambda u: (u[0], u[2], u[3], u[4])):
        if kind in removable and removed + size <= budget:
            getattr(keep, kind)[layer][j] = False
            removed += size
    return keep


class Masker:
    """Apply :class:`Masks` to a model through forward pre-hooks, leaving its weights as they are.

    The input of each attention output projection ``[B, T, nH * d]`` is multiplied by the head
    mask (each head's ``d`` columns) and the input of each feed-forward output projection
    ``[B, T, I]`` by the neuron mask: a removed unit then adds nothing to the residual stream and
    gets no gradient, exactly as if it were cut out (:func:`densify`).

    Args:
        model: a BERT-like model.

    Use ``with masker.use(masks): model(...)``; outside ``use`` the model is unmasked.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.masks: Masks | None = None
        d = head_size(model)
        self._handles = []
        for i, layer in enumerate(encoder_layers(model)):
            self._handles.append(layer.attention.output.dense.register_forward_pre_hook(self._hook("heads", i, d)))
            self._handles.append(layer.output.dense.register_forward_pre_hook(self._hook("neurons", i, 1)))

    def _check(self, masks: Masks) -> None:
        """Raise :class:`MaskError` when ``masks`` do not fit the model."""
        check_masks(self.model, masks)

    def _hook(self, kind: str, layer: int, width: int):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]):
            if self.masks is None:
                return None
            m = getattr(self.masks, kind)[layer].to(device=args[0].device, dtype=args[0].dtype)
            return (args[0] * m.repeat_interleave(width),)

        return hook

    @contextlib.contextmanager
    def use(self, masks: Masks | None) -> Iterator[nn.Module]:
        """Run the model under ``masks`` inside the block.

        Raises:
            MaskError: the masks do not fit the model.
        """
        if masks is not None:
            self._check(masks)
        previous, self.masks = self.masks, masks
        try:
            yield self.model
        finally:
            self.masks = previous

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _NoHeads(nn.Module):
    """Stands in for a self-attention whose every head was removed: a ``[B, T, 0]`` output."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _keep_linear(layer: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A copy of ``layer`` that keeps ``index`` along ``dim`` (0: outputs, 1: inputs); may be empty."""
    index = index.to(layer.weight.device)
    weight = layer.weight.detach().index_select(dim, index).clone()
    bias = layer.bias.detach().clone() if dim == 1 else layer.bias.detach()[index].clone()
    with warnings.catch_warnings():  # an empty layer's init is a no-op, and says so
        warnings.simplefilter("ignore", UserWarning)
        new = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    return new


def densify(model: nn.Module, masks: Masks, *, inplace: bool = False) -> nn.Module:
    """Remove the masked heads and neurons for real (a smaller model with the masked model's outputs).

    A layer that loses every head keeps only the attention output bias; one that loses every
    neuron keeps only the feed-forward output bias.

    Args:
        model: a BERT-like model.
        masks: keep masks of the model's current sizes.
        inplace: change ``model`` itself instead of a copy.

    Returns:
        The densified model (``model`` itself when ``inplace``).

    Raises:
        MaskError: the masks do not fit the model.
    """
    check_masks(model, masks)
    if not inplace:
        model = copy.deepcopy(model)
    d = head_size(model)
    for layer, hm, nm in zip(encoder_layers(model), masks.heads, masks.neurons):
        att = layer.attention
        kept = hm.nonzero().flatten()
        cols = (kept[:, None] * d + torch.arange(d)).flatten()
        if len(kept) == 0:
            att.self = _NoHeads()
        elif not isinstance(att.self, _NoHeads):
            for name in ("query", "key", "value"):
                setattr(att.self, name, _keep_linear(getattr(att.self, name), cols, 0))
            att.self.num_attention_heads = len(kept)
            att.self.all_head_size = len(kept) * d
        att.output.dense = _keep_linear(att.output.dense, cols, 1)
        keep_n = nm.nonzero().flatten()
        layer.intermediate.dense = _keep_linear(layer.intermediate.dense, keep_n, 0)
        layer.output.dense = _keep_linear(layer.output.dense, keep_n, 1)
    return model


def _prefix_masks(counts: dict[str, list[int]], model: nn.Module) -> Masks:
    """Masks of the model's full sizes that keep the first ``counts`` heads / neurons per layer."""
    full = Masks.full(model)
    for kind in ("heads", "neurons"):
        for m, n in zip(getattr(full, kind), counts[kind]):
            m[n:] = False
    return full


def save_dense(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save a densified (or layer-dropped) model: weights, config and its per-layer structure.

    Returns:
        ``folder``; reload it with :func:`load_dense`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / STRUCTURE_FILE).write_text(json.dumps(structure(model)))
    return folder


def load_dense(folder: str | Path) -> nn.Module:
    """Load a sequence-classification model saved by :func:`save_dense` (or a plain one).

    Raises:
        FileNotFoundError: ``folder`` has no ``config.json``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model folder")
    if not (folder / STRUCTURE_FILE).is_file():
        return AutoModelForSequenceClassification.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(folder)))
    counts = json.loads((folder / STRUCTURE_FILE).read_text())
    densify(model, _prefix_masks(counts, model), inplace=True)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit the saved structure (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.config.tie_word_embeddings and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
