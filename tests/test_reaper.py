"""The placement-group reaper on a real local Ray: it frees the groups of dead Train controllers and never
touches the groups the Tune driver made for live trials (GCS reports those as creator_actor_dead too)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _live_group_ids():
    from ray.util import placement_group_table

    return {pg_id for pg_id, row in placement_group_table().items() if row["state"] in ("CREATED", "PENDING")}


def test_reaper_frees_a_dead_actors_group_and_keeps_the_drivers(local_ray):
    ray = local_ray
    from ray.util.placement_group import placement_group

    from melora_tune.trial.placement import reap_orphan_placement_groups

    driver_pg = placement_group([{"CPU": 0.5}])  # like Tune's group for a trial
    ray.get(driver_pg.ready())

    @ray.remote(num_cpus=0)
    class Controller:  # like Ray Train's controller: it reserves its workers' group
        def reserve(self):
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready())
            return pg.id.hex()

    controller = Controller.remote()
    orphan = ray.get(controller.reserve.remote())
    assert {driver_pg.id.hex(), orphan} <= _live_group_ids()
    assert reap_orphan_placement_groups() == 0  # the controller is alive: nothing to free

    ray.kill(controller)
    deadline = time.time() + 30
    removed = 0
    while time.time() < deadline and orphan in _live_group_ids():
        removed += reap_orphan_placement_groups()
        time.sleep(0.5)
    live = _live_group_ids()
    assert orphan not in live and removed >= 1
    assert driver_pg.id.hex() in live
