"""Layer-wise transfer losses of MobileBERT's progressive knowledge transfer (Sun et al. 2020,
"MobileBERT: a Compact Task-Agnostic BERT for Resource-Limited Devices", ACL): feature-map
transfer (MSE of block outputs) and attention transfer (KL of attention distributions), at every
pair of the layer map.

Registered with ``kind="features"``, signature as in :mod:`raykd.losses.features`. The schedule
that trains one student block per stage builds objectives of these terms on a one-pair layer map
(:class:`raykd.train.progressive.ProgressiveTransfer`).
"""

from __future__ import annotations

from torch import Tensor, nn

from raykd.losses.features import Features, LayerMap
from raykd.losses.hidden import EMBEDDINGS, attention_kl_pair, state_mse
from raykd.losses.registry import define_loss


@define_loss("hidden_mse", kind="features", transfer=True, projections=("embeddings", "hidden"), params={"embeddings": EMBEDDINGS},
               description="MSE of mapped block outputs (MobileBERT's feature-map transfer, Sun et al. 2020)")
def hidden_mse(student: Features, teacher: Features, *, layer_map: LayerMap, projections: dict[str, nn.Module],
               embeddings: bool = False) -> Tensor:
    """Feature-map transfer; Sun et al. 2020 (MobileBERT), eq. 1: per token, the sum over the
    layer map's pairs ``(i, j)`` of ``MSE(W h_s^i, h_t^j)`` (mean over the width ``H``), plus
    ``MSE(W_e E_s, E_t)`` of the embeddings (the input of block 0) when ``embeddings``.

    MobileBERT's inter-block width equals its teacher's, so ``W`` is absent there (a projection is
    created only when the widths differ).

    Returns:
        ``[B, T]``, non-negative; 0 where the student's mapped states equal the teacher's.
    """
    return state_mse(student, teacher, layer_map, projections, embeddings)


@define_loss("attention_kl", kind="features", transfer=True, attention=True,
               description="KL of mapped attention distributions (MobileBERT's attention transfer, Sun et al. 2020)")
def attention_kl(student: Features, teacher: Features, *, layer_map: LayerMap,
                 projections: dict[str, nn.Module]) -> Tensor:
    """Attention transfer; Sun et al. 2020 (MobileBERT), eq. 2: per query token, the sum over the
    layer map's pairs ``(i, j)`` of the mean over heads of ``KL(A_t^j || A_s^i)``,
    ``A = softmax(Q K^T / sqrt(d))`` over the keys a query may see (padding keys left out).

    Needs as many student heads as teacher heads (the head width may differ, as in MobileBERT's
    bottleneck attention). MiniLM's ``minilm`` is the same KL on the last pair only, plus value
    relations.

    Returns:
        ``[B, T]``, non-negative.

    Raises:
        ValueError: the head counts differ.
    """
    out = 0.0
    for i, j in layer_map.pairs:
        out = out + attention_kl_pair("attention_kl", student, teacher, i, j)
    return out
