"""Which accepted groups the next step trains: earliest deadline first, and never a batch that
would leave a group in flight with no step left to train it in time.

A group whose oldest token was sampled by version ``m`` must be trained by the step that
trains version ``m + max_staleness``, its deadline. For a group still in flight, ``m`` is not
known yet, but it is at least the version its lease was granted under
(``Coordinator.granted_at``: admission counted from the older of the learner's and the actor
engine's versions), so that gives its earliest possible deadline. Groups arrive in completion order, not grant order: a
long response leased early arrives after shorter, newer ones. Training whatever arrived
first would let such a group miss its deadline, and a group past its deadline can only be
dropped and sampled again (the long chain of thought regenerated, and maybe dropped again).

So the learner trains the arrived groups with the earliest deadlines, but first checks that
everything left (arrived or still in flight) can still be trained in time, ``batch_groups``
per step: for every deadline ``d``, at most ``(d - version) * batch_groups`` of the remaining
groups may be due by ``d``. If not, it waits for the groups in flight. Admission control
(``accepted + in_flight < (v + max_staleness + 1) * batch_groups``) grants a lease only while
that count holds, so waiting always ends: when the stragglers arrive (or their leases expire
and are re-issued under a newer version). With ``max_staleness = 0`` this is the synchronous
rule: train once every group leased for this version is in.
"""

from __future__ import annotations

from collections.abc import Sequence


def choose_batch(
    arrived: Sequence[tuple[int, int]],
    in_flight: Sequence[int],
    *,
    version: int,
    max_staleness: int,
    batch_groups: int,
) -> list[int] | None:
    """The indices into ``arrived`` to train at ``version``, or None to wait for more groups.

    arrived: (oldest token's version, tie-break key) of each accepted group not trained yet,
        all within the bound (``version - oldest <= max_staleness``); the key (the draw's
        ``seq``) orders groups of one version. in_flight: the grant version of every lease in
        flight; one already past its deadline cannot be helped by waiting and is not counted.
        Returns ``batch_groups`` indices, earliest deadline first.
    """
    if len(arrived) < batch_groups:
        return None
    order = sorted(range(len(arrived)), key=lambda i: arrived[i])
    batch, rest = order[:batch_groups], order[batch_groups:]
    waiting = [g + max_staleness for g in in_flight if g + max_staleness >= version]
    deadlines = sorted([arrived[i][0] + max_staleness for i in rest] + waiting)
    # After this step, the steps training versions version+1 .. d can take the groups due by d.
    for due, deadline in enumerate(deadlines, start=1):
        if due > (deadline - version) * batch_groups:
            return None
    return batch
