"""Teacher-assistant paths for decoder LMs, in one process (inside a Tune trial; no Ray here).

Every phase trains through the shared step and objective (:func:`raykd.train.step.run_steps`,
:class:`~raykd.losses.Objective`) on rows of the main job's soft-label cache (decoded by
:func:`raykd.train.loop.student_batch`, as a Ray Train worker decodes them):

- the first hop of a path learns from the teacher's cached top-k soft labels (the teacher is
  not run again); every later hop learns from the hop before it, run online (dense logits);
- a hop is built from the one before by :func:`shrink`: layers dropped (evenly spaced), then
  GQA head groups and FFN neurons removed by Taylor importance
  (:mod:`raykd.students.gqa_sparsify`);
- the metric is held-out perplexity on the ``eval`` split's cached rows.

:func:`distill_path` is one MaxiDisc trial; :func:`run_minidisc` is MiniDisc's whole search.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from raykd.losses import Objective, TeacherTargets
from raykd.recipes.ta_search.chain import walk_chain
from raykd.recipes.ta_search.config import LMKDConfig, LMScheduleConfig
from raykd.recipes.ta_search.minidisc import (
    lambda_tradeoff,
    select_teacher_assistant,
    sweep_lambdas,
)
from raykd.recipes.ta_search.paths import (
    Hop,
    PathError,
    evenly_spaced_layers,
    format_path,
    resolve_path,
)
from raykd.students.build import count_parameters, layer_drop
from raykd.students.gqa_sparsify import (
    GQAMasker,
    densify,
    gqa_masks_for_sparsity,
    prunable_params,
    taylor_importance,
    unit_params,
)
from raykd.train.step import (
    StudentBatch,
    build_optimizer,
    causal_lm_logits,
    objective_loss,
    run_steps,
)

CACHE_COLUMNS = ("input_ids", "attention_mask", "loss_mask", "topk_ids", "topk_logprobs", "tail_logmass")


@dataclass
class LMData:
    """Cached rows in memory: ``train`` and ``dev`` lists of decoded batches (numpy ``[B, T]`` /
    ``[B, T, K]``) and the cache's temperature."""

    train: list[dict[str, np.ndarray]]
    dev: list[dict[str, np.ndarray]]
    cached_temperature: float


def load_lm_data(train_files: Sequence[str], eval_files: Sequence[str], kd: LMKDConfig, cached_temperature: float) -> LMData:
    """Read the train cache in batches of ``kd.batch_size`` and the first ``kd.eval_rows`` eval rows.

    Raises:
        ValueError: an empty split.
    """
    # lazy: keeps pyarrow out of import time
    from raykd.soft_labels.cache import iter_cache_batches

    keep = lambda b: {k: b[k] for k in CACHE_COLUMNS}
    train = [keep(b) for b in iter_cache_batches(list(train_files), kd.batch_size)]
    dev, rows = [], 0
    for b in iter_cache_batches(list(eval_files), kd.eval_batch_size):
        take = min(len(b["input_ids"]), kd.eval_rows - rows)
        dev.append({k: v[:take] for k, v in keep(b).items()})
        rows += take
        if rows >= kd.eval_rows:
            break
    if not train or not dev:
        raise ValueError("the soft-label cache has no train or no eval rows: raise data.sample or data.splits.eval")
    return LMData(train, dev, cached_temperature)


def to_student_batch(b: dict[str, np.ndarray], data: LMData, kd: LMKDConfig, device: torch.device) -> StudentBatch:
    """A cached batch as a causal-LM :class:`StudentBatch`: targets cut to the top ``kd.k``
    (:func:`raykd.losses.targets.truncate_topk`) and re-tempered to ``kd.temperature``."""
    # lazy: keeps pyarrow out of import time
    from raykd.train.loop import student_batch

    return student_batch({k: torch.as_tensor(v).to(device) for k, v in b.items()}, data.cached_temperature, kd.temperature,
                         target_k=kd.k)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_batches(data: LMData, kd: LMKDConfig, steps: int, seed: int, device: torch.device):
    """``steps`` train batches drawn with a seeded generator."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield to_student_batch(data.train[int(rng.integers(len(data.train)))], data, kd, device)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the (tied) token embeddings: they are never pruned, and freezing them
    saves most of the optimizer's memory and time on a 49k vocabulary."""
    frozen = {id(p) for p in model.get_input_embeddings().parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]


