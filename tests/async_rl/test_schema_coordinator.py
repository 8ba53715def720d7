"""Wire schema round trips and rejections; coordinator admission and lease accounting."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from async_rl.coordinator import Coordinator, Outcome
from async_rl.data import Prompt, PromptSource
from async_rl.schema import (
    NOT_SAMPLED,
    SCHEMA_VERSION,
    FinishReason,
    Lease,
    LeaseGrant,
    Register,
    Rejected,
    Response,
    SchemaError,
    TrajectoryGroup,
    check_group,
    decode,
    encode,
)


def _group(lease_id: int = 3, versions: tuple[int, ...] = (0, 1)) -> TrajectoryGroup:
    r = Response(
        token_ids=np.array([5, 6], dtype=np.int32),
        logprobs=np.array([-0.5, -1.25], dtype=np.float32),
        versions=np.array(versions, dtype=np.int32),
        reward=1.0,
        finish_reason=FinishReason.STOP,
    )
    return TrajectoryGroup(lease_id, 42, "a0", np.array([1, 2, 3], dtype=np.int32), [r, r])


def test_trajectory_round_trip_keeps_arrays_exact() -> None:
    out = decode(encode(_group()))
    assert isinstance(out, TrajectoryGroup)
    assert out.lease_id == 3 and out.prompt_id == 42 and out.actor_id == "a0"
    assert out.prompt_token_ids.tolist() == [1, 2, 3]
    assert out.responses[1].logprobs.tolist() == [-0.5, -1.25]
    assert out.responses[0].versions.tolist() == [0, 1]
    assert out.min_version == 0


def test_arrays_travel_as_raw_little_endian_bytes() -> None:
    body = msgpack.unpackb(encode(_group()), raw=False)
    assert body["prompt"] == b"\x01\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00"
    assert body["v"] == SCHEMA_VERSION


def _mutate(**changes: object) -> bytes:
    body = msgpack.unpackb(encode(_group()), raw=False)
    for key, value in changes.items():
        if key.startswith("r0_"):
            body["responses"][0][key[3:]] = value
        else:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1garbage",
        msgpack.packb([1, 2, 3]),
        _mutate(v=SCHEMA_VERSION + 1),
        _mutate(k="no_such_kind"),
        _mutate(lease_id="3"),
        _mutate(lease_id=True),
        _mutate(lease_id=-1),
        _mutate(r0_len=3),  # declared length disagrees with the arrays
        _mutate(r0_len=10**9),  # huge declared length
        _mutate(r0_logprobs=np.array([0.5, -1], dtype="<f4").tobytes()),  # positive logprob
        _mutate(r0_logprobs=np.array([np.nan, -1], dtype="<f4").tobytes()),
        _mutate(r0_tokens=np.array([-1, 6], dtype="<i4").tobytes()),
        _mutate(r0_finish="exploded"),
        _mutate(responses=[]),
    ],
)
def test_malformed_messages_are_rejected(data: bytes) -> None:
    with pytest.raises(SchemaError):
        decode(data)


def _two_turn(versions: tuple[int, ...] = (4, NOT_SAMPLED, NOT_SAMPLED, 5)) -> TrajectoryGroup:
    """A response of turn 1 (one token, v4), a 2-token observation, turn 2 (one token, v5)."""
    r = Response(
        token_ids=np.array([5, 9, 9, 6], dtype=np.int32),
        logprobs=np.array([-0.5, 0.0, 0.0, -1.25], dtype=np.float32),
        versions=np.array(versions, dtype=np.int32),
        reward=1.0,
        finish_reason=FinishReason.STOP,
        sampled=np.array([True, False, False, True]),
        turns=2,
        tool_calls=1,
        tool_errors=0,
    )
    return TrajectoryGroup(7, 42, "a0", np.array([1, 2, 3], dtype=np.int32), [r, r])


def test_multi_turn_response_round_trip_keeps_mask_and_counts() -> None:
    out = decode(encode(_two_turn()))
    assert isinstance(out, TrajectoryGroup)
    r = out.responses[0]
    assert r.sampled_mask.tolist() == [True, False, False, True]
    assert r.versions.tolist() == [4, -1, -1, 5] and r.logprobs.tolist() == [-0.5, 0.0, 0.0, -1.25]
    assert (r.turns, r.tool_calls, r.tool_errors) == (2, 1, 0)
    assert r.sampled_versions.tolist() == [4, 5]
    # Observation tokens have no version: the group's oldest policy is 4, not -1.
    assert out.min_version == 4
    check_group(out, vocab_size=10, max_version=5, group_size=2)
    with pytest.raises(SchemaError, match="future"):
        check_group(out, vocab_size=10, max_version=4, group_size=2)
    # A single-turn response has every token sampled.
    assert decode(encode(_group())).responses[0].sampled_mask.tolist() == [True, True]


def _mutate_two_turn(**changes: object) -> bytes:
    body = msgpack.unpackb(encode(_two_turn()), raw=False)
    body["responses"][0].update(changes)
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"versions": np.array([4, 3, -1, 5], dtype="<i4").tobytes()}, "observation token"),
        ({"versions": np.array([-1, -1, -1, 5], dtype="<i4").tobytes()}, "negative policy version"),
        ({"logprobs": np.array([-0.5, -0.1, 0, -1], dtype="<f4").tobytes()}, "observation token"),
        ({"sampled": bytes([1, 2, 0, 1])}, "0 or 1"),
        ({"sampled": bytes([1, 0, 0])}, "bytes"),
        ({"turns": -1}, "turns"),
        ({"tool_errors": "0"}, "tool_errors"),
    ],
)
def test_malformed_observation_tokens_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        decode(_mutate_two_turn(**changes))


def test_check_group_rejects_out_of_vocab_and_future_versions() -> None:
    g = _group(versions=(0, 5))
    check_group(g, vocab_size=7, max_version=5, group_size=2)
    with pytest.raises(SchemaError, match="vocab"):
        check_group(g, vocab_size=6, max_version=5, group_size=2)
    with pytest.raises(SchemaError, match="future"):
        check_group(g, vocab_size=7, max_version=4, group_size=2)
    with pytest.raises(SchemaError, match="group_size"):
        check_group(g, vocab_size=7, max_version=5, group_size=3)


def test_lease_grant_round_trip() -> None:
    msg = LeaseGrant([Lease(1, 2, 3, "1+1=", "2")])
    assert decode(encode(msg)) == msg


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _coordinator(staleness: int, clock: _Clock | None = None) -> Coordinator:
    prompts = [Prompt(i, f"q{i}", str(i)) for i in range(100)]
    return Coordinator(
        PromptSource(prompts, seed=0),
        batch_groups=4,
        max_staleness=staleness,
        lease_timeout_s=10.0,
        clock=clock or _Clock(),
    )


def test_admission_bound_by_hand() -> None:
    c = _coordinator(staleness=1)
    # (v + s + 1) * B = (0 + 1 + 1) * 4 = 8 leases at version 0.
    assert len(c.grant("a", 100)) == 8
    assert c.grant("a", 1) == []
    # A filtered group frees its slot without counting as accepted: one more lease.
    assert c.finish(0, accepted=False) is Outcome.FILTERED
    assert len(c.grant("a", 100)) == 1
    # Accepted groups keep their slot until the version moves.
    for lease_id in (1, 2, 3):
        assert c.finish(lease_id, accepted=True) is Outcome.ACCEPTED
    assert c.grant("a", 100) == []
    c.set_version(1)  # limit (1 + 1 + 1) * 4 = 12; accepted 3 + in flight 5 = 8
    assert len(c.grant("a", 100)) == 4


def test_admission_counts_from_an_actor_engine_that_lags_behind() -> None:
    # The learner published v2, but this actor's engine still holds v1 (it swaps the new
    # weights in at its next decode step): a lease admitted for it must be trainable by step
    # 1 + s, not 2 + s, or its first tokens would be s + 1 versions stale.
    c = _coordinator(staleness=1)
    c.set_version(2)
    # (min(2, 1) + 1 + 1) * 4 = 12 for the lagging engine, (2 + 1 + 1) * 4 = 16 for a current one.
    assert len(c.grant("slow", 100, engine_version=1)) == 12
    assert c.grant("slow", 1, engine_version=1) == []
    assert len(c.grant("fast", 100, engine_version=2)) == 4


def test_sync_mode_admits_exactly_one_batch() -> None:
    c = _coordinator(staleness=0)
    assert len(c.grant("a", 100)) == 4


def test_duplicates_and_expiry_end_each_lease_once() -> None:
    clock = _Clock()
    c = _coordinator(staleness=1, clock=clock)
    first = c.grant("a", 2)
    assert c.finish(first[0].lease_id, accepted=True) is Outcome.ACCEPTED
    assert c.finish(first[0].lease_id, accepted=True) is Outcome.DUPLICATE
    clock.now = 11.0  # past lease_timeout_s: lease 1 expires and its prompt is re-issued
    assert c.expire() == 1
    again = c.grant("b", 1)
    assert (again[0].seq, again[0].prompt_id) == (first[1].seq, first[1].prompt_id)
    assert again[0].lease_id != first[1].lease_id
    assert c.finish(first[1].lease_id, accepted=True) is Outcome.LATE
    assert c.finish(999, accepted=True) is Outcome.UNKNOWN
    assert c.counts == {
        "granted": 3,
        "accepted": 1,
        "trained": 0,
        "filtered": 0,
        "reissued": 1,
        "stale": 0,
        "duplicates": 1,
        "late": 1,
        "unknown": 1,
        "duplicates_dropped": 3,
        "rejected": 0,
        "unsent": 0,
    }
    # 3 granted = 0 trained + 1 buffered + 0 filtered + 1 re-issued + 0 stale + 1 in flight.
    ledger = c.accounting()
    assert (ledger["buffered"], ledger["in_flight"], ledger["accounted"], ledger["ok"]) == (1, 1, 3, True)


def test_release_reissues_a_departed_actors_leases() -> None:
    c = _coordinator(staleness=1)
    c.grant("a", 3)
    c.grant("b", 2)
    assert c.release("a") == 3
    assert c.in_flight == 2
    assert [lease.seq for lease in c.grant("b", 3)] == [0, 1, 2]


def test_an_unsent_grant_ends_its_leases_at_once_and_heartbeats_do_not_keep_them() -> None:
    clock = _Clock()
    c = _coordinator(staleness=1, clock=clock)
    lost = c.grant("a", 3)  # the LeaseGrant never reached "a"
    assert c.reissue([lease.lease_id for lease in lost], cause="unsent") == 3
    clock.now = 5.0
    c.renew("a")  # its heartbeats go on: nothing of it is live to renew
    assert c.in_flight == 0 and c.in_flight_by_actor() == {}
    # The prompts are leased again, same draws, new ids, before any new draw.
    again = c.grant("a", 4)
    assert [lease.seq for lease in again] == [0, 1, 2, 3]
    assert {lease.lease_id for lease in again}.isdisjoint(lease.lease_id for lease in lost)
    # Ending them again (or an id never granted) changes nothing.
    assert c.reissue([lost[0].lease_id, 999], cause="unsent") == 0
    assert c.finish(lost[0].lease_id, accepted=True) is Outcome.LATE
    assert (c.counts["unsent"], c.counts["reissued"], c.counts["granted"]) == (3, 3, 7)
    # 7 granted = 3 re-issued + 4 in flight.
    ledger = c.accounting()
    assert (ledger["in_flight"], ledger["accounted"], ledger["ok"]) == (4, 7, True)


def test_a_rejected_group_ends_its_lease_and_frees_its_admission_slot() -> None:
    c = _coordinator(staleness=0)
    leases = c.grant("a", 100)  # (0 + 0 + 1) * 4 = 4 leases: admission is full
    assert c.grant("a", 1) == []
    bad = leases[1]
    assert c.reissue([bad.lease_id], cause="rejected") == 1
    (again,) = c.grant("b", 100)  # the slot is free, and the same prompt is leased again
    assert (again.seq, again.prompt_id) == (bad.seq, bad.prompt_id)
    assert c.in_flight_by_actor() == {"a": 3, "b": 1}
    assert c.finish(again.lease_id, accepted=True) is Outcome.ACCEPTED
    assert (c.counts["rejected"], c.counts["reissued"], c.counts["unsent"]) == (1, 1, 0)
    # 5 granted = 1 buffered + 1 re-issued + 3 in flight.
    ledger = c.accounting()
    assert (ledger["buffered"], ledger["in_flight"], ledger["accounted"], ledger["ok"]) == (1, 3, 5, True)
    with pytest.raises(ValueError, match="cause="):
        c.reissue([leases[0].lease_id], cause="expired")


def test_a_stale_accepted_group_frees_its_slot_and_its_prompt_is_leased_again() -> None:
    c = _coordinator(staleness=0)
    first = c.grant("a", 100)  # (0 + 0 + 1) * 4 = 4 leases
    assert len(first) == 4
    assert c.finish(first[0].lease_id, accepted=True) is Outcome.ACCEPTED
    c.requeue_stale(first[0])
    assert c.counts["accepted"] == 0 and c.counts["stale"] == 1
    # The slot is free again, and the replacement is the same prompt at the same position.
    (again,) = c.grant("a", 100)
    assert (again.seq, again.prompt_id) == (first[0].seq, first[0].prompt_id)
    assert again.lease_id != first[0].lease_id


def test_trained_groups_close_the_ledger_and_a_second_training_is_refused() -> None:
    c = _coordinator(staleness=1)
    leases = c.grant("a", 4)
    for lease in leases[:3]:
        assert c.finish(lease.lease_id, accepted=True) is Outcome.ACCEPTED
    c.trained([leases[0].lease_id, leases[1].lease_id])
    ledger = c.accounting()
    # 4 granted = 2 trained + 1 buffered + 1 in flight.
    assert (ledger["trained"], ledger["buffered"], ledger["in_flight"], ledger["ok"]) == (2, 1, 1, True)
    with pytest.raises(RuntimeError, match="not an accepted, untrained group"):
        c.trained([leases[0].lease_id])


def test_restore_reissues_in_flight_and_buffered_leases_under_ids_of_a_new_range() -> None:
    c = _coordinator(staleness=1)
    leases = c.grant("a", 6)  # ids 0..5, seqs 0..5
    for lease in leases[:4]:
        c.finish(lease.lease_id, accepted=True)
    c.trained([0, 1])  # leases 2 and 3 stay accepted but untrained (buffered)
    c.finish(leases[4].lease_id, accepted=False)  # filtered; lease 5 stays in flight
    state = json.loads(json.dumps(c.state_dict()))  # checkpoints are JSON
    restored = Coordinator(
        PromptSource([Prompt(i, f"q{i}", str(i)) for i in range(100)], seed=0),
        batch_groups=4,
        max_staleness=1,
        lease_timeout_s=10.0,
        clock=_Clock(),
        first_lease_id=1 << 32,
    )
    restored.load_state_dict(state)
    ledger = restored.accounting()
    # Buffered leases 2, 3 and in-flight lease 5 end as re-issued: 6 = 2 + 1 + 3.
    assert (ledger["granted"], ledger["trained"], ledger["filtered"], ledger["reissued"]) == (6, 2, 1, 3)
    assert (ledger["accepted"], ledger["buffered"], ledger["in_flight"], ledger["ok"]) == (2, 0, 0, True)
    # Re-issued first, in draw order, then new draws; ids from the new range.
    again = restored.grant("b", 4)
    assert [lease.seq for lease in again] == [2, 3, 5, 6]
    assert [lease.lease_id for lease in again] == [(1 << 32) + i for i in range(4)]
    # A group generated for the crashed learner's lease 5 is dropped, not trained.
    assert restored.finish(5, accepted=True) is Outcome.UNKNOWN
    assert restored.counts["duplicates_dropped"] == 1 and restored.accounting()["ok"]


def test_register_and_rejected_decode_across_schema_versions() -> None:
    # A peer of another version must still reach the learner's Register handler and read
    # the Rejected answer; every other kind from it stays malformed.
    other = SCHEMA_VERSION + 1
    register = msgpack.packb(
        {"v": other, "k": "register", "actor_id": "a0", "schema_version": other, "pid": 7, "hostname": "h"}
    )
    assert decode(register) == Register("a0", other, 7, "h")
    assert decode(msgpack.packb({"v": other, "k": "rejected", "reason": "why"})) == Rejected("why")
    with pytest.raises(SchemaError, match="schema version"):
        decode(msgpack.packb({"v": other, "k": "wait", "retry_after_s": 1.0, "reason": ""}))
