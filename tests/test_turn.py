"""A turn as its followers see it: each follower gets every event once and in order, knows
whether the next one is there already (a stream sends all those in one write), and a
follower cancelled while waiting leaves the turn and the other followers alone."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from laneway.errors import LanewayError
from laneway.lanes.local import LocalLanes
from laneway.store.base import SessionRef
from laneway.turn import Turn, new_turn_id

REF = SessionRef("t", "default", "k")


async def test_followers_get_every_event_in_order_and_know_what_is_ready() -> None:
    turn = Turn(REF, "m", streamed=True)
    early = turn.events()
    assert not early.ready()
    turn.emit("start", None)
    turn.emit("deltas", ["a"])
    assert early.ready()
    assert await anext(early) == ("start", None)
    assert await anext(early) == ("deltas", ["a"])
    assert not early.ready()
    waiting = asyncio.ensure_future(anext(early))
    await asyncio.sleep(0)
    assert not waiting.done()
    turn.emit("deltas", ["b"])
    assert await waiting == ("deltas", ["b"])
    turn.finish({"id": "x"}, "completed")
    assert early.ready()
    assert await anext(early) == ("done", {"id": "x"})
    with pytest.raises(StopAsyncIteration):
        await anext(early)
    late = turn.events()  # arrives after the end: replays everything
    assert [event async for event in late] == [
        ("start", None), ("deltas", ["a"]), ("deltas", ["b"]), ("done", {"id": "x"})]


async def test_start_wakes_followers_only_of_a_queued_turn() -> None:
    for queued in (0, 1):
        turn = Turn(REF, "m", streamed=True)
        turn.arrival_position = queued
        waiting = asyncio.ensure_future(anext(turn.events()))
        await asyncio.sleep(0)
        turn.emit("start", None)
        await asyncio.sleep(0)
        assert waiting.done() == bool(queued), queued
        turn.emit("deltas", ["a"])
        assert await waiting == ("start", None)


async def test_a_cancelled_follower_leaves_the_others_alone() -> None:
    turn = Turn(REF, "m", streamed=True)
    gone, staying = turn.events(), turn.events()
    cancelled = asyncio.ensure_future(anext(gone))
    kept = asyncio.ensure_future(anext(staying))
    settled = asyncio.ensure_future(turn.settled())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    turn.emit("deltas", ["a"])
    assert await kept == ("deltas", ["a"])
    turn.fail(LanewayError("boom"))
    await settled
    assert not turn.result.cancelled()
    assert (await anext(staying))[0] == "error"


async def test_a_turn_without_a_stream_is_followed_by_its_result() -> None:
    turn = Turn(REF, "m", streamed=False)
    follower = turn.events()
    turn.emit("deltas", ["ignored: nothing is logged"])
    assert not follower.ready()
    turn.finish({"id": "y"}, "completed")
    assert follower.ready()
    assert [event async for event in follower] == [("done", {"id": "y"})]


async def test_queue_position_comes_from_the_ticket_until_the_turn_is_retired() -> None:
    """A queued stream's comments ask the turn for its position; a retired turn has let go of
    its ticket (so that its lane's objects are freed) and answers 0."""
    lanes = LocalLanes()
    holder = await lanes.enter("k", max_waiting=5)
    turn = Turn(REF, "m", streamed=True)
    turn.ticket = await lanes.enter("k", max_waiting=5)
    assert await turn.position() == 1
    await holder.release()
    assert await turn.position() == 0
    turn.ticket = None  # as the service leaves a turn it retires
    assert await turn.position() == 0


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_chunks_put_together_from_pieces_are_plain_json(include_usage: bool) -> None:
    """A relayed chunk is built from bytes encoded once per stream; it must be exactly what
    encoding the whole chunk would give, escapes and non-ASCII included."""
    import orjson

    from laneway.http.sse import TurnStream

    turn = Turn(REF, 'model "é"', streamed=True)
    stream = TurnStream(turn, {}, include_usage, 15.0, "continue")
    base = {"id": turn.completion_id, "object": "chat.completion.chunk",
            "created": int(turn.created), "model": 'model "é"'}

    def whole(delta: dict[str, object], finish: str | None = None) -> bytes:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}]}
        if include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    texts = ["plain", 'quote " and \\ and \n', "naïve ☃"]
    for text in texts:
        assert stream._texts([text]) == whole({"content": text})
    assert stream._texts(texts) == b"".join(whole({"content": text}) for text in texts)
    assert stream._texts(["one"]) == whole({"content": "one"})
    assert stream._chunk({"role": "assistant", "content": ""}) == whole(
        {"role": "assistant", "content": ""})
    assert stream._chunk({}, "stop") == whole({}, "stop")


def test_turn_ids_are_unique_random_hex_across_blocks_and_forks() -> None:
    """Ids are cut from blocks of OS randomness; a forked child must not cut the ids its
    parent is about to cut from the block they would otherwise share."""
    ids = [new_turn_id() for _ in range(2000)]  # several blocks of 341 ids
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"turn_[0-9a-f]{24}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_turn_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    os.close(write)
    assert re.fullmatch(r"turn_[0-9a-f]{24}", child)
    assert child != new_turn_id()
