"""Building students.

- :func:`layer_drop`: copy a decoder-only teacher and keep a subset of its layers (the
  initialisation of DistilBERT, Sanh et al. 2019, taking every other layer, and of the
  layer-dropped students in MiniDisc, Zhang et al. 2022). Embeddings, final norm and LM head are
  copied, so the student shares the teacher's tokenizer and vocabulary.
- :func:`check_same_vocabulary`: refuse a student whose tokenizer differs from the teacher's
  before any compute starts (sparse soft labels are token ids of the teacher's vocabulary).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from raykd.config import StudentConfig
from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint


class VocabularyMismatchError(ValueError):
    """Teacher and student do not share a tokenizer and vocabulary."""


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Find the ``ModuleList`` of decoder layers (length ``config.num_hidden_layers``)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, child_name, child
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of a transformers model's blocks (``config.num_hidden_layers`` of them:
    a decoder's layers, or an encoder's such as BERT's ``encoder.layer``).

    Raises:
        ValueError: no such list.
    """
    return _decoder_layers(model)[2]


def layer_drop(teacher: nn.Module, keep_layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` that keeps only ``keep_layers`` (in the given order).

    Args:
        teacher: a transformers model with ``config.num_hidden_layers``.
        keep_layers: layer indices; negative values count from the end.

    Returns:
        A new model (the teacher is left unchanged) with ``len(keep_layers)`` layers.

    Raises:
        ValueError: an index is out of range or repeated.
    """
    n = teacher.config.num_hidden_layers
    idx = check_keep_layers(keep_layers, n)
    student = copy.deepcopy(teacher)
    parent, attr, layers = _decoder_layers(student)
    layer_types = getattr(student.config, "layer_types", None)
    types = [layer_types[i] for i in idx] if layer_types is not None and len(layer_types) == n else None
    set_layers(student, parent, attr, [layers[i] for i in idx], types)
    return student


def set_layers(model: nn.Module, parent: nn.Module, attr: str, layers: list[nn.Module], layer_types: list | None) -> None:
    """Make ``layers`` the block list ``parent.<attr>`` of ``model``, re-indexed in their new order.

    Every submodule's ``layer_idx`` (its KV-cache slot) becomes its layer's new position,
    ``config.num_hidden_layers`` the new count and, when given, ``config.layer_types`` the
    new layers' types (None leaves the config's list as it is)."""
    kept = nn.ModuleList(layers)
    for new_idx, layer in enumerate(kept):  # KV-cache slots follow the new positions
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(parent, attr, kept)
    model.config.num_hidden_layers = len(kept)
    if layer_types is not None:
        model.config.layer_types = layer_types


def check_keep_layers(keep_layers: list[int], num_layers: int, field: str = "student.keep_layers",
                      source: str = "the teacher") -> list[int]:
    """The layers ``keep_layers`` names in a model of ``num_layers`` layers, as indices ``0..n-1``.

    Needs only the model's config, so a plan can check it before any labeling.

    Args:
        keep_layers: layer indices; negative values count from the end.
        num_layers: ``config.num_hidden_layers`` of the model the layers are taken from.
        field, source: the config field and the model, for the message.

    Raises:
        ValueError: an index is out of range or two name the same layer.
    """
    n = num_layers
    bad = [i for i in keep_layers if not -n <= i < n]
    if bad:
        raise ValueError(f"{field}={keep_layers}: {bad} out of range for {source}, which has {n} layers "
                         f"(use indices 0..{n - 1}, or -1..-{n} from the end)")
    idx = [i % n for i in keep_layers]
    if len(set(idx)) != len(idx):
        raise ValueError(f"{field}={keep_layers} names a layer twice (negative indices count from the end of {n} layers)")
    return idx


def check_same_vocabulary(teacher_tok_fp: str, student_tok_fp: str, teacher_vocab: int, student_vocab: int) -> None:
    """Raise :class:`VocabularyMismatchError` unless tokenizers and vocabulary sizes agree."""
    if teacher_tok_fp != student_tok_fp or teacher_vocab != student_vocab:
        raise VocabularyMismatchError(
            f"teacher and student tokenizers differ (fingerprints {teacher_tok_fp} vs {student_tok_fp}, "
            f"vocab {teacher_vocab} vs {student_vocab}). Top-k soft labels are teacher token ids, so the "
            "student must share the teacher's tokenizer: use student.init=layer_drop, or a student "
            "trained with the teacher's tokenizer"
        )


def build_student(cfg: StudentConfig, teacher_path: Path, out_dir: Path) -> Path:
    """Create the student's initial weights in ``out_dir`` (a ``save_pretrained`` folder), with
    the tokenizer of the model it comes from (``student.model``, else the teacher).

    Raises:
        VocabularyMismatchError: a student from ``student.model`` with another tokenizer or
            vocabulary, and no ``student.tokenizer_alignment``.
        ValueError: bad ``keep_layers``.
    """
    from transformers import AutoModelForCausalLM

    teacher_tok = load_tokenizer(teacher_path)
    origin = None
    if cfg.init_from is not None:  # a staged start: another run's trained student, as it is
        path = Path(cfg.init_from)
        student_tok = load_tokenizer(path)
        check_same_vocabulary(tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok),
                              len(teacher_tok), len(student_tok))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        origin = read_layer_origin(path)
    else:
        base = resolve_model_path(cfg.model) if cfg.model else teacher_path
        student_tok = load_tokenizer(base) if cfg.model else teacher_tok
        if cfg.init == "pretrained" and cfg.model is None:
            raise ValueError("student.init=pretrained needs student.model")
        if cfg.model and cfg.tokenizer_alignment is None:
            check_same_vocabulary(tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok),
                                  len(teacher_tok), len(student_tok))
        if cfg.init == "pretrained":
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        else:
            source = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            model = layer_drop(source, cfg.keep_layers)
            if not cfg.model:
                origin = {"keep_layers": check_keep_layers(cfg.keep_layers, source.config.num_hidden_layers),
                          "teacher_layers": source.config.num_hidden_layers}
            del source
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    student_tok.save_pretrained(out_dir)  # the student's own (the teacher's unless student.tokenizer_alignment)
    if origin is not None:  # exported with the student: a later staged start keeps the stride
        (Path(out_dir) / LAYER_ORIGIN).write_text(json.dumps(origin))
    return out_dir


LAYER_ORIGIN = "layer_origin.json"
"""In a student folder layer-dropped from the teacher: ``{"keep_layers": [...], "teacher_layers": n}``."""


def read_layer_origin(folder: Path) -> dict | None:
    """The teacher layers a student folder was layer-dropped from (:data:`LAYER_ORIGIN`), or None."""
    path = Path(folder) / LAYER_ORIGIN
    return json.loads(path.read_text()) if path.exists() else None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
