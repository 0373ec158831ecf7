"""Teacher-assistant schedule search on a classification task: :mod:`.config`, :mod:`.prepare`
(teacher, soft labels, importance), :mod:`.chain` (teacher -> TA -> student), :mod:`.minidisc`,
:mod:`.maxidisc`, :mod:`.search` (the Tune experiments) and :mod:`.report`."""
