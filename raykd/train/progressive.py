"""Progressive layer-wise knowledge transfer (PKT) as a schedule of the shared step: MobileBERT,
Sun et al. 2020, "MobileBERT: a Compact Task-Agnostic BERT for Resource-Limited Devices" (ACL),
section 3.5.

A student of ``L`` blocks, each mapped to one teacher block, trains in ``L + 1`` stages of
``total / (L + 1)`` steps each (the boundaries of the GKD seed: step ``t`` is in stage
``#{s in 1..L : t >= s * total / (L + 1)}``):

- stage ``l < L``: only block ``l``'s transfer terms have weight, on a one-pair layer map
  ``(l, t_l)``: feature-map transfer ``hidden_mse`` (stage 0 also matches the embeddings) and
  attention transfer ``attention_kl`` (:mod:`raykd.losses.layerwise`). The blocks below ``l``
  (and the embeddings after stage 0) learn at ``lower_lr`` times the learning rate (the paper's
  softened PKT, the seed's ``mobilebert_pkt_small_lr=0.1``) or not at all (``lower_lr=0``: the
  paper's frozen lower layers);
- stage ``L``: the logit KD terms (``kd_weights``), plus every pair's transfer terms at
  ``final_feature_weight`` (the seed keeps them; 0 drops them), everything at the full rate.

Nothing here trains: :meth:`ProgressiveTransfer.objective_at` is the ``objective_at`` of
:func:`raykd.train.step.run_steps` (as phases and RAIL-KD's per-epoch maps are) and
:meth:`ProgressiveTransfer.optimizer` gives the AdamW whose per-group ``LambdaLR`` applies the
stage's learning-rate factors; the step is the shared :func:`raykd.train.step.train_step`.

Unfaithful details: the paper runs PKT in pre-training (then pre-training distillation with MLM
and KD, then fine-tuning); here it runs on the task data, and the last stage is the task's KD.
The seed applies its 0.1 to the lower layers' *loss terms* (kept in the objective) rather than to
their learning rate; here, as in the paper's softened variant, it is the lower blocks' learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from raykd.losses import Objective
from raykd.losses.features import LayerMap
from raykd.losses.registry import losses_where
from raykd.train.optim import adamw

TRANSFER_TERMS = losses_where("transfer")
"""The layer-wise transfer terms (``hidden_mse``, ``attention_kl``: ``LossSpec.transfer``)."""


@dataclass
class ProgressiveTransfer:
    """The stages of PKT over a checked layer map (one pair per student block, in order).

    Args:
        layer_map: ``(student block l, teacher block t_l)`` for every ``l`` in ``0..L-1``.
        total_steps: steps of the whole run (all stages).
        lower_lr: learning-rate factor of the blocks below the current one (0: frozen).
        kd_weights: the last stage's logit terms, e.g. ``{"forward_kl": 0.5, "ce": 0.5}``.
        final_feature_weight: weight of every pair's transfer terms in the last stage.
        temperature: the KD terms' temperature.

    Raises:
        ValueError: the map does not pair every student block ``0..L-1`` in order, fewer steps
            than stages, or ``lower_lr`` outside ``[0, 1]``.
    """

    layer_map: LayerMap
    total_steps: int
    lower_lr: float = 0.1
    kd_weights: Mapping[str, float] = field(default_factory=lambda: {"forward_kl": 0.5, "ce": 0.5})
    final_feature_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        students = [s for s, _ in self.layer_map.pairs]
        if students != list(range(self.layer_map.student_layers)):
            raise ValueError(f"progressive transfer trains every student block in turn: the layer map must pair blocks "
                             f"0..{self.layer_map.student_layers - 1} in order, got {list(self.layer_map.pairs)}")
        if self.total_steps < self.num_stages:
            raise ValueError(f"total_steps={self.total_steps} is fewer than the {self.num_stages} stages "
                             f"({self.layer_map.student_layers} blocks + the KD stage)")
        if not 0.0 <= self.lower_lr <= 1.0:
            raise ValueError(f"lower_lr={self.lower_lr} must be in [0, 1] (0 freezes the lower blocks)")
        self._objectives: dict[int, Objective] = {}

    @property
    def num_stages(self) -> int:
        """``L + 1``: one per student block, then the KD stage."""
        return self.layer_map.student_layers + 1

    def stage_of(self, step: int) -> int:
        """The 0-based stage of 0-based ``step``."""
        return sum(step >= s * self.total_steps / self.num_stages for s in range(1, self.num_stages))

    def stage_starts(self) -> list[int]:
        """The first step of every stage."""
        return [next(t for t in range(self.total_steps) if self.stage_of(t) == s) for s in range(self.num_stages)]

    def weights(self, stage: int) -> tuple[dict[str, float], dict[str, dict], LayerMap]:
        """``({term: weight}, {term: params}, layer map)`` of ``stage``."""
        lm, last = self.layer_map, self.num_stages - 1
        if stage < last:
            one = LayerMap((lm.pairs[stage],), lm.student_layers, lm.teacher_layers)
            return dict.fromkeys(TRANSFER_TERMS, 1.0), {"hidden_mse": {"embeddings": stage == 0}}, one
        weights = {**self.kd_weights, **dict.fromkeys(TRANSFER_TERMS, self.final_feature_weight)}
        return {n: w for n, w in weights.items() if w > 0}, {}, lm

    def objective(self, stage: int) -> Objective:
        """The :class:`~raykd.losses.Objective` of ``stage`` (built once)."""
        if stage not in self._objectives:
            weights, params, lm = self.weights(stage)
            self._objectives[stage] = Objective(weights, {n: p for n, p in params.items() if n in weights}, layer_map=lm)
        return self._objectives[stage]

    def objective_at(self, step: int) -> tuple[Objective, float]:
        """``run_steps``' ``objective_at``: the objective of ``step``'s stage, and the temperature."""
        return self.objective(self.stage_of(step)), self.temperature

    def lr_factor(self, group: int, step: int) -> float:
        """Learning-rate factor of parameter group ``group`` at ``step``: group 0 the embeddings,
        group ``l + 1`` block ``l``, group ``L + 1`` the rest (pooler, head)."""
        stage = self.stage_of(step)
        if stage == self.num_stages - 1 or group > self.layer_map.student_layers:
            return 1.0
        block = group - 1  # the embeddings are "block -1", trained with block 0
        return 1.0 if block >= stage or (block == -1 and stage == 0) else self.lower_lr

    def param_groups(self, model: nn.Module, blocks: Sequence[nn.Module]) -> list[dict]:
        """The parameter groups of :meth:`lr_factor` (trainable parameters only).

        Args:
            model: the student; blocks: its ``L`` blocks in order (the embeddings are the
                parameters under a module named ``embeddings``).
        """
        in_block = {id(p): i + 1 for i, blk in enumerate(blocks) for p in blk.parameters()}
        groups: list[list[nn.Parameter]] = [[] for _ in range(len(blocks) + 2)]
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            g = in_block.get(id(p), 0 if ".embeddings." in f".{name}" else len(blocks) + 1)
            groups[g].append(p)
        return [{"params": ps} for ps in groups]

    def optimizer(self, model: nn.Module, blocks: Sequence[nn.Module], *, lr: float, weight_decay: float = 0.0,
                  extra: Sequence[nn.Parameter] = ()) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over the groups of :meth:`param_groups` (``extra``, e.g. projections, in the last
        group) and the ``LambdaLR`` applying :meth:`lr_factor` per group (step it after every
        optimizer step: ``train_step``'s ``scheduler``)."""
        groups = self.param_groups(model, blocks)
        groups[-1]["params"] = groups[-1]["params"] + list(extra)
        optimizer = adamw(groups, lr=lr, weight_decay=weight_decay)
        lambdas: list[Callable[[int], float]] = [lambda step, g=g: self.lr_factor(g, step) for g in range(len(groups))]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
