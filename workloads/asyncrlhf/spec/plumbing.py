"""The spec's `weightSync` and `nats` sections: the shared volume and the bus."""

from __future__ import annotations

from pydantic import Field

from .base import DNS_SUBDOMAIN_OR_EMPTY, NATS_URL, SpecModel
from .pods import QUANTITY, AccessMode

NATS_DEFAULT_MAX_PAYLOAD = 1 << 20  # nats-server's default max_payload: any NATS takes messages this large


class VolumeSnapshotSpec(SpecModel):
    """CSI VolumeSnapshots of the snapshot volume (cluster only): backups of the checkpoints."""

    enabled: bool = Field(False, description="Take VolumeSnapshots of the volume as the job trains.")
    every_steps: int = Field(
        500, ge=1, le=10_000_000,
        description="Take one each time the learner passes a multiple of this many steps.",
    )
    keep: int = Field(3, ge=1, le=100, description="VolumeSnapshots kept; older ones are deleted.")
    class_name: str = Field(
        "", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY, description="VolumeSnapshotClass; empty = the cluster's default class."
    )


class WeightSyncSpec(SpecModel):
    """Snapshots on a shared volume; checkpoints for resume are written with them."""

    every_steps: int = Field(
        1, ge=1, le=100000, description="k: publish a snapshot every k steps."
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, le=10_000_000,
        description="Write a checkpoint (optimizer state, for resume) every this many steps, a multiple "
        "of everySteps; rollouts are acked only after the checkpoint that covers them. 0 = chosen from "
        "the model's size: every snapshot while a checkpoint is small (under 1 GiB), else often enough "
        "that checkpoints add at most 15% to the average publish (docs/tuning.md).",
    )
    volume_claim: str = Field(
        "", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY, description="Existing ReadWriteMany PVC; empty = create one."
    )
    size: str = Field("20Gi", pattern=QUANTITY, description="Size of the created PVC (a quantity: 20Gi).")
    storage_class: str = Field("", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY, description="Storage class; empty = default.")
    access_mode: AccessMode = Field(
        "ReadWriteMany",
        description="Access mode of the created PVC: ReadWriteMany (pods on several nodes) or "
        "ReadWriteOnce (every pod of the job on one node).",
    )
    keep_snapshots: int = Field(
        3, ge=1, le=1000, description="Snapshots kept (plus any still in use)."
    )
    retain_volume: bool = Field(
        True,
        description="Keep the created PVC (and the VolumeSnapshots) when the job is deleted (else they "
        "are deleted with the job).",
    )
    volume_snapshots: VolumeSnapshotSpec = Field(
        default_factory=VolumeSnapshotSpec,
        description="CSI VolumeSnapshots of the volume every N steps: restore one into a PVC and name it "
        "in weightSync.volumeClaim to resume from its checkpoint.",
    )


class NatsSpec(SpecModel):
    """The bus. Empty url: the chart's NATS (cluster) or an embedded nats-server (local)."""

    url: str = Field(
        "", max_length=2048, pattern=NATS_URL,
        description="nats:// URL(s), comma-separated, without credentials; empty = default. A job that "
        "names its own bus brings its own credentialsSecret (the operator never sends it its credentials).",
    )
    credentials_secret: str = Field(
        "", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY,
        description="Secret with key 'creds' (a NATS .creds file) or 'user'/'password'. Empty on the "
        "operator's bus: the operator's Secret <job>-nats (a user JWT limited to this job's subjects, "
        "when the operator runs in JWT mode).",
    )
    tls_secret: str = Field(
        "", max_length=253, pattern=DNS_SUBDOMAIN_OR_EMPTY,
        description="Secret with key 'ca.crt' (the CA that signed the bus's server certificate) and, for "
        "mutual TLS, 'tls.crt' and 'tls.key': the pods and the operator connect with TLS and verify the "
        "server. Empty on the operator's bus: the operator's CA, when it has one.",
    )
    max_bytes: int = Field(
        1 << 30, ge=1 << 20, le=1 << 50,
        description="Stream size limit; publishers back off when full (no data is discarded).",
    )
    ack_wait_seconds: float = Field(
        60.0, ge=1, le=86400,
        description="Seconds before an unacknowledged message is redelivered (crash recovery).",
    )
    max_message_bytes: int = Field(
        NATS_DEFAULT_MAX_PAYLOAD, ge=1 << 20, le=64 << 20,
        description="The largest message the bus takes: its server's max_payload (1 MiB by default in "
        "NATS, 8 MiB in the chart's NATS, 64 MiB at most). It caps a rollout group: samplesPerPrompt x "
        "maxTokens x 24 bytes + 64 KiB must fit (40,960 tokens at 1 MiB, 346,794 at 8 MiB). The "
        "generators check the server takes it when they connect; `asyncrlhf run` starts its "
        "nats-server with it.",
    )
