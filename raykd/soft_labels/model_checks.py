"""The checks a distill run's plan makes on the model configs before any expensive work
(:class:`raykd.soft_labels.plan.Plan`): layer drops within their source model, the feature
terms' layer map, on-policy lengths within the context, and a student tokenizer the teacher's
or one with a named alignment. Only ``config.json`` files and tokenizers are read, never weights.
"""

from __future__ import annotations

from pathlib import Path

from raykd.config import DistillConfig
from raykd.losses.features import LayerMap
from raykd.losses.registry import feature_terms
from raykd.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint
from raykd.students import VocabularyMismatchError, check_same_vocabulary
from raykd.students.build import check_keep_layers, read_layer_origin


def model_config(model_path: Path):
    """The model's ``config.json`` as a transformers config (no weights are read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_path))


def vocab_size_of(model_path: Path) -> int:
    """The model's vocabulary size from its ``config.json``."""
    return int(model_config(model_path).vocab_size)


def check_layer_drops(cfg: DistillConfig, teacher_config) -> None:
    """Every layer-dropped model of the run (the student, each chain assistant) keeps layers
    its source model has, so a bad index fails here rather than after labeling.

    Raises:
        ValueError: a kept layer index outside its source model's layers, or repeated.
    """
    if cfg.student.init == "layer_drop" and cfg.student.init_from is None:
        source = model_config(resolve_model_path(cfg.student.model, setting="student.model")) if cfg.student.model else teacher_config
        check_keep_layers(cfg.student.keep_layers, source.num_hidden_layers, "student.keep_layers",
                          "the student's source model" if cfg.student.model else "the teacher")
    for i, assistant in enumerate(cfg.chain.assistants if cfg.chain is not None else []):
        check_keep_layers(assistant.keep_layers, teacher_config.num_hidden_layers, f"chain.assistants[{i}].keep_layers", "the teacher")


def feature_layer_map(cfg: DistillConfig, teacher_config):
    """The layer map of the run's feature terms, checked against the teacher and the student
    (None without feature terms): ``train.layer_map``, else the stride of ``student.keep_layers``
    (only for a student layer-dropped from the teacher itself).

    Raises:
        ValueError: the map does not fit the models, or the widths differ (a learned projection)
            with several workers (its gradients are not synchronised).
    """
    terms = feature_terms(cfg.train.objective_terms())
    if not terms:
        return None

    s = cfg.student
    if s.init_from is not None:  # a staged start keeps the stride its first run was built from
        source = model_config(Path(s.init_from))
        origin = read_layer_origin(Path(s.init_from))
        same = origin is not None and origin["teacher_layers"] == teacher_config.num_hidden_layers
        keep, student_layers = (origin["keep_layers"] if same else None), source.num_hidden_layers
    else:
        from_teacher = s.init == "layer_drop" and not s.model
        source = teacher_config if from_teacher else model_config(resolve_model_path(s.model, setting="student.model"))
        student_layers = len(s.keep_layers) if s.init == "layer_drop" else source.num_hidden_layers
        keep = s.keep_layers if from_teacher else None
    try:
        layer_map = LayerMap.for_student(cfg.train.layer_map, keep, student_layers, teacher_config.num_hidden_layers)
    except ValueError as e:
        raise ValueError(f"train.layer_map of {terms}: {e}") from None
    widths = (source.hidden_size, teacher_config.hidden_size)
    if widths[0] != widths[1] and cfg.train.num_workers > 1:
        raise ValueError(f"student width {widths[0]} != teacher width {widths[1]}: feature terms {terms} learn a "
                         "projection, trained on one worker only; set train.num_workers to 0 or 1")
    return layer_map


def check_sampling_length(cfg: DistillConfig, teacher_config) -> None:
    """On-policy samples (prompt + continuation) fit the teacher's and the student's context.

    Raises:
        ValueError: ``on_policy.prompt_tokens + on_policy.max_new_tokens`` exceeds a model's
            ``max_position_embeddings``.
    """
    if cfg.on_policy is None:
        return
    length = cfg.on_policy.prompt_tokens + cfg.on_policy.max_new_tokens
    models = {"teacher": teacher_config}
    if cfg.student.init == "pretrained" or cfg.student.model:
        models["student"] = model_config(resolve_model_path(cfg.student.model, setting="student.model"))
    for who, config in models.items():
        context = getattr(config, "max_position_embeddings", None)
        if context is not None and length > context:
            raise ValueError(f"on_policy.prompt_tokens + on_policy.max_new_tokens = {cfg.on_policy.prompt_tokens} + "
                             f"{cfg.on_policy.max_new_tokens} = {length} tokens exceeds the {who}'s context "
                             f"(max_position_embeddings={context}); lower on_policy.max_new_tokens or prompt_tokens")


def check_student_tokenizer(cfg: DistillConfig, teacher_tok_fp: str, teacher_vocab: int) -> bool:
    """A student built from its own model (``student.model``), or a staged start's (``init_from``),
    must share the teacher's tokenizer, unless ``student.tokenizer_alignment`` names how to align
    them (checked on tokenizers only; not for a staged start).

    Returns:
        True when the tokenizers differ and an alignment is named (a cross-tokenizer run).

    Raises:
        VocabularyMismatchError: the tokenizers differ and no alignment is named.
        FileNotFoundError: ``student.init_from`` is not a model folder.
        ValueError: ``student.init=pretrained`` without ``student.model``.
    """
    if cfg.student.init_from is not None:  # a staged start: another run's trained student
        path = Path(cfg.student.init_from)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"student.init_from={cfg.student.init_from!r} is not a model folder (no config.json); "
                                    "give a trained student's folder, e.g. <run>/students/<name>")
        check_same_vocabulary(teacher_tok_fp, tokenizer_fingerprint(load_tokenizer(path)), teacher_vocab, vocab_size_of(path))
        return False

    if cfg.student.init == "pretrained" and cfg.student.model is None:
        raise ValueError("student.init=pretrained needs student.model")
    if cfg.student.model is None:  # a layer-dropped copy of the teacher
        return False
    path = resolve_model_path(cfg.student.model, setting="student.model")
    try:
        check_same_vocabulary(teacher_tok_fp, tokenizer_fingerprint(load_tokenizer(path)), teacher_vocab, vocab_size_of(path))
    except VocabularyMismatchError as e:
        if cfg.student.tokenizer_alignment is None:
            raise VocabularyMismatchError(f"{e}. To distil across tokenizers, name an alignment: "
                                          "student.tokenizer_alignment=byte_offsets (method uld, see `raykd methods`)") from None
        return True
    return False
