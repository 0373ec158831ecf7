"""Language-model recipes: :mod:`.distill` (the main job), :mod:`.multi_teacher`, :mod:`.seqkd`
and :mod:`.chains` (TAKD, DGKD)."""
