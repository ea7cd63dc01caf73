"""The fleet's shutdown lets uploads under way finish, and counts the ones that do not as failures
(a slow server must not look like a fleet that never sent samples)."""

from __future__ import annotations

import asyncio

from edgeloop.simulator.fleet import Fleet, FleetConfig


def test_uploads_in_flight_finish_or_are_counted_as_failures():
    fleet = Fleet([], FleetConfig())
    finished = []

    async def quick():
        await asyncio.sleep(0.01)
        finished.append(1)

    async def main():
        fleet.tasks.update({asyncio.create_task(quick()), asyncio.create_task(asyncio.sleep(60))})
        await fleet._finish_uploads(0.2)

    asyncio.run(main())
    assert finished == [1]
    assert fleet.counters.upload_failures == 1
    assert list(fleet.counters.upload_errors) == ["unfinished after 0.2 s at shutdown"]
