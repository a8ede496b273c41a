"""Building the backend a spec names: on every rank the same one, on rank 0 wrapped in a Leader.

Why its own module: the factory imports every backend and the distributed machinery, and the
followers' entry point (`follower_main`) needs the factory; nothing here is imported back by
those modules, so there is no import cycle.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from ..api import JobSpec
from ..models import resolve_model
from .base import TrainingBackend
from .deepspeed_backend import DeepSpeedBackend
from .distributed import follower_loop, lead, world_size_from_env
from .torch_backend import TorchBackend

log = logging.getLogger("asyncrlhf.distributed")


def make_backend(spec: JobSpec, policy_path: str, reference_path: str) -> TrainingBackend:
    """The training backend named by `spec.learner.backend`; on rank 0 of a learner of several
    processes it comes wrapped in distributed.Leader, which sends every call to the other ranks."""
    if spec.learner.backend == "deepspeed":
        return lead(DeepSpeedBackend(spec, policy_path, reference_path))
    if world_size_from_env() > 1:
        raise ValueError(f"learner.backend 'torch' trains in one process, but this learner has "
                         f"{world_size_from_env()}: set learner.backend to 'deepspeed' (or one node and one process)")
    return TorchBackend(spec, policy_path, reference_path)


def follower_main(spec: JobSpec) -> int:
    """`asyncrlhf learner` on a rank > 0: build the same backend as rank 0, then follow it."""
    policy = resolve_model(spec.model.policy)
    reference = resolve_model(spec.model.reference) if spec.model.reference else policy
    backend = make_backend(spec, policy, reference)
    done = follower_loop(backend)
    log.info("rank %d: released by rank 0 after %d commands", dist.get_rank(), done)
    return 0
