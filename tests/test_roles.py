"""Role assignment for a new plan: fewest switches, deterministic, lowest indices first."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from diffsim.runtime.roles import assign_roles, needs_swap, switched

L, H, I = "light", "heavy", None


def test_initial_assignment_lowest_indices_light_first():
    assert assign_roles([I] * 5, 2, 2) == [L, L, H, H, I]


def test_keeps_current_roles_and_moves_surplus_directly():
    # One light too many, one heavy missing: worker 1 (the highest light) switches, idle 3 stays idle.
    assert assign_roles([L, L, H, I], 1, 2) == [L, H, H, I]


def test_releases_highest_indices_of_a_role():
    assert assign_roles([H, H, H, H], 0, 2) == [H, H, I, I]


def test_fills_from_idle_when_no_surplus():
    assert assign_roles([L, I, H, I], 2, 2) == [L, L, H, H]


def test_too_many_workers():
    with pytest.raises(ValueError):
        assign_roles([I, I], 2, 1)


def min_switches(current, light, heavy):
    """Lower bound: each role keeps at most min(have, want); every other active place is a switch,
    and every current worker left without a place switches to idle."""
    have_l, have_h = current.count(L), current.count(H)
    kept = min(have_l, light) + min(have_h, heavy)
    to_fill = light + heavy - kept
    surplus = have_l + have_h - kept
    return max(to_fill, surplus) if to_fill and surplus else to_fill + surplus


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([L, H, I]), min_size=1, max_size=24), st.data())
def test_assignment_properties(current, data):
    n = len(current)
    light = data.draw(st.integers(0, n))
    heavy = data.draw(st.integers(0, n - light))
    before = list(current)
    new = assign_roles(current, light, heavy)
    assert current == before  # the input is not changed
    assert new.count(L) == light and new.count(H) == heavy
    assert len(switched(current, new)) == min_switches(current, light, heavy)
    # the rules, as the module states them: a role keeps its lowest-index current workers ...
    for role, want in ((L, light), (H, heavy)):
        had = [w for w, r in enumerate(current) if r == role]
        assert [w for w in had if new[w] == role] == had[:want]
    # ... a worker released from one role goes straight to the other before an idle worker is woken ...
    moved = [w for w in range(n) if current[w] in (L, H) and new[w] not in (current[w], I)]
    woken = [w for w in range(n) if current[w] is I and new[w] is not I]
    idled = [w for w in range(n) if current[w] is not I and new[w] is I]
    assert not (woken and idled)
    # ... and a role's places are filled from the front of its candidates: the workers released from the
    # other role, then the idle ones, each lowest index first (less those the other role took)
    for role, other in ((L, H), (H, L)):
        filled = {w for w in moved + woken if new[w] == role}
        released = [w for w in range(n) if current[w] == other and new[w] != other]
        idle = [w for w in range(n) if current[w] is I]
        candidates = [w for w in released + idle if new[w] != other]
        assert filled == set(candidates[:len(filled)])
    # light fills first: it wakes the lower idle indices
    woken_light, woken_heavy = [w for w in woken if new[w] == L], [w for w in woken if new[w] == H]
    assert not (woken_light and woken_heavy) or max(woken_light) < min(woken_heavy)
    event(f"moved between roles: {bool(moved)}")
    event(f"woken from idle: {bool(woken)}")
    event(f"sent to idle: {bool(idled)}")
    event("no change" if new == current else "some change")


def test_switched_and_needs_swap():
    assert switched([L, H, I], [H, H, L]) == [0, 2]
    assert needs_swap(L, H) and needs_swap(None, L)
    assert not needs_swap(L, L) and not needs_swap(L, None)
