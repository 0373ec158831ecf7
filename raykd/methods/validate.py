"""The checks of a :class:`~raykd.config.DistillConfig` that need the loss and method registries,
and the loading of any config with them: what the config models cannot check without importing
the layers above them.

:func:`load` is how every command loads its config: :func:`raykd.config.load_config` (YAML,
``base:`` files, dotted overrides, the models' own checks), then :func:`validate` on every
``DistillConfig`` the config holds, so a bad objective, loss parameter or method is refused before
any work starts. :func:`run_method` validates again, for a config built in code.

Pure Python: importing this module imports neither torch nor Ray (the loss registry is imported
when a check runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from raykd.config import ConfigError, DistillConfig, load_config
from raykd.methods.registry import get_method


def validate(cfg: DistillConfig) -> DistillConfig:
    """Check ``cfg`` against the registries: every objective's weights (known losses, finite,
    not all zero), the loss parameters, the method (:meth:`raykd.methods.Method.check`), and the
    feature terms' needs.

    Returns:
        ``cfg``, unchanged.

    Raises:
        ValueError: the first problem found; the message names the field and the fix.
    """
    from raykd.losses.objective import validate_params, validate_weights  # lazy: keeps torch out of import time
    from raykd.losses.registry import feature_terms

    objectives = {f"train.students.{n}": w for n, w in cfg.train.students.items()}
    for i, phase in enumerate(cfg.train.phases):
        objectives.update({f"train.phases[{i}].{k}": getattr(phase, k) for k in ("weights", "weights_end")
                           if getattr(phase, k) is not None})
    for where, weights in objectives.items():
        try:
            validate_weights(weights)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    try:
        validate_params(cfg.train.loss_params, cfg.train.objective_terms())
        get_method(cfg.method).check(cfg)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None
    if cfg.student.tokenizer_alignment is not None and (features := sorted(
            {n for w in cfg.train.students.values() for n in w} & set(feature_terms(cfg.train.objective_terms())))):
        raise ValueError(f"student.tokenizer_alignment aligns output distributions only; feature terms {features} "
                         "read intermediate layers position by position: remove them")
    _check_feature_terms(cfg)
    _check_sampled_labels(cfg)
    _check_chunked_loss(cfg)
    return cfg


def _check_sampled_labels(cfg: DistillConfig) -> None:
    """``labels.form=sampled`` caches an unbiased sample of the teacher's distribution with no
    tail (:mod:`raykd.soft_labels.sampled`). The rule: a teacher-logit term reads it only if its
    gradient is linear in the teacher's probabilities (``forward_kl``); hard-label and feature
    terms do not read it, and with ``train.online_teacher`` the terms read the teacher's dense
    logits instead. Settings that need the top-k logprobs themselves are refused with it."""
    if cfg.labels.form != "sampled":
        return
    from raykd.losses import get_loss  # lazy: keeps torch out of import time
    from raykd.soft_labels.sampled import UNBIASED_TERMS

    reading = [] if cfg.train.online_teacher else [
        n for n in cfg.train.objective_terms() if get_loss(n).kind == "logits" and get_loss(n).needs_teacher]
    if biased := sorted(set(reading) - UNBIASED_TERMS):
        raise ValueError(f"labels.form=sampled gives an unbiased target only to terms linear in the teacher's "
                         f"probabilities ({sorted(UNBIASED_TERMS)}); {biased} would be biased by the sampled, tail-less "
                         "target: use labels.form=topk, or replace them")
    needs_topk = {"train.target_k": cfg.train.target_k is not None,
                  "a train.phases temperature (re-tempers cached top-k logprobs)": any(
                      p.temperature is not None for p in cfg.train.phases),
                  "extra_teachers": bool(cfg.extra_teachers), "on_policy": cfg.on_policy is not None,
                  "student.vocab_size": cfg.student.vocab_size is not None,
                  "student.tokenizer_alignment": cfg.student.tokenizer_alignment is not None,
                  "chain": cfg.chain is not None, "agnostic_stage": cfg.agnostic_stage is not None}
    if clash := [name for name, on in needs_topk.items() if on]:
        raise ValueError(f"labels.form=sampled stores drawn ids and counts, not top-k logprobs; {clash} need top-k "
                         "soft labels: set labels.form=topk or remove them")


def _check_chunked_loss(cfg: DistillConfig) -> None:
    """A learned teacher combination (``rl_kd``'s policy) rewards each micro-batch with the
    student's per-example CE from its whole logits, which the chunked loss never makes."""
    from raykd.losses.multi_teacher import COMBINERS  # lazy: keeps torch out of import time

    combine = get_method(cfg.method).combine
    if cfg.train.loss_chunk_positions and combine is not None and COMBINERS.get(combine).learned:
        raise ValueError(f"method {cfg.method!r} learns its teacher choice from the student's whole logits of each "
                         f"micro-batch, which train.loss_chunk_positions={cfg.train.loss_chunk_positions} never makes: "
                         "set train.loss_chunk_positions=null")


def _check_feature_terms(cfg: DistillConfig) -> None:
    """Feature terms read the one teacher's features in every Train worker (the model-dependent
    checks, layer map against both models, run in the plan)."""
    from raykd.losses.registry import feature_terms  # lazy: keeps torch out of import time

    terms = feature_terms(cfg.train.objective_terms())
    if not terms:
        if cfg.train.layer_map is not None:
            raise ValueError("train.layer_map is set but no objective has a feature term (e.g. pkd, tinybert); "
                             "remove it or add the term")
        return
    if cfg.extra_teachers or cfg.student.vocab_size is not None or cfg.on_policy is not None or cfg.labels.fill == "live":
        raise ValueError(f"feature terms {terms} read one teacher's features on the cached text: they work without "
                         "extra_teachers, student.vocab_size, on_policy and labels.fill=live")
    if cfg.train.strategy == "fsdp":
        raise ValueError(f"feature terms {terms} run the teacher whole in each worker: use train.strategy=ddp")
    if "diito" in terms:  # its plan runs in every step of the workers: checked here, before any work
        from raykd.losses.interchange import check_interchange_params  # lazy: keeps torch out of import time
        from raykd.losses.objective import with_defaults

        check_interchange_params(with_defaults("diito", cfg.train.loss_params.get("diito", {})))
    if cfg.train.feature_teacher == "cached":
        from raykd.losses import get_loss  # lazy: keeps torch out of import time

        if "diito" in terms:
            raise ValueError("diito runs a second, intervened teacher forward every step: cached teacher features "
                             "cannot give it; set train.feature_teacher=online (or auto)")
        if bad := sorted(t for t in terms if not get_loss(t).cached):
            raise ValueError(f"feature terms {bad} have no cached form (they read every teacher layer or stage "
                             "their layers): set train.feature_teacher=online (or auto)")
    if cfg.student.init == "pretrained" and cfg.student.init_from is None and cfg.train.layer_map is None:
        raise ValueError(f"feature terms {terms} with a pretrained student need train.layer_map: "
                         "[[student layer, teacher layer], ...] (only a layer-dropped student has a default stride)")


def distill_configs(cfg: Any, loc: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], DistillConfig]]:
    """Every :class:`~raykd.config.DistillConfig` inside ``cfg`` (itself included), with where it
    sits (field names and list indices)."""
    if isinstance(cfg, DistillConfig):
        yield loc, cfg
    elif isinstance(cfg, BaseModel):
        for name in type(cfg).model_fields:
            yield from distill_configs(getattr(cfg, name), (*loc, name))
    elif isinstance(cfg, (list, tuple)):
        for i, item in enumerate(cfg):
            yield from distill_configs(item, (*loc, i))
    elif isinstance(cfg, dict):
        for key, item in cfg.items():
            yield from distill_configs(item, (*loc, key))


def load(model: type[BaseModel], path: str | os.PathLike | None = None,
         overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a config as every command does: :func:`raykd.config.load_config`, then :func:`validate`
    on every ``DistillConfig`` it holds.

    Raises:
        ConfigError: as :func:`raykd.config.load_config`, or a registry check failed (the message
            names where, as a field error does).
    """
    cfg = load_config(model, path, overrides)
    for loc, distill in distill_configs(cfg):
        try:
            validate(distill)
        except ValueError as e:
            where = ".".join(str(x) for x in loc) or "<root>"
            src = f" ({path})" if path else ""
            raise ConfigError(f"invalid {model.__name__}{src}:\n  {where}: Value error, {e}") from None
    return cfg


def run_method(cfg: DistillConfig, output_dir: Path) -> Any:
    """Run a config with the recipe of its method (what ``raykd distill`` does), after
    :func:`validate` (a config built in code has not been through :func:`load`).

    Raises:
        ValueError: a registry check failed (before any work).
    """
    return get_method(validate(cfg).method).run(cfg, output_dir)
