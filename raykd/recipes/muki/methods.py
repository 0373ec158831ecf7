"""The student rows of the MUKI table: three baselines and four MUKI variants, by name.

Each row is a registry loss (:mod:`raykd.losses`) on targets built from the cached teacher
labels, trained through the shared step (:func:`raykd.train.step.run_steps`); no row sees a
gold label in training (the dev split's gold labels pick the checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from raykd.losses import Objective
from raykd.losses.muki import (
    FeatureAmalgamation,
    attach_aux_loss,
    concat_logits,
    integrate,
    integrated_targets,
    margin_weights,
    pad_to_label_space,
    uncertainty_score,
)
from raykd.recipes.muki.config import IntegrationConfig, StudentConfig
from raykd.recipes.muki.labels import TeacherLabels
from raykd.recipes.muki.rows import Integration
from raykd.teacher.engines.classifier import pooled_features
from raykd.train.local import (
    ClassData,
    batch_indices,
    class_batch,
    epoch_budget,
    trainable_parameters,
)
from raykd.train.step import StudentBatch, build_optimizer, classifier_logits, run_steps


def build_targets(row: Integration, teachers: Sequence[TeacherLabels], blocks: Sequence[Sequence[int]], num_classes: int,
                  cfg: IntegrationConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The train split's target logits ``[N, C]`` of ``row``, and per-example diagnostics.

    Returns:
        ``(targets, info)``: ``info`` holds the ``scores`` ``[N, M]`` and the share of examples
        whose most certain teacher is the one that knows the gold class (MUKI rows).
    """
    logits = [torch.as_tensor(t.logits["train"]) for t in teachers]
    if row.target == "concat":
        return concat_logits(logits, blocks, num_classes).numpy(), {}
    tau = cfg.muki_temperature
    probs = [torch.softmax(z.float() / tau, -1) for z in logits]
    if row.mc:
        scores = torch.stack([uncertainty_score(torch.as_tensor(t.mean_probs)) for t in teachers], -1)
    else:
        scores = torch.stack([uncertainty_score(p) for p in probs], -1)
    p = integrate(pad_to_label_space(probs, blocks, num_classes), scores, row.mode, cfg.score_temperature)
    w = margin_weights(scores) if row.reweight else None
    return integrated_targets(p, w).numpy(), {"scores": scores.numpy()}


def objective_of(row: Integration, blocks: Sequence[Sequence[int]], cfg: IntegrationConfig) -> tuple[Objective, float]:
    """The row's objective and temperature."""
    params = {"uhc_kl": {"blocks": [list(b) for b in blocks]}} if row.loss == "uhc_kl" else None
    tau = cfg.muki_temperature if row.target == "integrated" else cfg.kd_temperature
    return Objective({row.loss: 1.0}, params), tau


class AmalgamatingStudent(nn.Module):
    """A classifier student with DFA's :class:`~raykd.losses.muki.FeatureAmalgamation` attached.

    ``forward(input_ids, attention_mask, teacher_features)`` returns the student's logits; with
    ``teacher_features`` ``[B, sum H_i]`` the weighted feature losses are attached to them
    (:func:`~raykd.losses.muki.attach_aux_loss`), so the shared step back-propagates them with
    the KD term. Without features (evaluation) it is the plain student.
    """

    def __init__(self, student: nn.Module, teacher_widths: Sequence[int], amalgamation_weight: float = 1.0,
                 reconstruction_weight: float = 1.0):
        super().__init__()
        self.student = student
        self.amalgamation = FeatureAmalgamation(student.config.hidden_size, teacher_widths)
        self.weights = (amalgamation_weight, reconstruction_weight)
        self.last: dict[str, float] = {}

    def get_input_embeddings(self) -> nn.Module:
        return self.student.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, teacher_features=None):
        if teacher_features is None:
            return self.student(input_ids=input_ids, attention_mask=attention_mask)
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        amal, rec = self.amalgamation(pooled_features(self.student, out.hidden_states), teacher_features.float())
        self.last = {"amalgamation": float(amal.detach().mean()), "reconstruction": float(rec.detach().mean())}
        return SimpleNamespace(logits=attach_aux_loss(out.logits, self.weights[0] * amal + self.weights[1] * rec))


def row_batches(data: ClassData, batch_size: int, steps: int, seed: int, features: np.ndarray | None = None) -> Iterator[StudentBatch]:
    """``steps`` seeded batches (:func:`raykd.train.local.batch_indices`), with
    ``teacher_features`` in the inputs when given (DFA)."""
    for idx in batch_indices(len(data["label"]), batch_size, steps, seed):
        batch = class_batch(data, idx)
        if features is not None:
            batch.inputs["teacher_features"] = torch.as_tensor(features[idx])
        yield batch


@torch.no_grad()
def predict(model: nn.Module, data: ClassData, batch_size: int) -> np.ndarray:
    """Arg-max class of every row ``[N]``."""
    model.eval()
    out = []
    for s in range(0, len(data["label"]), batch_size):
        b = class_batch(data, np.arange(s, min(s + batch_size, len(data["label"]))))
        out.append(classifier_logits(model, b.inputs)[:, 0].argmax(-1).numpy())
    return np.concatenate(out)


