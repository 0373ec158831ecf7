"""The student rows of the MUKI table (three baselines and four MUKI variants) as data: what each
row trains on. Plain data, no torch: the config checks its ``methods`` against :data:`ROWS`, and
:mod:`raykd.recipes.muki.methods` trains a row.
"""

from __future__ import annotations

from dataclasses import dataclass

from raykd.registry import Registry


@dataclass(frozen=True)
class Integration:
    """One student row.

    Attributes:
        loss: the registry loss the student trains on.
        target: ``concat`` (the teachers' raw logits side by side) or ``integrated`` (MUKI).
        mode: ``hard`` / ``soft`` integration (MUKI rows).
        reweight: weight each example by ``|s_top1 - s_top2|``.
        mc: scores from Monte-Carlo dropout (else one deterministic pass, the ablation).
        features: add DFA's feature amalgamation.
    """

    name: str
    description: str
    loss: str
    target: str
    mode: str | None = None
    reweight: bool = False
    mc: bool = False
    features: bool = False


ROWS: Registry[Integration] = Registry("MUKI row")
"""Every student row by name, in the order of the table (the ``methods`` a config may pick)."""
for _row in (
    Integration("kd", "vanilla KD: KL to softmax(concatenated teacher logits / T), x T^2", "forward_kl", "concat"),
    Integration("uhc", "UHC: student renormalised over each teacher's classes, one KL per teacher", "uhc_kl", "concat"),
    Integration("dfa", "DFA: vanilla KD + feature amalgamation (encode/decode MSE, student-to-code MSE)", "forward_kl", "concat", features=True),
    Integration("muki_hard", "MUKI hard: the most certain teacher (MC-dropout scores)", "muki_kd", "integrated", "hard", mc=True),
    Integration("muki_soft", "MUKI soft: teachers weighted by softmax(s / 0.2)", "muki_kd", "integrated", "soft", mc=True),
    Integration("muki_soft_reweight", "MUKI soft, each example weighted by |s_top1 - s_top2|", "muki_kd", "integrated", "soft", True, mc=True),
    Integration("muki_no_mc", "MUKI soft + re-weighting, scores from one deterministic pass (no MC)", "muki_kd", "integrated", "soft", True),
):
    ROWS.add(_row.name, _row)
