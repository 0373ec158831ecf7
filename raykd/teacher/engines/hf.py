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
    topk_and_tail_of,
    topk_with_tail,
    validate_score_request,
)


class HFEngine:
    """Teacher engine on plain ``transformers`` (any ``AutoModelForCausalLM``).

    Args:
        model_path: local model folder (see :func:`raykd.models.resolve_model_path`).
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        num_threads: torch intra-op threads (None: every core of the machine). Ray actors start
            with one thread per logical CPU they reserve, which halves a 2-core forward; the
            engine sets threads explicitly instead.
        max_tokens_per_forward: rows are scored in chunks of at most this many tokens, bounding
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
        max_tokens_per_forward: int = 4096,
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
        self._lock = threading.Lock()  # one forward at a time; queued requests wait here
        self._info = describe(self, max_k=self.vocab_size, extra={"torch_threads": torch.get_num_threads()})

    def info(self) -> EngineInfo:
        return self._info

    def validate_score_request(self, input_ids: np.ndarray, k: int, temperature: float) -> None:
        """Raise ``ValueError`` naming the problem for a request the engine cannot answer."""
        validate_score_request(input_ids, k, temperature, vocab_size=self.vocab_size,
                               max_seq_len=self.max_seq_len, max_k=self.vocab_size)

    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        k: int = 32,
        temperature: float = 1.0,
    ) -> ScoreResult:
        """Teacher-forced top-k soft labels for a batch.

        Args:
            input_ids: int array ``[B, T]``.
            attention_mask: 0/1 array ``[B, T]`` (1 = real token; right padding), or None.
            k: top-k size ``K``.
            temperature: softmax temperature of ``topk_logprobs`` and ``tail_logmass``.

        Returns:
            :data:`ScoreResult` arrays.

        Raises:
            ValueError: empty batch, ids outside the vocabulary, too long, bad ``k``.
        """
        import torch

        input_ids = np.asarray(input_ids)
        self.validate_score_request(input_ids, k, temperature)
        mask = np.ones_like(input_ids, dtype=np.int64) if attention_mask is None else np.asarray(attention_mask)
        b, t = input_ids.shape
        out_ids = np.empty((b, t, k), dtype=ids_dtype(self.vocab_size))
        out_lp = np.empty((b, t, k), dtype=np.float16)
        out_tail = np.empty((b, t), dtype=np.float32)
        out_label = np.zeros((b, t), dtype=np.float32)
        rows = max(1, self.max_tokens_per_forward // t)
        with self._lock, torch.inference_mode():
            # OpenMP thread counts are per calling thread: Serve runs requests on worker threads
            # that would otherwise inherit Ray's OMP_NUM_THREADS (1 per reserved CPU).
            torch.set_num_threads(self.num_threads)
            for s in range(0, b, rows):
                ids = torch.as_tensor(input_ids[s : s + rows], dtype=torch.long, device=self.device)
                am = torch.as_tensor(mask[s : s + rows], dtype=torch.long, device=self.device)
                logits = self.model(input_ids=ids, attention_mask=am).logits
                logp1 = torch.log_softmax(logits.float(), dim=-1)
                label = logp1[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * am[:, 1:]
                out_label[s : s + rows, :-1] = label.cpu().numpy()
                if temperature == 1.0:  # reuse the log-softmax
                    top_lp, top_ids, tail = topk_and_tail_of(logp1, k)
                else:
                    del logp1
                    top_lp, top_ids, tail = topk_with_tail(logits, k, temperature)
                out_ids[s : s + rows] = top_ids.cpu().numpy().astype(out_ids.dtype)
                out_lp[s : s + rows] = top_lp.cpu().numpy().astype(np.float16)
                out_tail[s : s + rows] = tail.cpu().numpy()
        return {
            "topk_ids": out_ids,
            "topk_logprobs": out_lp,
            "tail_logmass": out_tail,
            "label_logprobs": out_label,
        }

    def generate(
        self,
        prompts: list[Any],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        k: int = 8,
        seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Generate completions and their per-token top-k log-probabilities.

        Args:
            prompts: strings, or chat conversations (lists of ``{"role", "content"}``; the
                tokenizer's chat template is applied with a generation prompt).
            max_new_tokens: new tokens per prompt (at most).
            temperature: 0 is greedy decoding; > 0 samples at that temperature.
            k: ``K`` of the returned top-k log-probabilities (``raw_logprobs``: the model's
                own distribution at temperature 1, whatever the sampling temperature, as vLLM).
            seed: sampling seed.

        Returns:
            One dict per prompt: ``text`` (str), ``token_ids`` (int list ``[N]``),
            ``topk_ids`` ``[N, K]`` and ``topk_logprobs`` ``[N, K]`` (float32 arrays),
            ``logprobs`` ``[N]`` of the chosen tokens.

        Raises:
            ValueError: empty prompt list, malformed prompt, bad ``k`` or ``max_new_tokens``.
        """
        import torch

        if not 1 <= k <= self.vocab_size or max_new_tokens < 1:
            raise ValueError(f"need 1 <= k <= {self.vocab_size} and max_new_tokens >= 1")
        encoded = encode_prompts(self.tokenizer, prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        am = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left padding for decoder-only generation
            ids[i, width - len(e) :] = torch.tensor(e)
            am[i, width - len(e) :] = 1
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
                top_p=None,
                pad_token_id=pad,
                return_dict_in_generate=True,
                output_logits=True,
            )
        gen = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, N, V]
        logp = torch.log_softmax(logits, dim=-1)  # raw logits (output_logits), temperature 1
        top_lp, top_ids = logp.topk(k, dim=-1)
        chosen = logp.gather(-1, gen[..., None]).squeeze(-1)
        results = []
        eos = self.tokenizer.eos_token_id
        for i in range(len(encoded)):
            toks = gen[i].tolist()
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