def lm_phase(model: nn.Module, data: LMData, kd: LMKDConfig, *, teacher: nn.Module | None = None, steps: int | None = None,
             seed: int = 0, on_step: Callable[[int], None] | None = None, groups=None) -> list[float]:
    """One distillation phase: ``steps`` AdamW steps of ``kd.objective()`` through the shared step.

    Args:
        model: the causal-LM student (changed in place; left in eval mode).
        data: cached rows; teacher: the hop before, run online for dense targets ``[B, T, V]``
            (None: the teacher's cached top-k soft labels).
        groups: the micro-batch groups of every step instead of ``data``'s seeded batches (the sandwich).
        on_step: called with the 1-based step after every update.

    Returns:
        The loss of every step (per-token mean).
    """
    steps = steps or kd.steps
    objective = Objective(kd.objective(), kd.objective_params())
    optimizer, _ = build_optimizer(_trainable(model), lr=kd.lr)
    if groups is None:
        groups = ([b] for b in train_batches(data, kd, steps, seed, _device(model)))
    online = None
    if teacher is not None:
        teacher.eval()

        def online(batch: StudentBatch) -> TeacherTargets:
            with torch.no_grad():
                return TeacherTargets.dense(teacher(**batch.inputs).logits.float())

    history = run_steps(model, optimizer, lambda _tau: next(groups), lambda _s: (objective, kd.temperature), max_steps=steps,
                        on_step=None if on_step is None else (lambda s, _m: on_step(s)), logits_fn=causal_lm_logits,
                        max_grad_norm=1.0, teacher=online)
    return [h["loss"] for h in history]


@torch.no_grad()
def heldout_nll(model: nn.Module, data: LMData) -> float:
    """Mean next-token negative log-likelihood (nats) over the held-out rows' ``loss_mask`` positions;
    ``exp`` of it is the held-out perplexity."""
    model.eval()
    nll, n = 0.0, 0
    for b in data.dev:
        ids = torch.as_tensor(b["input_ids"]).long().to(_device(model))
        am = torch.as_tensor(b["attention_mask"]).long().to(ids.device)
        m = torch.as_tensor(b["loss_mask"]).bool().to(ids.device)[:, :-1]
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=am).logits[:, :-1].float(), -1)
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        nll -= float(tok[m].double().sum())
        n += int(m.sum())
    return nll / max(n, 1)


def importance_of(model: nn.Module, data: LMData, kd: LMKDConfig, n_batches: int):
    """Taylor importance of ``model``'s GQA groups and neurons for the KD objective against the
    teacher's cached soft labels."""
    objective = Objective(kd.objective(), kd.objective_params())
    batches = train_batches(data, kd, n_batches, kd.seed + 101, _device(model))
    return taylor_importance(model, batches, lambda m, b: objective_loss(m, b, objective, kd.temperature, causal_lm_logits))


def shrink(model: nn.Module, prev: Hop, hop: Hop, dense_prunable: int, teacher_layers: int, data: LMData, cfg: LMScheduleConfig) -> nn.Module:
    """The next model of a path: a copy of ``model`` (at resolved hop ``prev``) made ``hop``.

    Layers are dropped first (evenly spaced over the current ones, first and last kept), then
    groups and neurons removed until the kept layers lack ``hop.sparsity`` of their dense
    prunable parameters (``dense_prunable * layers / teacher_layers``), least important first.

    Raises:
        PathError: ``hop`` is not smaller than ``prev``.
    """
    if hop.layers > prev.layers or hop.sparsity < prev.sparsity - 1e-9 or (hop.layers == prev.layers and abs(hop.sparsity - prev.sparsity) < 1e-9):
        raise PathError(f"hop {hop} does not shrink {prev}: keep at most its layers and at least its sparsity")
    out = layer_drop(model, evenly_spaced_layers(prev.layers, hop.layers)) if hop.layers < prev.layers else copy.deepcopy(model)
    if hop.sparsity > prev.sparsity + 1e-9 or hop.layers < prev.layers:
        dense_here = dense_prunable * hop.layers / teacher_layers
        have = prunable_params(out)
        to_remove = hop.sparsity * dense_here - (dense_here - have)
        rel = min(max(to_remove / max(have, 1), 0.0), 1.0)
        if rel > 0:
            imp = importance_of(out, data, cfg.kd, cfg.sparsify.importance_batches)
            out = densify(out, gqa_masks_for_sparsity(imp, rel, out, cfg.sparsify.units), inplace=True)
    return out


