"""Training backends: the interface the learner trains through, and its implementations.

Module map (each imports only those before it; nothing imports this `__init__` back):
  base              TrainingBackend (the Protocol), BACKEND_METHODS, Batch, to_batch
  micro             micro_plan: which rows each micro-batch holds, on each rank
  optim_state       optimizer state as safetensors + JSON (both backends' checkpoint files)
  torch_backend     TorchBackend: one process, and the step every backend shares
  distributed       rendezvous, the command channel, Leader (rank 0) and follower_loop (ranks > 0)
  deepspeed_backend DeepSpeedBackend: TorchBackend's step on a rank's share, under ZeRO
  factory           make_backend (the spec's backend, led on rank 0) and follower_main
"""

from .base import Batch, TrainingBackend, to_batch
from .distributed import Rendezvous, node_process_envs, release_followers, run_node
from .factory import follower_main, make_backend

__all__ = ["Batch", "Rendezvous", "TrainingBackend", "follower_main", "make_backend", "node_process_envs",
           "release_followers", "run_node", "to_batch"]
