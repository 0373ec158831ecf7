"""Student architectures of the GKD family, built from a BERT-style teacher with transformers'
own model classes (classification, i.e. encoder, students):

- :func:`albert_student`: ALBERT-style (Lan et al. 2020, "ALBERT: A Lite BERT for
  Self-supervised Learning of Language Representations", ICLR): a factorised embedding
  (vocabulary x ``E``, then ``E -> H``) and one block shared by every layer, initialised from the
  teacher (the factorised embedding from a truncated SVD of its word embeddings, the shared
  block from one of its layers, its pooler and classifier).
- :func:`mobilebert_student`: MobileBERT-style (Sun et al. 2020, "MobileBERT: a Compact
  Task-Agnostic BERT for Resource-Limited Devices", ACL): bottleneck blocks whose inter-block
  width is the teacher's (feature maps need no projection), a narrow intra-block width and
  stacked feed-forward networks; trained by progressive layer-wise knowledge transfer
  (:class:`raykd.train.progressive.ProgressiveTransfer`).

:func:`truncated_svd_embedding` is the rank-``E`` factorisation both use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class EmbeddingFactors:
    """A rank-``r`` factorisation ``W ~ coords @ basis.T`` of an embedding matrix.

    Attributes:
        coords: ``[V, r]`` (``U_r S_r``), the small per-token embeddings.
        basis: ``[H, r]`` orthonormal columns (``V_r``), the map back to the width ``H``.
        relative_error: ``||W - coords basis^T||_F / ||W||_F`` (0 at full rank).
    """

    coords: Tensor
    basis: Tensor
    relative_error: float


def truncated_svd_embedding(weight: Tensor, rank: int, *, centre: bool = False) -> EmbeddingFactors:
    """The best rank-``rank`` factorisation (Eckart-Young) of an embedding matrix ``[V, H]``.

    Args:
        weight: ``[V, H]`` word embeddings.
        rank: ``r``, ``1 <= r <= H``.
        centre: factorise ``W C`` instead, each row minus its mean over the width (what a
            LayerNorm after the embedding sees); the basis is then orthogonal to the all-ones vector.

    Raises:
        ValueError: ``rank`` outside ``1..H``.
    """
    h = weight.shape[1]
    if not 1 <= rank <= h:
        raise ValueError(f"rank {rank} must be in 1..{h} (the embedding width)")
    w = weight.detach().double()
    if centre:
        w = w - w.mean(1, keepdim=True)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    coords, basis = u[:, :rank] * s[:rank], vh[:rank].T
    err = torch.linalg.norm(w - coords @ basis.T) / torch.linalg.norm(w).clamp(min=1e-30)
    return EmbeddingFactors(coords.float(), basis.float(), float(err))


def _bert_parts(teacher: nn.Module):
    """``(base model, embeddings, blocks)`` of a BERT-style classifier; ValueError otherwise."""
    base = getattr(teacher, "base_model", None)
    emb, enc = getattr(base, "embeddings", None), getattr(base, "encoder", None)
    if emb is None or not hasattr(emb, "word_embeddings") or not hasattr(getattr(enc, "layer", None), "__len__") \
            or not hasattr(teacher, "classifier"):
        raise ValueError(f"family students are built from a BERT-style sequence classifier (embeddings, encoder.layer, "
                         f"classifier); got {type(teacher).__name__}")
    return base, emb, enc.layer


def _copy(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for name, p in src.named_parameters():
            dst.get_parameter(name).copy_(p)


def albert_student(teacher: nn.Module, *, embedding_size: int = 128, num_layers: int = 3,
                   share_from: int | None = None) -> nn.Module:
    """An ALBERT-style student (Lan et al. 2020) of a BERT-style classifier, initialised from it.

    transformers' ``AlbertForSequenceClassification`` with the teacher's vocabulary, width ``H``,
    heads, feed-forward width ``I``, activation and classes, ``embedding_size=E``,
    ``num_hidden_groups=1`` (one block shared by all ``num_layers`` layers). Initialisation:

    - **factorised embedding** of rank ``E - 1`` from the teacher's (:func:`_albert_embeddings_from`:
      exact when the teacher's centred embedding sums lie in the span of the top ``E - 1``
      singular vectors, always at ``E = H``);
    - **shared block** from teacher layer ``share_from`` (query/key/value, attention output and
      its norm, feed-forward and its norm);
    - pooler and classifier copied.

    Parameters (``V`` vocabulary, ``P`` positions, ``Y`` token types, ``C`` classes):
    ``(V + P + Y) E + 2E`` (embeddings) ``+ E H + H`` (the ``E -> H`` map) ``+ 4 (H^2 + H) + 2 I H
    + I + 5 H`` (the one block) ``+ H^2 + H`` (pooler) ``+ C H + C``, whatever ``num_layers``.

    Args:
        teacher: a BERT-style ``...ForSequenceClassification`` (left unchanged).
        embedding_size: ``E``, ``2 <= E <= H``.
        num_layers: blocks of the student (all the same shared block).
        share_from: the teacher layer the shared block is copied from; default the middle one
            (``L_t // 2``): the block then runs on inputs from below and above its depth, and a
            middle layer is the compromise; ``benchmarks/bench_family_students.py --share-from
            auto`` picks by the step-0 training accuracy instead.

    Returns:
        The student (eval mode), its attention implementation the teacher's.

    Raises:
        ValueError: a teacher that is not BERT-style, ``E`` outside ``2..H``, ``num_layers < 1``,
            or ``share_from`` out of range.
    """
    from transformers import AlbertForSequenceClassification

    base, emb, blocks = _bert_parts(teacher)
    j = _albert_share_from(teacher.config, len(blocks), embedding_size, num_layers, share_from)
    student = AlbertForSequenceClassification(_albert_config(teacher.config, embedding_size, num_layers))
    student.set_attn_implementation(teacher.config._attn_implementation)
    _albert_embeddings_from(student.albert, emb, embedding_size)
    _albert_block_from(student.albert.encoder.albert_layer_groups[0].albert_layers[0], blocks[j])
    _copy(student.albert.pooler, base.pooler.dense)
    _copy(student.classifier, teacher.classifier)
    student.config.raykd_init = {"family": "albert", "share_from": j, "embedding_size": embedding_size}
    return student.eval()


def _albert_share_from(cfg, n_layers: int, embedding_size: int, num_layers: int, share_from: int | None) -> int:
    """The teacher layer :func:`albert_student` shares (``share_from``, default ``n_layers // 2``),
    after its sizes are checked against the teacher's config ``cfg`` (``n_layers`` blocks).

    Raises:
        ValueError: ``E`` outside ``2..H``, ``num_layers < 1``, or ``share_from`` outside ``0..n_layers - 1``.
    """
    h = cfg.hidden_size
    if not 2 <= embedding_size <= h:
        raise ValueError(f"embedding_size={embedding_size} must be in 2..{h} (the teacher's width)")
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    j = n_layers // 2 if share_from is None else share_from
    if not 0 <= j < n_layers:
        raise ValueError(f"share_from={share_from} is out of range for a teacher of {n_layers} layers (0..{n_layers - 1})")
    return j


def _albert_config(cfg, embedding_size: int, num_layers: int):
    """The ``AlbertConfig`` of :func:`albert_student`: the teacher config ``cfg``'s vocabulary,
    width, heads, feed-forward, activation, dropout, positions, norm and classes, embedding width
    ``E = embedding_size`` and one block group shared by ``num_layers`` layers."""
    from transformers import AlbertConfig

    return AlbertConfig(
        vocab_size=cfg.vocab_size, embedding_size=embedding_size, hidden_size=cfg.hidden_size, num_hidden_layers=num_layers,
        num_hidden_groups=1, inner_group_num=1, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, num_labels=cfg.num_labels, id2label=cfg.id2label, label2id=cfg.label2id,
        classifier_dropout_prob=getattr(cfg, "classifier_dropout", None) or cfg.hidden_dropout_prob,
        pad_token_id=cfg.pad_token_id)


def _albert_embeddings_from(albert: nn.Module, emb: nn.Module, embedding_size: int) -> None:
    """Set ALBERT's factorised embedding (``albert``: the student's ``AlbertModel``) from the
    teacher's embeddings ``emb`` (in place).

    The teacher computes ``LN_H(w + p + t)``; ALBERT computes ``A LN_E(w' + p' + t') + a`` with
    ``w', p', t'`` of width ``E``. With ``V_r`` the top ``r = E - 1`` right singular vectors of the
    row-centred word embeddings (:func:`truncated_svd_embedding` with ``centre=True``) and ``Q`` an
    orthonormal ``[E, E-1]`` basis of the mean-free vectors of ``R^E``, ``B = V_r Q^T``
    (:func:`_factorised_basis`): ``w' = B^T w`` (and the same for the position and type
    embeddings), ``LN_E`` with gain 1 and bias 0, ``A = sqrt(H/E) diag(g) B`` and ``a = beta``
    (``g``, ``beta`` the teacher's norm). This reproduces the teacher's embeddings exactly when
    the centred sum lies in the span of ``V_r`` (always at ``E = H``), and otherwise as well as
    rank ``E - 1`` allows (one dimension goes to the mean that ``LN_E`` removes).
    """
    h = emb.word_embeddings.weight.shape[1]
    b = _factorised_basis(emb.word_embeddings.weight, embedding_size)
    with torch.no_grad():
        for dst, src in ((albert.embeddings.word_embeddings, emb.word_embeddings),
                         (albert.embeddings.position_embeddings, emb.position_embeddings),
                         (albert.embeddings.token_type_embeddings, emb.token_type_embeddings)):
            dst.weight.copy_(src.weight @ b)
        albert.embeddings.LayerNorm.weight.fill_(1.0)
        albert.embeddings.LayerNorm.bias.zero_()
        albert.encoder.embedding_hidden_mapping_in.weight.copy_(math.sqrt(h / embedding_size) * emb.LayerNorm.weight[:, None] * b)
        albert.encoder.embedding_hidden_mapping_in.bias.copy_(emb.LayerNorm.bias)


def _albert_block_from(shared: nn.Module, src: nn.Module) -> None:
    """Copy a teacher ``BertLayer`` ``src`` into ALBERT's shared block ``shared`` (an ``AlbertLayer``):
    query/key/value, attention output and its norm, feed-forward and its norm."""
    for dst_mod, src_mod in ((shared.attention.query, src.attention.self.query),
                             (shared.attention.key, src.attention.self.key),
                             (shared.attention.value, src.attention.self.value),
                             (shared.attention.dense, src.attention.output.dense),
                             (shared.attention.LayerNorm, src.attention.output.LayerNorm),
                             (shared.ffn, src.intermediate.dense), (shared.ffn_output, src.output.dense),
                             (shared.full_layer_layer_norm, src.output.LayerNorm)):
        _copy(dst_mod, src_mod)


def _factorised_basis(word: Tensor, e: int) -> Tensor:
    """``B = V_r Q^T`` ``[H, E]`` of :func:`albert_student` (``r = E - 1``)."""
    v = truncated_svd_embedding(word, e - 1, centre=True).basis.double()  # [H, E-1], orthogonal to ones
    centred = torch.eye(e, dtype=torch.float64) - 1.0 / e
    q, _ = torch.linalg.qr(centred[:, : e - 1])  # [E, E-1]: orthonormal, mean-free columns
    return (v @ q.T).to(word.dtype)


def mobilebert_student(teacher: nn.Module, *, num_layers: int | None = None, intra_size: int | None = None,
                       embedding_size: int = 128, num_ffn: int = 4, init: str = "teacher") -> nn.Module:
    """A MobileBERT-style student (Sun et al. 2020) of a BERT-style classifier.

    transformers' ``MobileBertForSequenceClassification``: inter-block width ``H`` = the
    teacher's (every block's output and the embeddings match the teacher's feature maps without a
    projection), intra-block bottleneck ``b = intra_size`` (default ``H / 4``, the paper's 128 of
    512), the teacher's head count (attention transfer compares heads one to one; ``b`` must be
    divisible by it), ``num_ffn`` stacked feed-forward networks of width ``4 b``, the paper's
    key-query shared bottleneck, NoNorm, ReLU, and a trigram input embedding of width ``E``
    (a kernel-3 convolution over ``E``-wide token embeddings, mapped to ``H``).

    ``init="teacher"``: the word embeddings are the teacher's at rank ``E``
    (:func:`truncated_svd_embedding`: ``U_E S_E`` in the centre tap of the trigram map, whose
    weight there is ``V_E``; the side taps start at 0), the position and type embeddings, the
    pooler and the classifier are copied (all have the teacher's width); the blocks start random.
    ``init="random"``: all random, as the paper, which pre-trains on a large corpus (on a few
    hundred articles the word embeddings of unseen tokens then stay random).

    Parameters: ``V E + 3 E H + H + (P + Y) H + 2 H`` (embeddings) ``+ L [2 (H b + 3 b) + 2 (b^2 + b)
    + (H b + b) + (b^2 + 3 b) + num_ffn (8 b^2 + 7 b) + (b H + 3 H)]`` (blocks; NoNorm has a gain and
    a bias) ``+ H^2 + H + C H + C``; ``transformers``' count of the built model is the reference.

    Args:
        teacher: a BERT-style ``...ForSequenceClassification`` (left unchanged).
        num_layers: blocks (default the teacher's: the paper's student is as deep as its teacher).
        intra_size: ``b``; embedding_size: ``E``; num_ffn: stacked FFNs per block (paper: 4).
        init: ``"teacher"`` or ``"random"``.

    Returns:
        The student (eval mode).

    Raises:
        ValueError: a teacher that is not BERT-style, ``b`` not divisible by the head count,
            ``E > H``, or an unknown ``init``.
    """
    from transformers import MobileBertForSequenceClassification

    base, emb, blocks = _bert_parts(teacher)
    b = _check_mobilebert_sizes(teacher.config, intra_size, embedding_size, init)
    student = MobileBertForSequenceClassification(_mobilebert_config(teacher.config, num_layers or len(blocks), b,
                                                                     embedding_size, num_ffn))
    student.set_attn_implementation(teacher.config._attn_implementation)
    if init == "teacher":
        _mobilebert_embeddings_from(student.mobilebert.embeddings, emb, embedding_size)
        _copy(student.mobilebert.pooler.dense, base.pooler.dense)
        _copy(student.classifier, teacher.classifier)
    student.config.raykd_init = {"family": "mobilebert", "init": init, "intra_size": b}
    return student.eval()


def _check_mobilebert_sizes(cfg, intra_size: int | None, embedding_size: int, init: str) -> int:
    """The intra-block width ``b`` of :func:`mobilebert_student` (``intra_size``, default ``H / 4``),
    after its arguments are checked against the teacher's config ``cfg``.

    Raises:
        ValueError: ``b`` not a positive multiple of the head count, ``E`` outside ``1..H``, or an
            ``init`` other than ``"teacher"`` / ``"random"``.
    """
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    b = intra_size if intra_size is not None else h // 4
    if b < 1 or b % heads:
        raise ValueError(f"intra_size={b} must be a positive multiple of the teacher's {heads} heads "
                         "(attention transfer compares heads one to one)")
    if not 1 <= embedding_size <= h:
        raise ValueError(f"embedding_size={embedding_size} must be in 1..{h} (the teacher's width)")
    if init not in ("teacher", "random"):
        raise ValueError(f"init={init!r}: use 'teacher' or 'random'")
    return b


def _mobilebert_config(cfg, num_layers: int, b: int, embedding_size: int, num_ffn: int):
    """The ``MobileBertConfig`` of :func:`mobilebert_student`: the teacher config ``cfg``'s width
    ``H``, heads, positions and classes; ``num_layers`` blocks of bottleneck ``b`` with ``num_ffn``
    FFNs of width ``4 b``; embedding width ``E = embedding_size``; no hidden dropout."""
    from transformers import MobileBertConfig

    return MobileBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=cfg.num_attention_heads, intra_bottleneck_size=b, intermediate_size=4 * b,
        num_feedforward_networks=num_ffn, embedding_size=embedding_size,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        num_labels=cfg.num_labels, id2label=cfg.id2label, label2id=cfg.label2id, pad_token_id=cfg.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=cfg.attention_probs_dropout_prob)


def _mobilebert_embeddings_from(m: nn.Module, emb: nn.Module, e: int) -> None:
    """Set MobileBERT's embeddings ``m`` from the teacher's ``emb`` (in place): word embeddings
    ``U_E S_E`` ``[V, E]`` (rank ``e``, :func:`truncated_svd_embedding`), ``V_E`` in the centre tap
    of the trigram map ``[H, 3E]`` (side taps and bias 0), position and type embeddings copied."""
    f = truncated_svd_embedding(emb.word_embeddings.weight, e)
    with torch.no_grad():
        m.word_embeddings.weight.copy_(f.coords)
        m.embedding_transformation.weight.zero_()
        m.embedding_transformation.weight[:, e: 2 * e].copy_(f.basis)  # the centre tap: token t itself
        m.embedding_transformation.bias.zero_()
        m.position_embeddings.weight.copy_(emb.position_embeddings.weight)
        m.token_type_embeddings.weight.copy_(emb.token_type_embeddings.weight)