@dataclass
class LMChain:
    """The decoder LM's hops (:class:`~raykd.recipes.ta_search.paths.Hop`, resolved): each made by
    :func:`shrink` and distilled by :func:`lm_phase` on ``data``'s cached rows."""

    teacher: nn.Module
    data: LMData
    cfg: LMScheduleConfig

    def __post_init__(self) -> None:
        self.dense_prunable = prunable_params(self.teacher)
        self.teacher_layers = self.teacher.config.num_hidden_layers

    def shrink(self, model: nn.Module, prev: Hop, hop: Hop) -> nn.Module:
        """:func:`shrink` of ``model`` from ``prev`` to ``hop``.

        Raises:
            PathError: ``hop`` is not smaller than ``prev``.
        """
        return shrink(model, prev, hop, self.dense_prunable, self.teacher_layers, self.data, self.cfg)

    def phase(self, model: nn.Module, teacher: nn.Module | None, seed: int, on_step: Callable[[int], None] | None) -> None:
        """:func:`lm_phase` of ``model`` from ``teacher`` online, or the teacher's cached top-k soft labels."""
        lm_phase(model, self.data, self.cfg.kd, teacher=teacher, seed=seed, on_step=on_step)


def hop_row(hop: Hop, model: nn.Module, data: LMData) -> dict[str, Any]:
    """A trained hop's row: ``hop`` (text), ``params`` and ``heldout_ppl``."""
    return {"hop": str(hop), "params": count_parameters(model), "heldout_ppl": math.exp(heldout_nll(model, data))}


def distill_path(teacher: nn.Module, path: Sequence[Hop], data: LMData, cfg: LMScheduleConfig, *,
                 report: Callable[[dict[str, Any]], None] | None = None, start: tuple[nn.Module, Hop] | None = None,
                 first_hop: int = 0) -> dict[str, Any]:
    """Teacher -> hop 1 -> ... -> student, one phase of ``kd.steps`` per hop, on the one chain walk
    (:func:`~raykd.recipes.ta_search.chain.walk_chain`).

    Args:
        teacher: the dense teacher (not changed).
        path: resolved hops, student last (:func:`~raykd.recipes.ta_search.paths.resolve_path`).
        data: cached train rows and held-out rows.
        report: called ``kd.reports`` times during the student's phase with ``student_ppl``
            (held-out perplexity), ``step``, ``path`` and ``tas`` (the TAs' rows as JSON text).
        start: an already trained ``(model, its resolved hop)`` that ``path`` continues from (MiniDisc's TAs).
        first_hop: index of ``path[0]`` in the whole path (after ``start``'s TAs): hop ``i`` draws its
            batches with seed ``kd.seed + i``, so a hop sees the same data whichever search builds it.

    Returns:
        ``path`` (text), ``hops`` (per hop: ``hop``, ``params``, ``heldout_ppl``), ``student_ppl``,
        ``student_params``, ``teacher_ppl``, ``seconds``.

    Raises:
        PathError: a hop that does not shrink the model.
    """
    t0 = time.time()
    kd = cfg.kd
    hops: list[dict[str, Any]] = []
    out: dict[str, Any] = {"path": format_path(path), "hops": hops}

    def on_report(student: nn.Module, step: int) -> None:
        ppl = math.exp(heldout_nll(student, data))
        if report is not None:
            report({"student_ppl": ppl, "step": step, "path": out["path"], "tas": json.dumps(hops)})

    walk = walk_chain(LMChain(teacher, data, cfg), start or (teacher, Hop(teacher.config.num_hidden_layers, 0.0)), path,
                      seed=kd.seed, first_hop=first_hop, online=start is not None, steps=kd.steps, reports=kd.reports,
                      on_report=on_report)
    for hop, model in walk:
        hops.append(hop_row(hop, model, data))  # a TA's row is in the student's reports
    out.update(student_ppl=hops[-1]["heldout_ppl"], student_params=hops[-1]["params"], seconds=round(time.time() - t0, 1))
    return out


