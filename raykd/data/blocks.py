"""Cut documents into fixed-length token blocks for causal-LM training and teacher scoring.

:func:`tokenize_to_blocks` is a pure batch function (columns in, columns out), so Ray Data can
run it with ``map_batches(tokenize_to_blocks, fn_kwargs=...)`` and a test can call it directly.
Masks follow one convention: ``attention_mask[t] = 1`` for real tokens and ``loss_mask[t] = 1``
iff the next token ``t + 1`` is real, i.e. the logits at ``t`` have a target inside the block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` ignores by default."""


def _empty_blocks(seq_len: int) -> dict[str, np.ndarray]:
    return {
        "doc_id": np.empty(0, dtype=object),
        "block_index": np.empty(0, dtype=np.int32),
        "input_ids": np.empty((0, seq_len), dtype=np.int32),
        "attention_mask": np.empty((0, seq_len), dtype=np.uint8),
        "loss_mask": np.empty((0, seq_len), dtype=np.uint8),
    }


def _special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(BOS id or None, pad id: pad, else EOS, else 0)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return bos, 0 if pad is None else int(pad)


def pad_id(tokenizer: Any) -> int:
    """The id a short block is right-padded with: the tokenizer's pad id, else its EOS id, else 0."""
    return _special_ids(tokenizer)[1]


