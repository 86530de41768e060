"""``sshrpc._deadline.effective_deadline`` is ``trio.current_effective_deadline``
(the client sends it with every call as the ``timeout``): the same answer in
every shape of cancel-scope tree, and Trio's own function when its walk
does not fit the installed Trio."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import trio

from sshrpc import _deadline
from sshrpc._deadline import effective_deadline


def same() -> float:
    """The walk's answer (both kinds already checked, so not Trio's
    fallback) is Trio's."""
    exact = trio.current_effective_deadline()
    assert effective_deadline() == exact
    assert not _deadline._broken
    return exact


@pytest.fixture(autouse=True)
def _checks_done() -> Iterator[None]:
    _deadline._checked.update((True, False))
    _deadline._broken = False
    yield
    _deadline._checked.clear()
    _deadline._broken = False


async def test_no_scope_and_nested_deadlines() -> None:
    assert same() == math.inf
    now = trio.current_time()
    with trio.CancelScope(deadline=now + 50):
        assert same() == now + 50
        with trio.CancelScope(deadline=now + 80):
            assert same() == now + 50
            with trio.CancelScope(deadline=now + 20):
                assert same() == now + 20
            assert same() == now + 50
        with trio.CancelScope():
            assert same() == now + 50
    assert same() == math.inf


async def test_relative_and_changed_deadlines() -> None:
    with trio.move_on_after(30) as scope:
        deadline = same()
        assert deadline == scope.deadline
        scope.deadline += 100
        assert same() == deadline + 100
        scope.deadline = math.inf
        assert same() == math.inf
        with trio.fail_after(5):
            assert same() < deadline
        scope.deadline = trio.current_time() + 1
        assert same() == scope.deadline


async def test_a_shield_hides_outer_deadlines_and_cancels() -> None:
    now = trio.current_time()
    with trio.CancelScope(deadline=now + 10) as outer:
        with trio.CancelScope(shield=True) as shielded:
            assert same() == math.inf
            with trio.CancelScope(deadline=now + 40):
                assert same() == now + 40
            shielded.shield = False
            assert same() == now + 10
            shielded.shield = True
            outer.cancel()
            assert same() == math.inf  # the cancel is outside the shield
            shielded.shield = False
            assert same() == -math.inf
        assert same() == -math.inf


async def test_tasks_of_a_nursery_see_the_nursery_and_their_own_scopes() -> None:
    now = trio.current_time()
    seen: list[float] = []

    async def child(extra: float | None) -> None:
        if extra is None:
            seen.append(same())
        else:
            with trio.CancelScope(deadline=now + extra):
                seen.append(same())

    with trio.CancelScope(deadline=now + 60):
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = now + 45
            nursery.start_soon(child, None)
            nursery.start_soon(child, 5.0)
            nursery.start_soon(child, 90.0)
    assert sorted(seen) == [now + 5, now + 45, now + 45]


class _Other:
    """A task or cancel status of an imagined other Trio."""

    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


async def test_another_trio_falls_back_to_trio_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk over attributes this Trio lacks, or one that disagrees with
    Trio, is never used again: the answer is Trio's."""
    _deadline._checked.clear()
    real_task = trio.lowlevel.current_task()
    monkeypatch.setattr(_deadline, "_current_task", lambda: _Other())
    with trio.move_on_after(10):
        assert effective_deadline() == trio.current_effective_deadline()
    assert _deadline._broken

    _deadline._broken = False
    # A chain that says 1.0 where Trio says otherwise: found on first use.
    scope = _Other(_deadline=1.0, _shield=False)
    status = _Other(effectively_cancelled=False, _scope=scope, _parent=None)
    monkeypatch.setattr(_deadline, "_current_task", lambda: _Other(_cancel_status=status))
    with trio.move_on_after(10):
        assert effective_deadline() == trio.current_effective_deadline() != 1.0
    assert _deadline._broken
    assert effective_deadline() == math.inf
    monkeypatch.setattr(_deadline, "_current_task", lambda: real_task)


async def test_first_answers_are_checked() -> None:
    _deadline._checked.clear()
    assert effective_deadline() == math.inf
    assert _deadline._checked == {False}
    with trio.move_on_after(10):
        assert effective_deadline() == trio.current_effective_deadline()
    assert _deadline._checked == {False, True}
    assert not _deadline._broken
