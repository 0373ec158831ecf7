"""TA paths as data: hop syntax, checks against the teacher, MaxiDisc's path enumeration (no Ray)."""

from __future__ import annotations

import pytest

from raykd.recipes.ta_search.paths import (
    Hop,
    PathError,
    enumerate_paths,
    evenly_spaced_layers,
    format_path,
    parse_hop,
    parse_path,
    resolve_path,
)


@pytest.mark.parametrize(
    ("text", "hop"),
    [("0.8", Hop(None, 0.8)), (0.8, Hop(None, 0.8)), ("80S", Hop(None, 0.8)), ("4L", Hop(4, None)),
     ("4L+0.8", Hop(4, 0.8)), (" 4l + 90s ", Hop(4, 0.9)), ("0", Hop(None, 0.0))],
)
def test_hop_syntax(text, hop):
    assert parse_hop(text) == hop


@pytest.mark.parametrize("text", ["", "L", "4", "1.2", "-0.5", "0L", "4L+", "four", "4L+0.8+0.9", True])
def test_bad_hops_name_the_syntax(text):
    with pytest.raises(PathError, match=r"TA path hop|at least 1 layer|must lie in \[0, 1\)"):
        parse_hop(text)


def test_path_from_a_string_or_a_list_round_trips():
    path = parse_path("0.5 > 4L > 4L+0.9")
    assert path == [Hop(None, 0.5), Hop(4, None), Hop(4, 0.9)] == parse_path([0.5, "4L", "4L+90S"])
    assert parse_path(format_path(path)) == path
    with pytest.raises(PathError, match="at least one hop"):
        parse_path(" ")


def test_resolve_fills_depth_and_sparsity_from_the_hop_before():
    # a hop naming only layers keeps the sparsity reached; one naming only sparsity keeps the depth
    assert resolve_path(parse_path("0.5 > 4L > 0.9"), teacher_layers=6) == [Hop(6, 0.5), Hop(4, 0.5), Hop(4, 0.9)]
    assert resolve_path([Hop(2, None)], 6)[0].size(6) == pytest.approx(2 / 6)
    assert Hop(3, 0.5).size(6) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("spec", "match"),
    [("0.8 > 0.5", "increases model size"), ("4L > 5L", "increases model size"), ("4L+0.5 > 3L+0.2", "increases model size"),
     ("0.5 > 0.5", "same model"), ("8L", "teacher has only 6; use at most 6L"), ("6L", "same model")],
)
def test_paths_that_do_not_shrink_the_model_are_refused(spec, match):
    with pytest.raises(PathError, match=match):
        resolve_path(parse_path(spec), teacher_layers=6)


def test_enumeration_up_to_length_two_is_direct_plus_one_ta_each():
    grid = [Hop(None, s) for s in (0.3, 0.6)]
    paths = enumerate_paths(grid, Hop(None, 0.9), max_length=2, teacher_layers=4)
    assert [format_path(p) for p in paths] == ["4L+0.9", "4L+0.3 > 4L+0.9", "4L+0.6 > 4L+0.9"]


def test_enumeration_keeps_only_shrinking_orders():
    cands = [Hop(None, 0.3), Hop(2, None), Hop(None, 0.6), Hop(None, 0.9)]
    names = [format_path(p) for p in enumerate_paths(cands, Hop(2, 0.9), max_length=3, teacher_layers=4)]
    assert names[:5] == ["2L+0.9", "4L+0.3 > 2L+0.9", "2L > 2L+0.9", "4L+0.6 > 2L+0.9", "4L+0.9 > 2L+0.9"]
    assert "4L+0.3 > 2L+0.3 > 2L+0.9" in names and "2L > 2L+0.6 > 2L+0.9" in names
    # 2L then 0.9 is the student itself; 2L -> 0.3 would grow back (2L+0 -> 2L+0.3 is fine, 0.6 -> 2L+0.6 is fine,
    # but no path may have a hop equal to the one before)
    assert "2L > 2L+0.9 > 2L+0.9" not in names and len(names) == len(set(names)) == 10


def test_enumeration_rejects_a_student_deeper_than_the_teacher():
    with pytest.raises(PathError, match="teacher has only 4"):
        enumerate_paths([], Hop(6, None), 2, teacher_layers=4)


def test_evenly_spaced_layers_keep_first_and_last():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3] and evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(PathError):
        evenly_spaced_layers(4, 5)
