"""Student construction: layer-dropped copies of the teacher, pretrained students, and the
student architectures of the GKD family (:data:`STUDENT_ARCHITECTURES`)."""

from raykd.students.build import VocabularyMismatchError, build_student, check_same_vocabulary, count_parameters, layer_drop

STUDENT_ARCHITECTURES: dict[str, str] = {
    "albert": "factorised embedding (SVD of the teacher's) and one block shared by every layer, copied from a teacher "
              "layer (ALBERT, Lan et al. 2020); raykd.students.family.albert_student",
    "mobilebert": "bottleneck blocks at the teacher's width, stacked FFNs, trained by progressive layer-wise transfer "
                  "then KD (MobileBERT, Sun et al. 2020); raykd.students.family.mobilebert_student, "
                  "raykd.train.progressive.ProgressiveTransfer",
    "theseus": "teacher block groups replaced at random by successor blocks, on a curriculum (BERT-of-Theseus, "
               "Xu et al. 2020); raykd.students.theseus.theseus_model",
}
"""Student architecture -> one line: what it is, its paper, where it is built (classification, i.e.
encoder, students of a BERT-style teacher; Theseus also takes decoders)."""

__all__ = ["STUDENT_ARCHITECTURES", "VocabularyMismatchError", "build_student", "check_same_vocabulary",
           "count_parameters", "layer_drop"]
