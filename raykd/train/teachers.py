"""The teacher side of a training step when a method joins several teachers (worker side).

:class:`TeacherMix` reads the M teachers' label columns of a joined batch
(:mod:`raykd.soft_labels.join`), weighs them with the method's rule
(:mod:`raykd.losses.multi_teacher`) and returns one sparse target. For RL-KD it also owns the
selection policy: it remembers each micro-batch's choices and, after the optimizer step, rewards
them with the drop of the student's per-example CE on that micro-batch (one extra forward pass
without gradients per micro-batch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from raykd.losses import TeacherTargets
from raykd.losses.multi_teacher import COMBINERS, TeacherPolicy, mix_sparse, teacher_features, teacher_weights
from raykd.soft_labels.join import teacher_column


def teacher_targets(batch: dict[str, Tensor], num_teachers: int) -> tuple[list[TeacherTargets], Tensor]:
    """The M teachers' sparse targets of a joined batch and their ``label_logprobs`` [B, T, M]."""
    targets, label_lp = [], []
    for i in range(num_teachers):
        col = lambda name: batch[teacher_column(i, name)]  # noqa: E731
        targets.append(TeacherTargets.sparse(col("topk_ids").long(), col("topk_logprobs").float(), col("tail_logmass").float()))
        label_lp.append(col("label_logprobs").float())
    return targets, torch.stack(label_lp, -1)


def per_example_ce(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """[B] mean next-token cross entropy of each example over its valid positions."""
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    m = mask.float()
    return (nll * m).sum(1) / m.sum(1).clamp(min=1.0)


class TeacherMix:
    """M teachers -> one target per micro-batch, by the rule ``combine``.

    Args:
        combine: ``mean``, ``truth``, ``entropy`` or ``policy`` (see :mod:`raykd.losses.multi_teacher`).
        num_teachers: M >= 2.
        weight_temperature: softness of ``truth`` / ``entropy`` weights.
        policy_lr: learning rate of the ``policy`` rule.
        seed: seed of the policy's sampling.
    """

    def __init__(self, combine: str, num_teachers: int, weight_temperature: float = 1.0, policy_lr: float = 0.05,
                 seed: int = 0):
        self.combine, self.num_teachers, self.weight_temperature = combine, num_teachers, weight_temperature
        self.policy = TeacherPolicy(lr=policy_lr) if COMBINERS.get(combine).learned else None
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[dict[str, Any]] = []
        self.chosen = torch.zeros(num_teachers)

    def __call__(self, batch: dict[str, Tensor], mask: Tensor) -> TeacherTargets:
        """One sparse target for the micro-batch (policy: also remembers the choices)."""
        targets, label_lp = teacher_targets(batch, self.num_teachers)
        if self.policy is None:
            weights = teacher_weights(self.combine, targets, label_lp, mask, self.weight_temperature)
        else:
            features = teacher_features(targets, label_lp, mask).cpu()  # the policy is small and lives on CPU
            actions, weights = self.policy.select(features, self.generator)
            self.pending.append({"features": features, "actions": actions})
            self.chosen += torch.bincount(actions, minlength=self.num_teachers).float()
        return mix_sparse(targets, weights.to(label_lp.device))

    def remember(self, inputs: tuple[Tensor, Tensor, Tensor, Tensor], logits: Tensor) -> None:
        """Policy only: keep the micro-batch's inputs and the student's CE before the step (for the
        oldest micro-batch whose choices have no inputs yet: micro-batches are remembered in the
        order their targets were made)."""
        if self.policy is not None:
            ids, am, labels, mask = inputs
            entry = next(p for p in self.pending if "inputs" not in p)
            entry.update(inputs=inputs, ce_before=per_example_ce(logits.detach(), labels, mask))

    @torch.no_grad()
    def _ce_after(self, model, inputs) -> Tensor:
        ids, am, labels, mask = inputs
        return per_example_ce(model(input_ids=ids, attention_mask=am).logits, labels, mask)

    def after_step(self, model) -> dict[str, float]:
        """Policy only: reward the step's choices; returns values to log (empty otherwise)."""
        if self.policy is None or not self.pending:
            return {}
        was_training = model.training
        model.eval()
        rewards = [p["ce_before"] - self._ce_after(model, p["inputs"]) for p in self.pending]
        model.train(was_training)
        with torch.enable_grad():
            loss = self.policy.update(torch.cat([p["features"] for p in self.pending]),
                                      torch.cat([p["actions"] for p in self.pending]), torch.cat(rewards).cpu())
        self.pending = []
        share = self.chosen / self.chosen.sum().clamp(min=1.0)
        return {"policy_loss": loss, "reward": float(torch.cat(rewards).mean()),
                **{f"chose_t{i}": float(s) for i, s in enumerate(share)}}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict() if self.policy else None, "chosen": self.chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.policy is not None and state.get("policy") is not None:
            self.policy.load_state_dict(state["policy"])
        self.chosen = state.get("chosen", self.chosen)
