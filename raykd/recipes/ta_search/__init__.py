"""Teacher-assistant schedule search, for a classifier and a decoder LM: :mod:`.config`,
:mod:`.chain` (the one teacher -> TA(s) -> student walk), :mod:`.classifier_chain` and
:mod:`.lm_chain` (each task's hops and phases), :mod:`.paths` (TA paths as data),
:mod:`.prepare` (the classifier's teacher, soft labels, importance), :mod:`.minidisc`,
:mod:`.maxidisc`, :mod:`.classifier_search` and :mod:`.lm_search` (each task's searches),
:mod:`.search` (one entry per search), :mod:`.tuner` (the Tune experiments) and :mod:`.report`."""