def train_row(student: nn.Module, train: ClassData, dev: ClassData, objective: Objective, temperature: float,
              st: StudentConfig, seed: int, features: np.ndarray | None = None, dfa: tuple[Sequence[int], float, float] | None = None,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train one student row and keep the checkpoint with the best dev accuracy.

    Args:
        student: a fresh classifier (changed in place; ends at the best dev checkpoint).
        train: rows with ``teacher_logits`` (the row's targets) and placeholder labels.
        dev: rows with gold labels (selection only).
        features, dfa: teacher features ``[N, sum H_i]`` and ``(teacher widths, amalgamation
            weight, reconstruction weight)`` for DFA.

    Returns:
        ``best_step``, ``dev_acc``, ``losses`` (per step) and DFA's last feature losses.
    """
    model = student if dfa is None else AmalgamatingStudent(student, *dfa)
    steps, every = epoch_budget(len(train["label"]), st.batch_size, st.epochs, st.evals_per_epoch, st.steps, st.eval_every)
    optimizer, scheduler = build_optimizer(trainable_parameters(model, st.freeze_embeddings), lr=st.lr, schedule=st.schedule,
                                           warmup=round(st.warmup_share * steps), total=steps)
    batches = row_batches(train, st.batch_size, steps, seed, features)
    best = {"dev_acc": -1.0, "best_step": 0, "state": None, "steps": steps}

    def after(step: int, metrics: dict[str, float]) -> None:
        if on_step is not None:
            on_step(step, metrics)
        if step % every and step != steps:
            return
        acc = float((predict(student, dev, st.eval_batch_size) == dev["label"]).mean())
        if acc > best["dev_acc"]:
            best.update(dev_acc=acc, best_step=step, state=copy.deepcopy(student.state_dict()))
        model.train()  # evaluation switched dropout off

    history = run_steps(model, optimizer, lambda _tau: [next(batches)], lambda _step: (objective, temperature), max_steps=steps,
                        on_step=after, logits_fn=classifier_logits, max_grad_norm=1.0, scheduler=scheduler)
    student.load_state_dict(best.pop("state"))
    student.eval()
    out = {**best, "losses": [round(h["loss"], 5) for h in history]}
    if dfa is not None:
        out["dfa_last"] = model.last
    return out


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of a score separating ``positive`` from ``negative`` rows: the
    chance that a random positive scores above a random negative (ties count half); NaN when
    either side is empty."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(positive) or not len(negative):
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def selection_report(teachers: Sequence[TeacherLabels], blocks: Sequence[Sequence[int]], gold: np.ndarray,
                     muki_temperature: float = 1.0) -> dict[str, Any]:
    """How well each selection rule finds the teacher that knows an article's class, before any
    student trains (train split).

    Args:
        teachers: each teacher's labels (``logits["train"]`` ``[N, C_i]``; ``mean_probs`` when MC ran).
        blocks: each teacher's class indices; gold: the gold class of each train article ``[N]``.

    Returns:
        ``own_share`` (articles each teacher owns), and the share of articles whose owner is
        picked by ``muki_score_mc`` (MUKI's ``1 - H / log C`` of the MC mean, when MC ran),
        ``muki_score_single_pass`` (of one deterministic pass at ``muki_temperature``) and
        ``max_logit`` (the largest raw logit, what vanilla KD's concatenated softmax follows);
        per teacher its ``wins`` share under MUKI's score, its mean certainty on its own and on
        foreign articles and the AUROC of that certainty for own-vs-foreign.
    """
    own = np.array([next(i for i, b in enumerate(blocks) if g in b) for g in gold])
    single = np.stack([uncertainty_score(torch.softmax(torch.as_tensor(t.logits["train"]).float() / muki_temperature, -1)).numpy()
                       for t in teachers], -1)
    mc = None if any(t.mean_probs is None for t in teachers) else np.stack(
        [uncertainty_score(torch.as_tensor(t.mean_probs)).numpy() for t in teachers], -1)
    max_logit = np.stack([t.logits["train"].max(-1) for t in teachers], -1)
    score = mc if mc is not None else single
    out: dict[str, Any] = {"articles": len(gold), "score": "mc" if mc is not None else "single_pass",
                           "muki_score_mc": None if mc is None else float((mc.argmax(-1) == own).mean()),
                           "muki_score_single_pass": float((single.argmax(-1) == own).mean()),
                           "max_logit": float((max_logit.argmax(-1) == own).mean()), "teachers": []}
    for i in range(len(teachers)):
        mine = own == i
        out["teachers"].append({"own_share": float(mine.mean()), "wins": float((score.argmax(-1) == i).mean()),
                                "certainty_own": float(score[mine, i].mean()) if mine.any() else float("nan"),
                                "certainty_foreign": float(score[~mine, i].mean()) if (~mine).any() else float("nan"),
                                "auroc": auroc(score[mine, i], score[~mine, i]),
                                "max_logit_auroc": auroc(max_logit[mine, i], max_logit[~mine, i])})
    return out
