"""The sender process's frames are written once per event-loop turn, in order (`sender_process.Frames`)."""

from __future__ import annotations

import asyncio

from batch_engine.sender_process import Frames, frame


def test_the_frames_of_one_turn_go_out_in_one_write_in_order() -> None:
    writes: list[bytes] = []

    async def go() -> None:
        frames = Frames(writes.append)
        for number in range(3):
            frames(frame([number]))
        assert writes == []  # nothing yet: the turn is not over
        await asyncio.sleep(0)
        frames(frame(["next turn"]))
        await asyncio.sleep(0)
        frames(frame(["flushed by hand"]))
        frames.flush()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to write

    asyncio.run(go())

    assert writes == [frame([0]) + frame([1]) + frame([2]), frame(["next turn"]), frame(["flushed by hand"])]
