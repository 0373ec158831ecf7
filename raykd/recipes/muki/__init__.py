"""MUKI (Li et al., Findings of EMNLP 2022): a student learns all classes from teachers that each
know a subset, weighted per example by their Monte-Carlo dropout certainty; with vanilla KD,
UHC and DFA as baselines. :mod:`.config`, :mod:`.prepare` (split, checks, teachers),
:mod:`.labels` (served teachers, caches), :mod:`.methods` (the student rows), :mod:`.run`
(``raykd muki``) and :mod:`.report`. The maths lives in :mod:`raykd.losses.muki`."""