def tokenize_to_blocks(
    batch: dict[str, np.ndarray],
    tokenizer: Any,
    *,
    seq_len: int,
    max_blocks_per_doc: int,
    min_tokens: int,
    text_column: str = "text",
    id_column: str = "doc_id",
) -> dict[str, np.ndarray]:
    """Tokenise a batch of documents and cut each into consecutive ``seq_len``-token blocks.

    Each text is tokenised without special tokens, then the tokenizer's BOS id (if it has one)
    is prepended. Blocks are consecutive and do not overlap; at most ``max_blocks_per_doc`` are
    taken from the start of each document, a block shorter than ``min_tokens`` is dropped (with
    every block after it), and a short last block is right-padded with the pad id (the
    tokenizer's pad id, else its EOS id, else 0).

    Args:
        batch: columns ``id_column`` and ``text_column``, each a ``[D]`` array of ``str``.
        tokenizer: a Hugging Face tokenizer (called once on the whole batch).
        seq_len: tokens per block ``T``, at least 2.
        max_blocks_per_doc: most blocks per document, at least 1.
        min_tokens: fewest real tokens (BOS included) a block may hold, in ``[1, T]``.
        text_column: name of the text column of ``batch``.
        id_column: name of the document-id column of ``batch``.

    Returns:
        ``N`` blocks (``N = 0`` if no document gives one, with the same dtypes and shapes):
        ``doc_id`` object ``[N]``; ``block_index`` int32 ``[N]`` (0 for a document's first
        block); ``input_ids`` int32 ``[N, T]``; ``attention_mask`` uint8 ``[N, T]`` (1 for real
        tokens); ``loss_mask`` uint8 ``[N, T]`` (1 at ``t`` iff ``t + 1`` is a real token, so
        the last position is always 0).

    Raises:
        ValueError: a column is missing from ``batch`` or a size argument is out of range.
    """
    _check_block_sizes(seq_len, max_blocks_per_doc, min_tokens)
    for column in (id_column, text_column):
        if column not in batch:
            raise ValueError(f"batch has no column {column!r} (columns: {', '.join(map(repr, batch))})")
    doc_ids = list(batch[id_column])
    texts = [str(t) for t in batch[text_column]]
    if not texts:
        return _empty_blocks(seq_len)
    bos, pad = _special_ids(tokenizer)
    prefix = [] if bos is None else [int(bos)]
    token_lists = [prefix + list(tokens) for tokens in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    chunks, owners = _cut_blocks(doc_ids, token_lists, seq_len, max_blocks_per_doc, min_tokens)
    return _pack_blocks(chunks, owners, seq_len, pad) if chunks else _empty_blocks(seq_len)


def _check_block_sizes(seq_len: int, max_blocks_per_doc: int, min_tokens: int) -> None:
    """The size arguments of :func:`tokenize_to_blocks`, checked before any tokenising.

    Raises:
        ValueError: ``seq_len < 2``, ``max_blocks_per_doc < 1`` or ``min_tokens`` outside ``[1, seq_len]``.
    """
    if seq_len < 2 or max_blocks_per_doc < 1 or not 1 <= min_tokens <= seq_len:
        raise ValueError(
            f"need seq_len >= 2, max_blocks_per_doc >= 1 and 1 <= min_tokens <= seq_len; got "
            f"seq_len={seq_len}, max_blocks_per_doc={max_blocks_per_doc}, min_tokens={min_tokens}"
        )


def _cut_blocks(doc_ids: list[Any], token_lists: list[list[int]], seq_len: int, max_blocks_per_doc: int,
                min_tokens: int) -> tuple[list[list[int]], list[tuple[Any, int]]]:
    """Consecutive, non-overlapping ``seq_len``-token pieces of each document, from its start.

    Args:
        doc_ids: ``[D]`` document ids; token_lists: ``[D]`` token ids per document (BOS included).
        seq_len, max_blocks_per_doc, min_tokens: as :func:`tokenize_to_blocks`; a piece shorter
            than ``min_tokens`` ends its document (it and every later piece are dropped).

    Returns:
        ``(chunks, owners)``: ``N`` token lists of 1 to ``seq_len`` ids, and each one's
        ``(doc_id, block index)``.
    """
    chunks: list[list[int]] = []
    owners: list[tuple[Any, int]] = []
    for doc_id, tokens in zip(doc_ids, token_lists):
        for b in range(max_blocks_per_doc):
            chunk = tokens[b * seq_len : (b + 1) * seq_len]
            if len(chunk) < min_tokens:
                break
            chunks.append(chunk)
            owners.append((doc_id, b))
    return chunks, owners


def _pack_blocks(chunks: list[list[int]], owners: list[tuple[Any, int]], seq_len: int, pad: int) -> dict[str, np.ndarray]:
    """The block columns of :func:`tokenize_to_blocks` from ``N >= 1`` pieces: each right-padded
    with ``pad`` to ``T = seq_len``, its masks set by the module's convention."""
    n = len(chunks)
    input_ids = np.full((n, seq_len), pad, dtype=np.int32)
    attention_mask = np.zeros((n, seq_len), dtype=np.uint8)
    for i, chunk in enumerate(chunks):
        input_ids[i, : len(chunk)] = chunk
        attention_mask[i, : len(chunk)] = 1
    loss_mask = np.zeros_like(attention_mask)
    loss_mask[:, :-1] = attention_mask[:, 1:]
    return {
        "doc_id": np.array([str(d) for d, _ in owners], dtype=object),
        "block_index": np.array([b for _, b in owners], dtype=np.int32),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
    }


def shift_labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Next-token labels for a causal LM, ``IGNORE_INDEX`` (-100) where there is no target.

    Args:
        input_ids: ``[N, T]`` token ids.
        loss_mask: ``[N, T]``, 1 where position ``t`` has a target ``input_ids[:, t + 1]``.

    Returns:
        int64 ``[N, T]`` with ``labels[:, t] = input_ids[:, t + 1]`` where ``loss_mask[:, t]``
        is 1, else -100; the last column is always -100.

    Raises:
        ValueError: the arrays are not 2-D or their shapes differ.
    """
    input_ids = np.asarray(input_ids)
    loss_mask = np.asarray(loss_mask)
    if input_ids.ndim != 2 or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"input_ids and loss_mask must both be [N, T]; got {input_ids.shape} and {loss_mask.shape}"
        )
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1] = np.where(loss_mask[:, :-1] != 0, input_ids[:, 1:], IGNORE_INDEX)
    return labels
