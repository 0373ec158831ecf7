"""The transformers teacher engine (any ``AutoModelForCausalLM``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from raykd.models import load_causal_lm, load_tokenizer, pick_device
from raykd.teacher.engines.base import (
    EngineInfo,
    ScoreResult,
    describe,
    encode_prompts,
    ids_dtype,
    validate_score_request,
)
from raykd.teacher.engines.continuations import continuation_logprobs, greedy_after_prefix

SAFE_MEMORY_FRACTION = 0.5
"""Share of the free device memory a ``score`` chunk may plan to use (the rest covers what the
estimate of :func:`score_bytes_per_token` leaves out: allocator rounding, kernels' workspaces)."""

CPU_TOKENS_PER_FORWARD = 4096
"""Tokens per forward on CPU when ``max_tokens_per_forward`` is not given."""


def score_bytes_per_token(
    vocab_size: int,
    k: int,
    *,
    logit_bytes: int,
    hidden_size: int,
    intermediate_size: int,
    temperature: float = 1.0,
    fused: bool = True,
    group_size: int | None = None,
) -> int:
    """Device bytes one scored token holds at the peak of a ``score`` chunk (an estimate).

    Counts the ``[rows, T, V]`` logits, the fp32 temporaries of
    :func:`raykd.teacher.engines.topk.topk_and_tail` (none of size ``V`` with the fused kernel
    and the grouped top-k; one ``[.., V]`` fp32 buffer without the kernel or for a small
    vocabulary; one more for a temperature other than 1), the top-k candidates, the outputs, and
    the forward's transient activations (twice ``4 * hidden + 3 * intermediate`` values).

    Args:
        vocab_size: ``V``.
        k: ``K``.
        logit_bytes: bytes per logit (2 for bf16/fp16 models, 4 for fp32).
        hidden_size, intermediate_size: the model's widths (activations).
        temperature: a value other than 1 adds the fp32 ``logits / temperature``.
        fused: whether the Triton pass runs (:func:`raykd.teacher.engines.topk.triton_available`).
        group_size: tokens per group of the grouped top-k (default: the module's).

    Returns:
        Bytes per token (> 0).
    """
    # lazy: keeps torch out of import time
    from raykd.teacher.engines import topk

    group_size = topk.DEFAULT_GROUP_SIZE if group_size is None else group_size
    groups = topk.num_groups(vocab_size, k, group_size)
    per_logit = logit_bytes + (4 if temperature != 1.0 else 0)
    if groups:
        stats = 8 * groups if fused else 4 * vocab_size
        candidates = (k * group_size + vocab_size % group_size) * (per_logit + 8)
    else:
        stats, candidates = 0, 4 * vocab_size
    activations = 2 * logit_bytes * (4 * hidden_size + 3 * intermediate_size)
    outputs = k * (8 + 4 + 4) + 32
    return vocab_size * per_logit + stats + candidates + activations + outputs


def chunk_rows(
    batch: int,
    seq_len: int,
    bytes_per_token: int,
    free_bytes: int,
    *,
    fraction: float = SAFE_MEMORY_FRACTION,
    max_tokens: int | None = None,
) -> int:
    """Rows per forward so that a chunk fits in ``fraction`` of the free device memory.

    Args:
        batch: rows in the request ``B``.
        seq_len: tokens per row ``T``.
        bytes_per_token: device bytes a scored token holds (:func:`score_bytes_per_token`).
        free_bytes: free device memory, bytes.
        fraction: share of ``free_bytes`` to plan with, in (0, 1].
        max_tokens: optional cap on the tokens of one chunk.

    Returns:
        Rows per chunk in ``[1, batch]`` (1 even when one row does not fit: the forward then
        raises the device's out-of-memory error).

    Raises:
        ValueError: a non-positive ``batch``, ``seq_len``, ``bytes_per_token`` or
            ``max_tokens``, a negative ``free_bytes``, or ``fraction`` outside (0, 1].
    """
    if batch < 1 or seq_len < 1 or bytes_per_token < 1 or free_bytes < 0:
        raise ValueError(f"need batch, seq_len, bytes_per_token >= 1 and free_bytes >= 0, got "
                         f"{batch}, {seq_len}, {bytes_per_token}, {free_bytes}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rows = int(fraction * free_bytes) // (seq_len * bytes_per_token)
    if max_tokens is not None:
        rows = min(rows, max_tokens // seq_len)
    return max(1, min(batch, rows))


class _ToHost:
    """Copies packed chunks to the host. On CUDA: one pinned, non-blocking copy per chunk on a
    side stream, started once the chunk's kernels are queued, so it overlaps the next chunk's
    forward; on CPU the packed tensor is already there."""

    def __init__(self, device: str) -> None:
        import torch

        self.stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None

    def start(self, packed):
        """Start copying ``packed`` (uint8 ``[n]``); returns a ticket for :meth:`wait`."""
        import torch

        if self.stream is None:
            return packed, None, None
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(packed.device))
        with torch.cuda.stream(self.stream):
            host.copy_(packed, non_blocking=True)
            copied = self.stream.record_event()
        return host, copied, packed  # packed stays referenced until the copy is done

    @staticmethod
    def wait(ticket) -> np.ndarray:
        """The host bytes of a started copy (waits for that copy only)."""
        host, copied, _ = ticket
        if copied is not None:
            copied.synchronize()
        return host.numpy()


def left_padded(encoded: list[list[int]], pad: int):
    """Token-id rows as one left-padded batch for decoder-only generation.

    Args:
        encoded: ``B`` rows of token ids (at least one id each).
        pad: the id the short rows start with.

    Returns:
        ``(ids, attention_mask)``: torch int64 ``[B, P]`` (``P`` the longest row), the mask 1 on
        each row's own ids (its right end).
    """
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        am[i, width - len(e) :] = 1
    return ids, am


class HFEngine:
    """Teacher engine on plain ``transformers`` (any ``AutoModelForCausalLM``).

    Args:
        model_path: local model folder (see :func:`raykd.models.resolve_model_path`).
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        num_threads: torch intra-op threads (None: every core of the machine). Ray actors start
            with one thread per logical CPU they reserve, which halves a 2-core forward; the
            engine sets threads explicitly instead.
        max_tokens_per_forward: a cap on the tokens of one forward. None: 4,096 on CPU; on CUDA
            the chunk is sized from the free device memory (:func:`chunk_rows`), which bounds
            the ``[rows, T, V]`` logits held at once.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "auto",
        num_threads: int | None = None,
        max_tokens_per_forward: int | None = None,
    ) -> None:
        import torch

        self.num_threads = num_threads or os.cpu_count() or 1
        torch.set_num_threads(self.num_threads)
        self.device = pick_device(device)
        self.model_path = Path(model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.model = load_causal_lm(self.model_path, dtype=dtype, device=self.device)
        self.dtype = dtype
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_seq_len = int(getattr(self.model.config, "max_position_embeddings", 1 << 20))
        self.max_tokens_per_forward = max_tokens_per_forward
        self._on_cuda = torch.device(self.device).type == "cuda"
        self._to_host = _ToHost(self.device)
        self._lock = threading.Lock()  # one forward at a time; queued requests wait here
        self._info = describe(self, max_k=self.vocab_size, extra={"torch_threads": torch.get_num_threads()})

    def info(self) -> EngineInfo:
        return self._info

    def validate_score_request(self, input_ids: np.ndarray, k: int, temperature: float, seeds: np.ndarray | None = None) -> None:
        """Raise ``ValueError`` naming the problem for a request the engine cannot answer."""
        validate_score_request(input_ids, k, temperature, vocab_size=self.vocab_size,
                               max_seq_len=self.max_seq_len, max_k=self.vocab_size, seeds=seeds)

    def rows_per_chunk(self, batch: int, seq_len: int, k: int, temperature: float = 1.0) -> int:
        """Rows of one forward in :meth:`score`: ``max_tokens_per_forward // T`` on CPU (4,096
        tokens by default); on CUDA from the free device memory (:func:`chunk_rows`), capped by
        ``max_tokens_per_forward`` when given."""
        # lazy: keeps torch out of import time
        import torch

        from raykd.teacher.engines.topk import triton_available

        if not self._on_cuda:
            return max(1, (self.max_tokens_per_forward or CPU_TOKENS_PER_FORWARD) // seq_len)
        dev = torch.device(self.device)
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # cached, unused
        cfg = self.model.config
        hidden = int(getattr(cfg, "hidden_size", 0) or 0)
        per_token = score_bytes_per_token(
            self.vocab_size, k,
            logit_bytes=self.model.get_output_embeddings().weight.element_size(),
            hidden_size=hidden,
            intermediate_size=int(getattr(cfg, "intermediate_size", 0) or 4 * hidden),
            temperature=temperature,
            fused=triton_available(),
        )
        return chunk_rows(batch, seq_len, per_token, free, max_tokens=self.max_tokens_per_forward)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, k: int = 32, temperature: float = 1.0,
              seeds: np.ndarray | None = None, draws: str = "independent") -> ScoreResult:
        """Teacher-forced top-k soft labels for a batch.

        Rows are scored in chunks (:meth:`rows_per_chunk`). Each chunk's top-k, tail mass,
        label log-prob and packing into the result dtypes run on the model's device
        (:mod:`raykd.teacher.engines.topk`); the chunk then reaches the host in one copy, which
        on CUDA is pinned and overlaps the next chunk's forward.

        Args:
            input_ids: int array ``[B, T]``.
            attention_mask: 0/1 array ``[B, T]`` (1 = real token; right padding), or None.
            k: top-k size ``K``.
            temperature: softmax temperature of ``topk_logprobs`` and ``tail_logmass``.
            seeds: int ``[B]``: draw ``k`` ids per position from the whole distribution instead,
                row ``i``'s from seed ``i`` (sampled soft labels; see :data:`ScoreResult`).
            draws: with ``seeds``, ``independent`` or ``systematic`` draws
                (:func:`raykd.teacher.engines.topk.row_uniforms`).

        Returns:
            :data:`ScoreResult` arrays.

        Raises:
            ValueError: empty batch, ids outside the vocabulary, too long, bad ``k``.
        """
        import torch

        input_ids = np.asarray(input_ids)
        self.validate_score_request(input_ids, k, temperature, seeds)
        # An all-ones mask is no mask: the model then skips building (and checking) one.
        mask = None if attention_mask is None or np.all(attention_mask) else np.asarray(attention_mask)
        b, t = input_ids.shape
        out = {
            "topk_ids": np.empty((b, t, k), dtype=ids_dtype(self.vocab_size)),
            "topk_logprobs": np.empty((b, t, k), dtype=np.float16),
            "tail_logmass": np.empty((b, t), dtype=np.float32),
            "label_logprobs": np.empty((b, t), dtype=np.float32),
        }
        with self._lock, torch.inference_mode():
            # OpenMP thread counts are per calling thread: Serve runs requests on worker threads
            # that would otherwise inherit Ray's OMP_NUM_THREADS (1 per reserved CPU).
            torch.set_num_threads(self.num_threads)
            ids = torch.as_tensor(input_ids, dtype=torch.long).to(self.device)  # one upload
            am = None if mask is None else torch.as_tensor(mask, dtype=torch.long).to(self.device)
            rows = self.rows_per_chunk(b, t, k, temperature)
            pending = None
            for s in range(0, b, rows):
                chunk = self._score_chunk(ids[s : s + rows], None if am is None else am[s : s + rows], k, temperature,
                                          None if seeds is None else seeds[s : s + rows], draws)
                ticket = self._to_host.start(chunk)  # queued behind the chunk's kernels
                if pending is not None:  # the previous chunk's copy ran under this forward
                    self._store(out, *pending)
                pending = (s, min(b, s + rows), ticket)
            self._store(out, *pending)
        return out

    def _score_chunk(self, ids, am, k: int, temperature: float, seeds=None, draws: str = "independent"):
        """Packed soft labels (uint8 ``[n]``, on the device) of one chunk ``ids`` ``[R, T]``."""
        # lazy: keeps torch out of import time
        from raykd.teacher.engines.topk import pack_soft_labels, soft_labels_of_logits

        logits = self.model(input_ids=ids, attention_mask=am, use_cache=False).logits
        labels = soft_labels_of_logits(logits, ids, am, k=k, temperature=temperature, seeds=seeds, draws=draws)
        return pack_soft_labels(labels, self.vocab_size)

    def _store(self, out: ScoreResult, start: int, stop: int, ticket) -> None:
        # lazy: keeps torch out of import time
        from raykd.teacher.engines.topk import unpack_soft_labels

        t, k = out["topk_ids"].shape[1:]
        arrays = unpack_soft_labels(self._to_host.wait(ticket), stop - start, t, k, self.vocab_size)
        for name, a in arrays.items():
            out[name][start:stop] = a

    def generate(
        self,
        prompts: list[Any],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        k: int = 8,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> list[dict[str, Any]]:
        """Generate completions and their per-token top-k log-probabilities.

        Args:
            prompts: strings, or chat conversations (lists of ``{"role", "content"}``; the
                tokenizer's chat template is applied with a generation prompt).
            max_new_tokens: new tokens per prompt (at most).
            temperature: 0 is greedy decoding; > 0 samples at that temperature.
            k: ``K`` of the returned top-k log-probabilities (``raw_logprobs``: the model's
                own distribution at temperature 1, whatever the sampling temperature, as vLLM).
                0: none wanted (an OpenAI client that did not ask for logprobs); the top-k
                arrays are ``[N, 0]`` and an engine may leave ``logprobs`` NaN (vLLM then skips
                computing them, about a fifth of its decoding time on CPU).
            seed: sampling seed.
            top_p: nucleus sampling mass in (0, 1] (1: off; ignored when greedy).

        Returns:
            One dict per prompt: ``text`` (str), ``token_ids`` (int list ``[N]``),
            ``topk_ids`` ``[N, K]`` and ``topk_logprobs`` ``[N, K]`` (float32 arrays),
            ``logprobs`` ``[N]`` of the chosen tokens.

        Raises:
            ValueError: empty prompt list, malformed prompt, bad ``k`` or ``max_new_tokens``.
        """
        if not 0 <= k <= self.vocab_size or max_new_tokens < 1 or not 0 < top_p <= 1:
            raise ValueError(f"need 0 <= k <= {self.vocab_size}, max_new_tokens >= 1 and 0 < top_p <= 1")
        encoded = encode_prompts(self.tokenizer, prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids, am = left_padded(encoded, pad)
        new_ids, logits = self._sample(ids, am, pad, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                       top_p=top_p)
        return self._completions(new_ids, logits, k)

    def _sample(self, ids, am, pad: int, *, max_new_tokens: int, temperature: float, seed: int | None,
                top_p: float):
        """One ``model.generate`` over left-padded prompts ``[B, P]`` (greedy at temperature 0).

        Returns:
            ``(new_ids, logits)`` on the CPU: the generated ids ``[B, N]`` (pad after a row's end)
            and the model's raw logits at each of them ``[B, N, V]`` (float32, temperature 1).
        """
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        do_sample = temperature > 0
        with self._lock, torch.inference_mode():
            torch.set_num_threads(self.num_threads)
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=am.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_k=None,
                top_p=top_p if do_sample and top_p < 1 else None,
                pad_token_id=pad,
                return_dict_in_generate=True,
                output_logits=True,
            )
        return out.sequences[:, ids.shape[1]:].cpu(), torch.stack(out.logits, dim=1).float().cpu()

    def _completions(self, new_ids, logits, k: int) -> list[dict[str, Any]]:
        """:meth:`generate`'s dicts from the generated ids ``[B, N]`` and raw logits ``[B, N, V]``:
        each row cut after its first EOS (kept), with its top-``k`` and chosen-token log-probabilities."""
        import torch

        logp = torch.log_softmax(logits, dim=-1)  # raw logits (output_logits), temperature 1
        top_lp, top_ids = logp.topk(k, dim=-1)
        chosen = logp.gather(-1, new_ids[..., None]).squeeze(-1)
        results = []
        eos = self.tokenizer.eos_token_id
        for i in range(len(new_ids)):
            toks = new_ids[i].tolist()
            n = toks.index(eos) + 1 if eos in toks else len(toks)
            results.append(
                {
                    "text": self.tokenizer.decode(toks[:n], skip_special_tokens=True),
                    "token_ids": toks[:n],
                    "topk_ids": top_ids[i, :n].numpy().astype(np.int64),
                    "topk_logprobs": top_lp[i, :n].numpy(),
                    "logprobs": chosen[i, :n].numpy(),
                }
            )
        return results

    def score_continuations(self, prefix: str, texts: list[str], continuations: list[str], *,
                            batch_size: int = 8) -> dict[str, np.ndarray]:
        """Summed log-probs of each continuation after ``prefix + text`` (verbaliser scoring).

        The prefix's keys and values are computed once per call and reused for every text
        (:func:`raykd.teacher.engines.continuations.continuation_logprobs`). The prefix is
        encoded with the tokenizer's special tokens (a BOS), texts and continuations without.

        Args:
            prefix: text shared by every row (instruction and demonstrations; may be empty).
            texts: ``B`` texts, each ending in the prompt's cue (e.g. ``"...\\nTopic:"``).
            continuations: ``C`` verbalisers as they follow the cue (e.g. ``" sport"``).
            batch_size: texts per forward.

        Returns:
            ``scores`` float32 ``[B, C]``, ``tokens`` int64 ``[B]`` (text tokens read per row)
            and ``prefix_tokens``.

        Raises:
            ValueError: an empty text or continuation after tokenisation.
        """
        import torch

        tok = self.tokenizer
        prefix_ids = tok(prefix, add_special_tokens=True)["input_ids"] if prefix else []
        text_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        with self._lock:
            torch.set_num_threads(self.num_threads)
            scores = continuation_logprobs(self.model, prefix_ids, text_ids, cont_ids, pad_id=pad, batch_size=batch_size)
        return {"scores": scores, "tokens": np.array([len(t) for t in text_ids]), "prefix_tokens": np.array(len(prefix_ids))}

    def complete(self, prompts: list[Any], *, max_new_tokens: int = 32, batch_size: int = 8) -> list[dict[str, Any]]:
        """Greedy completions of prompts that share a prefix (few-shot pseudo-labels), the common
        token prefix of all prompts read once per call
        (:func:`raykd.teacher.engines.continuations.greedy_after_prefix`).

        Args:
            prompts: strings or chat conversations (as :meth:`generate`).
            max_new_tokens: new tokens per prompt at most (EOS stops earlier).
            batch_size: prompts per forward.

        Returns:
            One dict per prompt: ``text`` (special tokens skipped) and ``token_ids``.

        Raises:
            ValueError: an empty or malformed prompt list, or ``max_new_tokens < 1``.
        """
        import torch

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        encoded = encode_prompts(self.tokenizer, prompts)
        common = 0
        while all(len(e) > common + 1 and e[common] == encoded[0][common] for e in encoded):
            common += 1  # every row keeps at least one token of its own
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        with self._lock:
            torch.set_num_threads(self.num_threads)
            new = greedy_after_prefix(self.model, encoded[0][:common], [e[common:] for e in encoded], max_new_tokens=max_new_tokens,
                                      eos_id=tok.eos_token_id, pad_id=pad, batch_size=batch_size)
        return [{"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids} for ids in new]
