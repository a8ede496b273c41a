"""How big weight sync is, pure: bytes of a snapshot and of a checkpoint, the checkpoint interval
chosen from them, and the shared volume they need. docs/tuning.md quotes these numbers.

Why a checkpoint interval of its own: a snapshot is the policy in the model's dtype (2 bytes per
parameter in bf16); a checkpoint adds the AdamW moments (8 bytes) and, when training in bf16/fp16,
the fp32 master weights (4 bytes): 6x the snapshot. Written with every snapshot, it would be most
of every publish. So checkpoints come every C snapshots, C chosen so that their amortised cost is
at most CHECKPOINT_SHARE of a snapshot's, unless a checkpoint is small enough not to matter. The
price of a longer interval: a restarted learner redoes up to C·k steps, and the rollouts of those
steps stay unacked (held, their ack deadlines extended) until the checkpoint covers them.
"""

from __future__ import annotations

import math

from .api import JobSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master weights, kept when the model's dtype is not float32
SMALL_CHECKPOINT = 1 << 30  # below this a checkpoint with every snapshot costs about a second: keep it
CHECKPOINT_SHARE = 0.15  # the most a checkpoint may add, amortised, to a publish (snapshot write)
CHECKPOINTS_ON_VOLUME = 3  # CheckpointStore keeps 2, and writes the next before dropping the oldest


def snapshot_bytes(params: int, dtype: str) -> int:
    return params * DTYPE_BYTES[dtype]


def checkpoint_bytes(params: int, dtype: str) -> int:
    """Optimizer moments, plus fp32 masters when the weights are bf16/fp16 (the policy's own
    weights are in the snapshot the checkpoint names)."""
    return params * (ADAM_MOMENT_BYTES + (MASTER_BYTES if dtype != "float32" else 0))


def auto_checkpoint_publishes(params: int, dtype: str) -> int:
    """Snapshots per checkpoint when the spec leaves it to us (checkpointEverySteps 0)."""
    ckpt = checkpoint_bytes(params, dtype)
    if ckpt <= SMALL_CHECKPOINT:
        return 1
    return math.ceil(ckpt / (CHECKPOINT_SHARE * snapshot_bytes(params, dtype)))


def checkpoint_every_steps(spec: JobSpec, params: int) -> int:
    """Steps between checkpoints: the spec's value, or chosen from the model's size (a multiple of k)."""
    sync = spec.weight_sync
    if sync.checkpoint_every_steps:
        return sync.checkpoint_every_steps
    return sync.every_steps * auto_checkpoint_publishes(params, spec.model.dtype)


def volume_bytes(spec: JobSpec, params: int) -> int:
    """Room the shared volume needs at the peak: the snapshots kept, one being written and one a
    slow generator still holds, plus CHECKPOINTS_ON_VOLUME checkpoints (each also pins a snapshot)."""
    dtype = spec.model.dtype
    snapshots = spec.weight_sync.keep_snapshots + 2 + CHECKPOINTS_ON_VOLUME
    return snapshots * snapshot_bytes(params, dtype) + CHECKPOINTS_ON_VOLUME * checkpoint_bytes(params, dtype)


def count_parameters(model) -> int:
    """The whole model's parameters; under ZeRO-3 a rank holds a partition, `ds_numel` is the whole."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())
