"""Student construction: layer-dropped copies of the teacher, pretrained students."""

from raykd.students.build import VocabularyMismatchError, build_student, check_same_vocabulary, count_parameters, layer_drop

__all__ = ["VocabularyMismatchError", "build_student", "check_same_vocabulary", "count_parameters", "layer_drop"]
