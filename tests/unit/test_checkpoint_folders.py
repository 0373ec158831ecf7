"""Which checkpoint a local-mode run (``train.num_workers=0``) resumes from when a run of the same
name trained on workers before it: Ray Train's timestamped folders count, its snapshot file and an
unfinished folder do not (the first run of test_train's resume in local mode picked the snapshot
file, which sorts after every folder, and failed to load it as a model)."""

from __future__ import annotations

import os

from raykd.train.loop import STATE_FILE
from raykd.train.worker import checkpoint_folders


def _checkpoint(folder, saved_ns: int):
    folder.mkdir()
    (folder / STATE_FILE).write_bytes(b"state")
    os.utime(folder / STATE_FILE, ns=(saved_ns, saved_ns))
    return folder


def test_checkpoints_of_both_modes_in_save_order_without_the_snapshot_or_an_unfinished_folder(tmp_path):
    own = _checkpoint(tmp_path / "checkpoint_000004", 1_000)
    workers_a = _checkpoint(tmp_path / "checkpoint_2026-12-06_07-26-46.475660", 2_000)
    workers_b = _checkpoint(tmp_path / "checkpoint_2026-12-06_07-26-48.231526", 3_000)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "checkpoint_000010").mkdir()  # its save did not finish
    assert checkpoint_folders(tmp_path) == [own, workers_a, workers_b]
    os.utime(own / STATE_FILE, ns=(4_000, 4_000))  # a later local-mode save is the latest
    assert checkpoint_folders(tmp_path)[-1] == own
    assert checkpoint_folders(tmp_path / "missing") == []
