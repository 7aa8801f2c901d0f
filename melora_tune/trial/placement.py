"""Free the placement groups that dead Ray Train controllers leave behind.

When Tune stops a trial (ASHA, or the trial reached max_t) it ends the trial's actor;
the Ray Train V2 controller that actor owns dies with it, but the placement group the
controller reserved for its workers does not: GCS removes a non-detached placement
group only once both its creator actor *and* its job are dead, and the job (the Tune
driver) lives on. Ray Train V2 starts a detached ``PlacementGroupCleaner`` per run for
this, but it asks the State API (the dashboard) whether the controller is alive and
finds the cluster by address auto-detection, which fails without a dashboard or with
more than one Ray instance on the machine. Then the reserved CPUs/GPUs leak, and the
next trials' worker groups wait for them forever.

``reap_orphan_placement_groups`` asks GCS directly (no dashboard) and removes every
placement group of *this job* whose creator actor is dead. GCS marks a group created
by the driver (Tune's own trial groups: no creator actor) as ``creator_actor_dead``
too (checked on Ray 2.60), so groups with a nil creator actor id are skipped
explicitly; so are other jobs' groups on a shared cluster. ``tune_trial`` calls it
while it waits on its own trainer and ``melora_tune.search.reaper.PlacementGroupReaper``
after every trial, so neither a search nor a plain ``Tuner`` over ``tune_trial`` hangs.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("melora_tune.trial")


def reap_orphan_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many."""
    import ray  # heavy: Ray
    from ray._common.utils import binary_to_hex  # heavy: Ray
    from ray._private.state import state  # heavy: Ray
    from ray.core.generated import gcs_pb2  # heavy: Ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group  # heavy: Ray

    job_id = ray.get_runtime_context().get_job_id()
    accessor = state._connect_and_get_accessor()
    removed = 0
    alive_states = (gcs_pb2.PlacementGroupTableData.PENDING, gcs_pb2.PlacementGroupTableData.PREPARED,
                    gcs_pb2.PlacementGroupTableData.CREATED, gcs_pb2.PlacementGroupTableData.RESCHEDULING)
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.is_detached or not pg.creator_actor_dead or pg.state not in alive_states:
            continue
        if ray.ActorID(pg.creator_actor_id).is_nil():
            continue  # created by the driver (Tune's trial groups): removing it kills a live trial
        if binary_to_hex(pg.creator_job_id) != job_id:
            continue
        pg_id = ray.PlacementGroupID(pg.placement_group_id)
        try:
            remove_placement_group(PlacementGroup(pg_id))
            removed += 1
            log.debug("removed placement group %s of a dead Train controller", binary_to_hex(pg.placement_group_id))
        except Exception as exc:  # noqa: BLE001
            log.debug("could not remove placement group: %s", exc)
    return removed


class PeriodicReaper:
    """``reap_orphan_placement_groups`` at most every ``period_s`` (``maybe_run``) or now (``run``); switched off
    for good if Ray's internals refuse (an internal Ray API: never fail a trial or a search over it)."""

    def __init__(self, period_s: float, logger: logging.Logger = log) -> None:
        self.period_s = period_s
        self.log = logger
        self.last = float("-inf")
        self.broken = False

    def maybe_run(self) -> None:
        if time.monotonic() - self.last >= self.period_s:
            self.run()

    def run(self) -> None:
        if self.broken:
            return
        self.last = time.monotonic()
        try:
            reap_orphan_placement_groups()
        except Exception as exc:  # noqa: BLE001
            self.broken = True
            self.log.warning("placement group reaper disabled: %s", exc)
