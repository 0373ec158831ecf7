"""Parts grouped into reading tasks for the cross-part id check (``raykd.data.unique_ids``)."""

from __future__ import annotations

from raykd.data.sources import PartSpec
from raykd.data.unique_ids import part_groups


def _parts(*rows: int) -> list[PartSpec]:
    out, start = [], 0
    for n in rows:
        out.append(PartSpec(source="jsonl", location="a.jsonl", name="a.jsonl", start=start, stop=start + n))
        start += n
    return out


def test_consecutive_parts_fill_each_group_to_at_least_its_rows():
    parts = _parts(4, 4, 4, 4, 4)
    groups = part_groups(parts, 8)
    assert [[p.start for p in g] for g in groups] == [[0, 4], [8, 12], [16]]
    assert [p for g in groups for p in g] == parts  # every part once, in order


def test_a_group_closes_once_it_holds_its_rows_and_a_small_source_is_one_group():
    assert [[p.rows for p in g] for g in part_groups(_parts(2, 20, 3), 5)] == [[2, 20], [3]]
    assert [[p.rows for p in g] for g in part_groups(_parts(20, 1), 5)] == [[20], [1]]
    assert len(part_groups(_parts(*[10] * 30), 250_000)) == 1
