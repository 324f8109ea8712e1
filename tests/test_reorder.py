"""The collector's reorder window: in order when it can, bounded always, losses named exactly."""
from __future__ import annotations

from appliance.reorder import Reorder


def ids(released):
    return [(r.unique_id, r.late) for r in released]


def test_frames_from_several_sources_come_out_in_order():
    reorder = Reorder(window=10, max_wait_s=1.0, missing_limit=100, last_merged=0)
    out = []
    for unique_id in [2, 3, 1, 5, 4, 6]:
        out += reorder.add(unique_id, None, now=0.0)
    assert ids(out) == [(i, False) for i in range(1, 7)]
    assert reorder.depth == 0 and reorder.counts["max_depth"] == 2 and reorder.missing == set()


def test_a_gap_is_awaited_max_wait_then_named_missing_and_a_late_frame_leaves_the_list():
    reorder = Reorder(window=10, max_wait_s=1.0, missing_limit=100, last_merged=0)
    assert ids(reorder.add(1, None, 0.0)) == [(1, False)]
    assert ids(reorder.add(4, None, 0.1)) == []
    assert reorder.next_deadline() == 1.1
    assert ids(reorder.expire(1.0)) == []
    assert ids(reorder.expire(1.1)) == [(4, False)]
    assert reorder.missing == {2, 3} and reorder.missing_count() == 2
    assert ids(reorder.add(3, None, 1.2)) == [(3, True)]
    assert reorder.missing == {2} and reorder.counts["late"] == 1
    assert reorder.missing_ranges(10) == [(2, 2)]


def test_the_window_bounds_what_is_held_whatever_the_clock_says():
    reorder = Reorder(window=3, max_wait_s=100.0, missing_limit=100, last_merged=0)
    out = []
    for unique_id in [2, 3, 4]:
        out += reorder.add(unique_id, None, 0.0)
    assert out == [] and reorder.depth == 3
    assert ids(reorder.add(5, None, 0.0)) == [(2, False), (3, False), (4, False), (5, False)]  # 1 given up
    assert reorder.depth == 0 and reorder.missing == {1}


def test_repeats_are_duplicates_and_ids_going_back_start_a_new_acquisition():
    reorder = Reorder(window=4, max_wait_s=1.0, missing_limit=100, last_merged=0)
    for unique_id in [1, 2, 4]:
        reorder.add(unique_id, None, 0.0)
    reorder.expire(5.0)
    assert reorder.missing == {3}
    assert reorder.add(4, None, 5.0) == [] and reorder.counts["duplicates"] == 1
    out = reorder.add(1, None, 6.0)  # not awaited, not recent... but 1 was just merged: a duplicate
    assert out == [] and reorder.counts["duplicates"] == 2
    for unique_id in range(5, 12):
        reorder.add(unique_id, None, 6.0)
    assert ids(reorder.add(1, None, 7.0)) == []  # 1 is no longer among the recent ids: a new scan
    assert reorder.counts["acquisitions"] == 1 and reorder.counts["lost_in_earlier_acquisitions"] == 1
    assert reorder.missing == set()
    assert ids(reorder.expire(8.0)) == [(1, False)]


def test_losses_are_listed_up_to_the_limit_then_counted():
    reorder = Reorder(window=1, max_wait_s=0.0, missing_limit=3, last_merged=0)
    reorder.add(10, None, 0.0)
    assert reorder.missing == {1, 2, 3} and reorder.missing_count() == 9
    assert reorder.missing_ranges(1) == [(1, 3)]


def test_a_restart_counts_what_passed_since_the_last_merged_id():
    reorder = Reorder(window=8, max_wait_s=0.5, missing_limit=100, last_merged=100)
    reorder.add(104, None, 0.0)
    assert ids(reorder.expire(0.5)) == [(104, False)]
    assert reorder.missing_ranges(5) == [(101, 103)]
