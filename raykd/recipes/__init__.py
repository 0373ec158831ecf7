"""Recipes: thin compositions of library parts, by family.

- :mod:`raykd.recipes.lm`: language-model students from a served teacher: the main distill job,
  multi-teacher, sequence-level KD and teacher-assistant chains (TAKD, DGKD).
- :mod:`raykd.recipes.ta_search`: teacher-assistant schedule search on a classification task
  (MiniDisc, MaxiDisc) on Ray Tune.

Lower layers (data, teacher, soft_labels, losses, students, train) never import from here.
"""
