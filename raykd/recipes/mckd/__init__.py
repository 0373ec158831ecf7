"""MCKD (Zhao et al., ACL 2024, "Multistage Collaborative Knowledge Distillation from a Large
Language Model for Semi-Supervised Sequence Generation"): an LLM's few-shot pseudo-labels, then
students on random halves that relabel each other's half, stage after stage.
:mod:`.config`, :mod:`.prepare` (split, checks, halves, one stage's cross-relabel),
:mod:`.labels` (the served LLM labeler, cached), :mod:`.students` (both student kinds),
:mod:`.run` (``raykd mckd``) and :mod:`.report`. The verbaliser maths lives in
:mod:`raykd.teacher.engines.continuations`, the pseudo-label cache in
:mod:`raykd.soft_labels.pseudo_labels`."""
