"""Methods across tokenizers: the teacher's cache read by a student with another tokenizer."""

from __future__ import annotations

from raykd.methods.registry import Method

_CROSS = frozenset({"cross_tokenizer"})

ULD = Method(
    name="uld",
    description="a teacher with another tokenizer: sorted-probability L1 (ULD) at byte-aligned positions, "
                "exact KL on the tokens both vocabularies share",
    paper="Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for "
          "LLMs (arXiv:2402.12030); alignment and matched-vocabulary term as TRL's GOLD trainer",
    composes="student.model (its own tokenizer) and student.tokenizer_alignment: byte_offsets; train.students "
             "{uld: a, forward_kl: b, ce: c} (forward_kl is over the matched tokens + one bucket for the rest)",
    uses=_CROSS, requires=_CROSS,
)


METHODS = (ULD,)
"""The cross-tokenizer methods, in the order ``raykd methods`` lists them."""