def sandwich_table(current: nn.Module, grid: Sequence[float], dense_prunable: int, data: LMData,
                   cfg: LMScheduleConfig, teacher: nn.Module | None) -> list[dict[str, float]]:
    """Train one sandwich student (a copy of ``current``) at every ``grid`` sparsity at once and
    score each sparsity on the held-out rows.

    Each step distils one batch under the least sparse grid mask, the largest and
    ``minidisc.sandwich_random`` random ones (masks from ``current``'s Taylor importance,
    applied by :class:`~raykd.students.gqa_sparsify.GQAMasker`), from ``teacher`` online (None:
    the cached soft labels).

    Returns:
        One row per grid point: ``sparsity``, ``params`` (of the densified model), ``heldout_ppl``,
        ``dev_metric`` (``-log ppl``: higher is better).
    """
    kd, md = cfg.kd, cfg.minidisc
    student = copy.deepcopy(current)
    have = prunable_params(student)
    rel = {s: min(max((s * dense_prunable - (dense_prunable - have)) / have, 0.0), 1.0) for s in grid}
    imp = importance_of(student, data, kd, cfg.sparsify.importance_batches)
    masks = {s: gqa_masks_for_sparsity(imp, r, student, cfg.sparsify.units) for s, r in rel.items()}
    masker = GQAMasker(student)
    rng = np.random.default_rng(kd.seed + 7)

    def groups():
        for b in train_batches(data, kd, md.sandwich_steps, kd.seed + 3, _device(student)):
            widths = [grid[0], grid[-1], *rng.choice(list(grid), size=md.sandwich_random)]
            yield [replace(b, context=lambda m=masks[float(s)]: masker.use(m)) for s in widths]

    lm_phase(student, data, kd, teacher=teacher, steps=md.sandwich_steps, groups=groups())
    per_group, per_neuron = unit_params(student)
    total = count_parameters(student)
    table = []
    for s in grid:
        with masker.use(masks[s]):
            nll = heldout_nll(student, data)
        table.append({"sparsity": float(s), "params": total - masks[s].removed_params(per_group, per_neuron),
                      "heldout_ppl": math.exp(nll), "dev_metric": -nll})
    masker.remove()
    return table


def check_minidisc_target(cfg: LMScheduleConfig, teacher_layers: int) -> Hop:
    """The resolved student hop, checked to leave MiniDisc a candidate TA sparsity.

    Raises:
        PathError: the student is deeper than the teacher, or no grid sparsity lies below its sparsity.
    """
    target = resolve_path([cfg.sparsify.student_hop], teacher_layers)[0]
    if not any(s < target.sparsity - 1e-9 for s in cfg.sparsify.grid):
        raise PathError(f"MiniDisc picks a TA sparsity from sparsify.grid below the student's ({target}); none of "
                        f"{cfg.sparsify.grid} is: give the student a sparsity (e.g. {target.layers}L+0.5) or run maxidisc")
    return target


def run_minidisc(cfg: LMScheduleConfig, teacher: nn.Module, data: LMData, report=None) -> dict[str, Any]:
    """MiniDisc in one process: a sandwich per TA choice, the lambda-tradeoff pick, then the path to the student.

    With ``minidisc.iterations = n`` the path has ``n - 1`` TAs, each picked by a sandwich trained
    from the TA before it (the first from the cached teacher soft labels) and then distilled for
    ``kd.steps``; the student is distilled from the last TA.

    Returns:
        ``table`` (the first sandwich's rows with ``lambda_tradeoff``), ``hops`` (TA sparsities
        chosen), ``chosen_ta``, ``sweep`` (the pick of each ``minidisc.lambda_sweep`` lambda on
        the first table), ``student`` (:func:`distill_path`'s result), ``timings``.
    """
    md, L = cfg.minidisc, teacher.config.num_hidden_layers
    target = check_minidisc_target(cfg, L)
    chain = LMChain(teacher, data, cfg)
    dense = chain.dense_prunable
    t0 = time.time()
    current, cur_hop, online, tas, first_table, built = teacher, Hop(L, 0.0), None, [], None, []
    for _ in range(md.iterations - 1):
        grid = [s for s in cfg.sparsify.grid if cur_hop.sparsity + 1e-9 < s <= target.sparsity + 1e-9]
        if not any(s < target.sparsity - 1e-9 for s in grid):
            break
        table = sandwich_table(current, grid, dense, data, cfg, online)
        for row in table:
            row["lambda_tradeoff"] = lambda_tradeoff(row["dev_metric"], row["sparsity"], md.lambda_tradeoff)
        first_table = first_table or table
        s_ta = select_teacher_assistant(table, md.lambda_tradeoff, cur_hop.sparsity, target.sparsity)
        tas.append(s_ta)
        ta_hop = Hop(L, s_ta)
        ta = chain.shrink(current, cur_hop, ta_hop)
        chain.phase(ta, online, cfg.kd.seed + len(tas) - 1, None)
        built.append(hop_row(ta_hop, ta, data))
        current, cur_hop, online = ta, ta_hop, ta
    select_s = time.time() - t0
    student = distill_path(teacher, [target], data, cfg, report=report, start=(current, cur_hop) if tas else None, first_hop=len(tas))
    student["hops"] = built + student["hops"]
    student["path"] = format_path([Hop(L, s) for s in tas] + [target])
    return {"table": first_table or [], "hops": tas, "chosen_ta": tas[0] if tas else None,
            "sweep": sweep_lambdas(first_table, md.lambda_sweep, 0.0, target.sparsity) if first_table else [],
            "student": student, "timings": {"select_s": round(select_s, 1), "total_s": round(time.time() - t0, 1)}}
