"""`asyncrlhf label`: publish preference pairs to a running job's bus, for the one-pass reward head.

Input: JSON Lines, one pair per line: {"prompt": ..., "chosen": ..., "rejected": ...} with an
optional "id" and "source". Every line is checked before anything is published, so a file with a
mistake publishes nothing. A pair without an id gets one from its content, so publishing the same
file twice (within the bus's one-hour de-duplication window) does not label anything twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from pydantic import ValidationError

from .bus import PREFERENCES, JobBus, close_quietly, connect, publish
from .messages import Preference

REQUIRED = ("prompt", "chosen", "rejected")


class LabelError(ValueError):
    """Input that cannot be published; the message names the line and what to fix."""


def content_id(prompt: str, chosen: str, rejected: str) -> str:
    digest = hashlib.sha256(json.dumps([prompt, chosen, rejected]).encode()).hexdigest()
    return f"pref-{digest[:24]}"


def read_preferences(lines: Iterable[str], source_name: str = "<stdin>") -> list[Preference]:
    """Preferences from JSON Lines; every problem, with its line number, in one LabelError."""
    prefs, problems = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {n}: not JSON ({err})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {n}: expected an object with {', '.join(REQUIRED)}")
            continue
        missing = [k for k in REQUIRED if not isinstance(row.get(k), str)]
        if missing:
            problems.append(f"line {n}: {', '.join(missing)} missing or not text (keys: {sorted(row)})")
            continue
        if row["chosen"] == row["rejected"]:
            problems.append(f"line {n}: chosen and rejected are the same answer")
            continue
        try:
            prefs.append(Preference(
                id=str(row.get("id") or content_id(row["prompt"], row["chosen"], row["rejected"])),
                prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"],
                source=str(row.get("source", "human"))))
        except ValidationError as err:
            problems.append(f"line {n}: {err.errors()[0]['msg']}")
    if problems:
        raise LabelError(f"{source_name}: {len(problems)} bad line(s), nothing published:\n  "
                         + "\n  ".join(problems[:20]))
    if not prefs:
        raise LabelError(f"{source_name}: no preference pairs found")
    return prefs


async def publish_preferences(url: str, bus: JobBus, prefs: list[Preference]) -> int:
    """Publish to the job's `preferences` subject (the learner acks each after the checkpoint
    holding the head's update); fails fast when the job's stream is not on that server."""
    import nats

    try:
        nc = await connect(url, name="asyncrlhf-label")
    except (OSError, nats.errors.Error) as err:
        raise LabelError(f"cannot reach NATS at {url}: {type(err).__name__}: {err}") from None
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(bus.stream)
        except nats.js.errors.NotFoundError:
            raise LabelError(f"no stream {bus.stream} on {url}: is job {bus.namespace}/{bus.job} running "
                             "there?") from None
        for pref in prefs:
            await publish(js, bus.subject(PREFERENCES), pref.encode(), msg_id=pref.id, attempts=20)
    finally:
        await close_quietly(nc)
    return len(prefs)
