"""Batch choice (learners/batching.py): earliest deadline first, and a wait whenever training
now would leave a group with no step left within the staleness bound. Cases by hand."""

from __future__ import annotations

from async_rl.coordinator import Coordinator
from async_rl.data import Prompt, PromptSource
from learners.batching import choose_batch


def test_a_straggler_is_waited_for_when_skipping_it_would_make_it_stale() -> None:
    # max_staleness 2, one group per step. Leases B and C were granted under v0 (deadline: the
    # step training v2) and are still generating; D (leased under v1) has arrived. Training D
    # now at v1 would leave B and C both due by v2, with one step (v2) for two groups: wait.
    assert choose_batch([(1, 3)], [0, 0], version=1, max_staleness=2, batch_groups=1) is None
    # With only one of them in flight there is room: D now, the straggler at v2.
    assert choose_batch([(1, 3)], [0], version=1, max_staleness=2, batch_groups=1) == [0]


def test_slack_is_used_while_it_lasts() -> None:
    # At v0 with bound 2 the straggler granted under v0 can wait two more steps.
    assert choose_batch([(0, 1)], [0], version=0, max_staleness=2, batch_groups=1) == [0]
    # Bound 0 (sync): every lease of this version must be in before the step.
    assert choose_batch([(0, 1), (0, 2)], [0], version=0, max_staleness=0, batch_groups=2) is None
    assert choose_batch([(0, 1), (0, 2)], [], version=0, max_staleness=0, batch_groups=2) == [0, 1]


def test_earliest_deadline_first_then_draw_order() -> None:
    arrived = [(3, 10), (1, 12), (2, 11), (1, 9)]
    assert choose_batch(arrived, [], version=3, max_staleness=2, batch_groups=2) == [3, 1]
    assert choose_batch(arrived[:1], [], version=3, max_staleness=2, batch_groups=2) is None  # too few


def test_a_lease_already_past_its_deadline_does_not_hold_the_batch() -> None:
    # Granted under v0 with bound 1: it had to be trained by v1. Waiting at v3 cannot help (it
    # will be dropped as stale when it arrives), so the batch goes ahead.
    assert choose_batch([(3, 1)], [0], version=3, max_staleness=1, batch_groups=1) == [0]


def test_leases_remember_the_version_admission_counted_from() -> None:
    source = PromptSource([Prompt(i, f"{i}+1=", str(i + 1)) for i in range(10)], seed=0)
    coordinator = Coordinator(source, batch_groups=2, max_staleness=1, lease_timeout_s=60.0)
    coordinator.set_version(3)
    lagging = coordinator.grant("a", 1, engine_version=2)  # the actor's engine still holds v2
    current = coordinator.grant("b", 1, engine_version=3)
    assert coordinator.granted_at(lagging[0].lease_id) == 2
    assert coordinator.granted_at(current[0].lease_id) == 3
    assert sorted(coordinator.in_flight_granted_at()) == [2, 3]
    coordinator.finish(lagging[0].lease_id, accepted=True)
    assert coordinator.in_flight_granted_at() == [3] and coordinator.granted_at(lagging[0].lease_id) is None
