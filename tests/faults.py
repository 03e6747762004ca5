"""Faults injected into real worker processes by the tests, never by production code: a test starts the worker
through `boot(fault)`, which patches the fault in and then runs the ordinary CLI."""
from __future__ import annotations

import sys


def drop_last_state_record() -> None:
    """Recovery silently skips the last user record of each changelog partition: the loss once seen here with
    Faust tables. The crash test must notice it."""
    from scenestream.stream.live import state
    read = state.ChangelogStore._read_changelog

    async def dropping(self, partition, start=0):
        held = None
        async for m in read(self, partition, start):
            if m.key in (state.MARKER_KEY, state.FENCE_KEY) or not m.value:
                yield m
                continue
            if held is not None:
                yield held
            held = m   # the last one is never yielded

    state.ChangelogStore._read_changelog = dropping


FIRED = "FAULT FIRED: "   # what a fault prints (to the worker's log) each time it acts, so a test can tell it did


def outputs_lost_in_flight() -> None:
    """The broker never acknowledges an output record (user-interests), and the worker dies the moment the
    changelog acknowledges a state write: a crash that lands after the state is durable and before the outputs
    are, if the worker ever lets the state go first. Both ways the worker sends records are covered (record
    batches, which the worker uses, and single sends), and each held-back output prints a FIRED line."""
    import asyncio
    import os

    from aiokafka import AIOKafkaProducer

    from scenestream.stream.live import state
    send, send_batch = AIOKafkaProducer.send, AIOKafkaProducer.send_batch

    def held(topic):
        print(f"{FIRED}outputs to {topic} held back, never acknowledged", file=sys.stderr, flush=True)
        return asyncio.get_running_loop().create_future()   # in flight forever

    def die_once_acknowledged(future):
        future.add_done_callback(lambda _: os._exit(1))
        return future

    async def faulty_send(self, topic, value=None, key=None, *args, **kwargs):
        if topic.endswith("-out"):
            return held(topic)
        future = await send(self, topic, value, key, *args, **kwargs)
        if topic.endswith("-state-changelog") and key != state.FENCE_KEY:
            return die_once_acknowledged(future)
        return future

    async def faulty_send_batch(self, batch, topic, *, partition):
        if topic.endswith("-out"):
            return held(topic)
        future = await send_batch(self, batch, topic, partition=partition)
        return die_once_acknowledged(future) if topic.endswith("-state-changelog") else future

    AIOKafkaProducer.send, AIOKafkaProducer.send_batch = faulty_send, faulty_send_batch


SLOW_RECOVERY_S = 3.0


def slow_recovery() -> None:
    """Each partition's recovery takes SLOW_RECOVERY_S longer, as a big changelog or a loaded machine makes it: a
    worker given all eight partitions recovers for longer than the group's 10 s rebalance timeout."""
    import asyncio

    from scenestream.stream.live import state
    recover = state.ChangelogStore.recover

    async def slow(self, partition):
        await asyncio.sleep(SLOW_RECOVERY_S)
        return await recover(self, partition)

    state.ChangelogStore.recover = slow


FAULTS = {"drop_last_state_record": drop_last_state_record, "outputs_lost_in_flight": outputs_lost_in_flight,
          "slow_recovery": slow_recovery}


def boot_command(fault: str) -> list[str]:
    """argv prefix that runs `scenestream ...` with the fault patched in."""
    return [sys.executable, "-c", f"import sys; from tests.faults import FAULTS; FAULTS[{fault!r}](); "
                                  "from scenestream.stream.cli import main; main(sys.argv[1:], prog_name='scenestream')"]
