"""Which job a stream, a KV bucket and a volume belong to: the AsyncRLHFJob's UID.

A job's stream, bucket and snapshot volume are named after its namespace and name (bus.JobBus,
the PVC). A job deleted and created again under the same name would find whatever the first one
left when its finalizer could not clean up (NATS away, a retained volume): the old prompts and
weights announcements, the old progress, the old checkpoints, and would resume a job that is not
its own. So the operator gives every pod the job's UID (`$ASYNCRLHF_JOB_UID`, metadata.uid) and
it is recorded where the job keeps state: the stream's metadata (`asyncrlhf.dev/job-uid`), the KV
key `job-uid`, and `<volume>/JOB_UID`. A different UID recorded means leftovers of another job:

- stream and bucket: deleted and created again (what was in them was the other job's);
- volume: everything the other job wrote is moved to `<volume>/previous/<its uid>/` (nothing is
  deleted: its checkpoints and snapshots can still be exported); the new job starts at step 0.
  Except a volume the job names itself (`weightSync.volumeClaim`, e.g. a PVC restored from a
  VolumeSnapshot to resume from, docs/operator.md): that choice is the user's, it is adopted.

No UID (`asyncrlhf run`, a workload started by hand) checks nothing, so a local run still resumes
where it stopped. A stream, bucket or volume with no UID recorded (made before UIDs were) is
adopted: the UID is recorded, nothing is moved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from .storage import atomic_write_text

log = logging.getLogger("asyncrlhf.identity")
UID_METADATA = "asyncrlhf.dev/job-uid"  # in the stream's metadata
UID_KEY = "job-uid"  # in the KV bucket
VOLUME_FILE = "JOB_UID"
PREVIOUS_DIR = "previous"
KEPT_IN_PLACE = {VOLUME_FILE, PREVIOUS_DIR, "lost+found"}


def differs(mine: str, recorded: str) -> bool:
    """Leftovers of another job: both known, not the same."""
    return bool(mine and recorded and mine != recorded)


def stream_metadata(uid: str) -> Optional[dict[str, str]]:
    return {UID_METADATA: uid} if uid else None


async def recorded_uids(js, stream: str, bucket: str) -> list[str]:
    """The UIDs recorded in the job's stream and bucket (those that exist and have one)."""
    found = []
    try:
        info = await js.stream_info(stream)
        found.append((info.config.metadata or {}).get(UID_METADATA, ""))
    except NotFoundError:
        pass
    try:
        entry = await (await js.key_value(bucket)).get(UID_KEY)
        found.append(entry.value.decode(errors="replace"))
    except (BucketNotFoundError, NotFoundError, KeyNotFoundError):
        pass
    return [uid for uid in found if uid]


async def record_uid(js, bucket: str, uid: str) -> None:
    if uid:
        await (await js.key_value(bucket)).put(UID_KEY, uid.encode())


def claim_volume(root: Path, uid: str, adopt: bool = False) -> Optional[Path]:
    """Record `uid` as the volume's job; when another job's UID is recorded (and the volume is not
    to be adopted), move what that job wrote to previous/<its uid>/ first. Returns where it went
    (None: nothing moved)."""
    if not uid:
        return None
    marker = root / VOLUME_FILE
    recorded = marker.read_text().strip() if marker.exists() else ""
    moved = None
    if differs(uid, recorded) and adopt:
        log.info("resuming from the checkpoints of job uid %s on the volume this job names", recorded)
    elif differs(uid, recorded):
        moved = root / PREVIOUS_DIR / recorded
        moved.mkdir(parents=True, exist_ok=True)
        for entry in sorted(root.iterdir()):
            if entry.name not in KEPT_IN_PLACE:
                os.replace(entry, moved / entry.name)
        log.warning("the volume held the state of another job with this name (uid %s, not this job's %s): "
                    "moved to %s; this job starts from the beginning", recorded, uid, moved)
    if recorded != uid:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, uid)
    return moved
