"""Publishing to JetStream with de-duplication, back-pressure and PubAcks in flight.

Kept apart from bus.py (names, resources, the embedded server) and re-exported by it: every
writer of the bus (learner: prompts; generators: rollouts; `asyncrlhf label`) goes through here.
Waiting for each PubAck in turn costs a round trip to the server's disk per message; a generator
publishing a fetch's groups keeps `PUBLISHES_IN_FLIGHT` of them outstanding (bench/bus_bench.py).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterable, Optional

import nats
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_incrementing

# a full stream (APIError), the bus away or restarting, the stream gone (the learner recreates it)
PUBLISH_RETRYABLE = (nats.errors.TimeoutError, nats.js.errors.APIError, nats.errors.ConnectionClosedError,
                     nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)


async def publish(js, subject: str, payload: bytes, msg_id: str, *, attempts: int = 600,
                  recreate: Optional[Callable[[], Awaitable[None]]] = None) -> bool:
    """Publish with de-duplication; waits (back-pressure) while the stream is full or the bus is
    away, 0.1 s more each try up to 2 s. No stream for the subject: `recreate` (the learner's)
    makes it again, others wait for it. False when the server already had `msg_id` (a duplicate:
    not stored again, e.g. a generator held past the ack wait answering a redelivered prompt)."""
    try:  # the common case without the retry machinery (it costs as much as the publish itself)
        ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=5)
        return not ack.duplicate
    except PUBLISH_RETRYABLE as err:
        if attempts <= 1:
            raise
        if isinstance(err, nats.js.errors.NoStreamResponseError) and recreate is not None:
            await recreate()
    await asyncio.sleep(0.1)  # the first of the waits below
    async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts - 1), wait=wait_incrementing(0.2, 0.1, 2.0),
                                       retry=retry_if_exception_type(PUBLISH_RETRYABLE), reraise=True):
        with attempt:
            try:
                ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=5)
            except nats.js.errors.NoStreamResponseError:
                if recreate is not None:
                    await recreate()
                raise
    return not ack.duplicate


PUBLISHES_IN_FLIGHT = 64  # PubAcks outstanding at once: enough to hide the round trip, few enough to stay polite


async def publish_all(js, messages: Iterable[tuple[str, bytes, str]], *,
                      then: Optional[Callable[[int], Awaitable[None]]] = None,
                      in_flight: int = PUBLISHES_IN_FLIGHT) -> list[bool]:
    """`publish` each (subject, payload, msg_id) with up to `in_flight` PubAcks awaited at once
    (one at a time, each publish costs a round trip to the server's disk). `then(i)` runs as soon
    as message i is stored (a generator acks its prompt there). The order messages land in the
    stream is not kept; de-duplication ids make a retry of any of them safe. A publish that fails
    for good cancels the rest and raises. Returns `publish`'s answer for each (False: a duplicate)."""
    bound = asyncio.Semaphore(in_flight)

    async def one(i: int, subject: str, payload: bytes, msg_id: str) -> bool:
        async with bound:
            stored = await publish(js, subject, payload, msg_id)
        if then is not None:
            await then(i)
        return stored

    tasks = [asyncio.ensure_future(one(i, *m)) for i, m in enumerate(messages)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # on a failure (or cancellation) the others stop too (asyncio.TaskGroup needs Python 3.11)
        for task in tasks:
            task.cancel()
