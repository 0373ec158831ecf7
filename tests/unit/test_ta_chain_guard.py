"""Guards of issue 29 (MiniDisc's students regressed when the classifier path moved onto the
shared step): the teacher fine-tuning equals the plain AdamW loop it replaced, and a TA chain on a
tiny classifier gives a student near the direct one. No Ray: the teacher's logits are computed
in-process instead of through the Serve deployment."""

from __future__ import annotations

import pytest
import torch

from raykd.config import ClassifierTeacherConfig
from raykd.train.finetune import finetune_classifier, tokenize_documents
from tests.ray.test_minidisc_tune import build_tiny_classifier, make_labeled_docs

LABELS = ["film", "money", "sport"]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_base"), LABELS)


def _plain_finetune(base, docs, cfg: ClassifierTeacherConfig):
    """The fine-tuning loop as it was before the shared step (a reference, not library code):
    torch's AdamW with its defaults, the model's own CE, the same seeded batch order."""
    from transformers import AutoModelForSequenceClassification

    from raykd.models import load_tokenizer
    from raykd.train.local import batch_indices

    data = tokenize_documents(load_tokenizer(base), docs, LABELS, SEQ_LEN)
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=len(LABELS))
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.train()
    for idx in batch_indices(len(data["label"]), cfg.batch_size, cfg.steps, cfg.seed):
        loss = model(**{k: torch.as_tensor(data[k][idx]) for k in ("input_ids", "attention_mask")},
                     labels=torch.as_tensor(data["label"][idx])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.state_dict()


def test_teacher_finetuning_equals_the_plain_adamw_loop(base, tmp_path):
    """The cause of issue 29: the fine-tuning moved onto the shared step with no weight decay
    (torch's AdamW default of 0.01 was dropped), which changed the teacher and every pruned TA and
    student after it. The default config must give the old loop's weights; weight decay 0 must not."""
    from transformers import AutoModelForSequenceClassification

    docs = make_labeled_docs(24)
    cfg = ClassifierTeacherConfig(base_model=str(base), steps=4, batch_size=8, lr=5e-3, num_threads=1)
    want = _plain_finetune(base, docs, cfg)
    for weight_decay, same in ((cfg.weight_decay, True), (0.0, False)):
        c = cfg.model_copy(update={"weight_decay": weight_decay})
        got = AutoModelForSequenceClassification.from_pretrained(
            str(finetune_classifier(c, docs, LABELS, SEQ_LEN, cache_root=tmp_path))).state_dict()
        diff = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert (diff < 1e-6) == same, f"weight_decay={weight_decay}: max |diff| {diff}"


def test_ta_chain_student_stays_near_the_direct_student(base, tmp_path):
    """Teacher -> TA at 0.5 -> student at 0.9 against teacher -> student at 0.9, same budget.

    The teacher and the direct student must have learnt the task (chance is 1/3), and the TA's
    student must stay within 0.1 of the direct one (3 of 30 test articles)."""
    from raykd.models import load_tokenizer
    from raykd.recipes.ta_search.classifier_chain import distill_chain, importance_of
    from raykd.recipes.ta_search.config import KDConfig, SparsifyConfig
    from raykd.teacher.engines.classifier import load_classifier

    docs = make_labeled_docs(150, seed=1, topic_share=0.7)
    cfg = ClassifierTeacherConfig(base_model=str(base), steps=80, batch_size=16, lr=2e-3, num_threads=1)
    teacher_path = finetune_classifier(cfg, docs[:90], LABELS, SEQ_LEN, cache_root=tmp_path)
    teacher, tok = load_classifier(teacher_path), load_tokenizer(teacher_path)
    splits = {}
    for name, part in (("train", docs[:90]), ("dev", docs[90:120]), ("test", docs[120:])):
        rows = tokenize_documents(tok, part, LABELS, SEQ_LEN)
        with torch.no_grad():
            rows["teacher_logits"] = teacher(input_ids=torch.as_tensor(rows["input_ids"]),
                                             attention_mask=torch.as_tensor(rows["attention_mask"])).logits.numpy()
        splits[name] = rows
    teacher_test = float((splits["test"]["teacher_logits"].argmax(-1) == splits["test"]["label"]).mean())
    assert teacher_test >= 0.9, f"the tiny teacher did not learn the task: test accuracy {teacher_test}"
    kd = KDConfig(steps=16, batch_size=8, lr=2e-3, reports=2, eval_batch_size=30)
    sp = SparsifyConfig(grid=[0.5, 0.9], target=0.9, importance_batches=2)
    imp = importance_of(teacher, splits["train"], kd, 2)
    direct = distill_chain(teacher, 0.0, imp, splits, kd, sp)
    via_ta = distill_chain(teacher, 0.5, imp, splits, kd, sp)
    assert direct.student_test_acc >= 0.8, direct
    assert via_ta.student_test_acc >= direct.student_test_acc - 0.1, (via_ta, direct)
