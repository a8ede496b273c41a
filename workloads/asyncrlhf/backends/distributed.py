"""A learner of several processes: rendezvous from the environment, and rank 0 leading the others.

Why rank 0 pulls and the others follow. Only rank 0 talks to NATS: it runs the ordinary `Learner`
(prompt feeding, batch assembly, snapshots, checkpoints, acks) with its backend wrapped in a
`Leader`. Every backend call (train_step with its Batch, save_weights, save_state, load_*) is first
broadcast to ranks > 0, which sit in `follower_loop()` (started by factory.follower_main, which
builds their backend) and make the same call, so all ranks run the same collective operations in
the same order. That keeps acks tied to checkpoints in one place, and the step number and policy
version cannot disagree between ranks: the followers have none of their own. Competing consumers on the bus would need a per-step agreement protocol to get both.
The rollouts of a step are small next to the model (token ids and log-probs), so sending the
whole batch to every rank costs little; each rank then trains on its own share of the groups
(see deepspeed_backend.py).

Why the Leader has no method list of its own: its methods, the ops a command may name and how
a command's fields map to a call's arguments are all derived from base.TrainingBackend, so adding
a backend call is one edit (the Protocol).

No pickle between ranks: a command is a safetensors blob (the header as JSON bytes plus the
batch's tensors) sent as a uint8 tensor over a gloo group (CPU even when training uses NCCL).

Where the rank comes from:
  * `torchrun` and `asyncrlhf run` set LOCAL_RANK; then RANK and WORLD_SIZE count processes.
  * An operator pod (one per Indexed Job completion) has no LOCAL_RANK; RANK (= the completion
    index, also JOB_COMPLETION_INDEX / NODE_RANK) and WORLD_SIZE (= NNODES) count pods, and the pod
    runs NPROC_PER_NODE processes: with more than one, `asyncrlhf learner` starts them itself
    (`run_node`), process l of pod n being rank n * NPROC_PER_NODE + l, as torchrun would.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from ..natsserver import free_port
from .base import BACKEND_METHODS, Batch, TrainingBackend

log = logging.getLogger("asyncrlhf.distributed")
DEFAULT_MASTER_PORT = 29500
# Followers wait on the command group while rank 0 waits for rollouts (minutes when generators
# start big models); a crashed peer still fails the wait at once (its socket closes).
COMMAND_TIMEOUT = timedelta(days=7)
OPS = (*BACKEND_METHODS, "stop")  # what a command may name: every backend call, and "stop"


# --- rendezvous --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendezvous:
    """This process's place in the learner group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Rendezvous":
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
        if "LOCAL_RANK" in env:  # torchrun / asyncrlhf run: counts are processes
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env["LOCAL_RANK"]),
                       int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))), addr, port)
        node, nodes, nproc = node_layout(env)
        if nproc > 1:
            raise RuntimeError(
                f"NPROC_PER_NODE={nproc} but LOCAL_RANK is not set: this process must start its node's "
                "processes first (asyncrlhf learner does it through distributed.run_node)"
            )
        return cls(node, nodes, 0, 1, addr, port)

    def env(self) -> dict[str, str]:
        """The variables torch.distributed and DeepSpeed read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def node_layout(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(node rank, nodes, processes per node) of an operator pod."""
    node = int(env.get("NODE_RANK", env.get("JOB_COMPLETION_INDEX", env.get("RANK", 0))))
    nodes = int(env.get("NNODES", env.get("WORLD_SIZE", 1)))
    return node, nodes, int(env.get("NPROC_PER_NODE", 1))


def world_size_from_env(env: Mapping[str, str] = os.environ) -> int:
    if "LOCAL_RANK" in env:
        return int(env.get("WORLD_SIZE", 1))
    _, nodes, nproc = node_layout(env)
    return nodes * nproc


def node_process_envs(env: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment of each process a pod must start (empty: this process is the only one)."""
    if "LOCAL_RANK" in env:
        return []
    node, nodes, nproc = node_layout(env)
    if nproc <= 1:
        return []
    return [
        Rendezvous(node * nproc + local, nodes * nproc, local, nproc, env.get("MASTER_ADDR", "127.0.0.1"),
                   int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))).env()
        for local in range(nproc)
    ]


def run_node(envs: list[dict[str, str]], argv: list[str]) -> int:
    """Run this pod's processes (`python -m asyncrlhf.cli <argv>` each); if one fails, stop all.

    The group lives and dies as one: a rank that is gone leaves the others blocked in a
    collective, so the pod exits with the failure and the operator restarts the whole learner.
    """
    procs = [subprocess.Popen([sys.executable, "-m", "asyncrlhf.cli", *argv], env=dict(os.environ) | e)
             for e in envs]

    def forward(signum, _frame) -> None:  # the pod is being stopped: stop the ranks the same way
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                return failed[0] if failed else 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


_COMMAND_GROUP = None


def init_process_group(cuda: Optional[bool] = None) -> Rendezvous:
    """Join the learner group described by the environment (idempotent); also the command group.

    NCCL when the learner trains on GPUs (`cuda`: learner.gpusPerNode > 0; unset = whether CUDA
    is there), gloo on CPUs; DS_ACCELERATOR is set to match before DeepSpeed is imported
    (DeepSpeed otherwise probes for accelerators and may pick the wrong one).
    """
    global _COMMAND_GROUP
    rdv = Rendezvous.from_env()
    if rdv.world_size == 1 and "MASTER_PORT" not in os.environ:
        rdv = Rendezvous(master_port=free_port())
    cuda = torch.cuda.is_available() if cuda is None else cuda
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if not dist.is_initialized():
        os.environ.update(rdv.env())
        if cuda:
            torch.cuda.set_device(rdv.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rdv.rank, world_size=rdv.world_size)
        _COMMAND_GROUP = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return Rendezvous(dist.get_rank(), dist.get_world_size(), rdv.local_rank, rdv.local_world_size,
                      rdv.master_addr, rdv.master_port)


# --- commands ----------------------------------------------------------------------------

CARRIED = ("batch", "step", "directory")  # the parameter names a Command has a field for


@dataclass
class Command:
    """One backend call, as rank 0 made it: the method's name and its arguments by kind."""

    op: str
    step: int = 0
    path: str = ""  # a `directory` argument
    batch: Optional[Batch] = None

    @classmethod
    def of_call(cls, op: str, *args, **kwargs) -> "Command":
        """The command for `backend.<op>(*args, **kwargs)`, arguments named as in TrainingBackend."""
        bound = inspect.signature(getattr(TrainingBackend, op)).bind(None, *args, **kwargs)
        values = {name: value for name, value in bound.arguments.items() if name != "self"}
        return cls(op, step=values.get("step", 0), path=str(values.get("directory", "")), batch=values.get("batch"))

    def arguments(self) -> list:
        """The call's positional arguments, in the Protocol method's order."""
        carried = {"batch": self.batch, "step": self.step, "directory": Path(self.path)}
        return [carried[name] for name in _parameters(self.op)]


def _parameters(op: str) -> list[str]:
    return list(inspect.signature(getattr(TrainingBackend, op)).parameters)[1:]


def _check_carriable() -> None:
    """Fail at import, not at the first distributed step, if the Protocol outgrew Command."""
    for op in BACKEND_METHODS:
        for name in _parameters(op):
            if name not in CARRIED:
                raise TypeError(f"TrainingBackend.{op} has a parameter {name!r} that distributed.Command cannot "
                                f"carry to the other ranks (it carries {', '.join(CARRIED)}): rename it to one of "
                                "those, or add a field for it to Command, Command.arguments and encode_command")


_check_carriable()

_BATCH_TENSORS = ("old_logprobs", "mask", "raw_scores", "eos")


def encode_command(cmd: Command) -> bytes:
    from safetensors.torch import save

    if cmd.op not in OPS:
        raise ValueError(f"unknown learner command {cmd.op!r}; known: {', '.join(OPS)}")
    header: dict = {"op": cmd.op, "step": cmd.step, "path": cmd.path}
    tensors: dict[str, torch.Tensor] = {}
    if cmd.batch is not None:
        b = cmd.batch
        header["batch"] = {"prompts": b.prompts, "responses": b.responses, "group_size": b.group_size}
        tensors = {name: getattr(b, name).detach().cpu().contiguous() for name in _BATCH_TENSORS}
    tensors["header"] = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
    return save(tensors)


def decode_command(data: bytes) -> Command:
    from safetensors.torch import load

    tensors = load(data)
    header = json.loads(bytes(tensors.pop("header").tolist()))
    batch = None
    if "batch" in header:
        b = header["batch"]
        batch = Batch(b["prompts"], b["responses"], *(tensors[name] for name in _BATCH_TENSORS), b["group_size"])
    return Command(header["op"], header["step"], header["path"], batch)


class CommandChannel:
    """Rank 0 broadcasts commands; the other ranks receive them in the same order."""

    def __init__(self, group=None) -> None:
        self.group = group if group is not None else _COMMAND_GROUP

    def send(self, cmd: Command) -> None:
        data = encode_command(cmd)
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def receive(self) -> Command:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, 0, group=self.group)
        return decode_command(data.numpy().tobytes())


def apply(backend: TrainingBackend, cmd: Command):
    """Make the backend call a command stands for (the same code on every rank)."""
    if cmd.op not in BACKEND_METHODS:
        raise ValueError(f"cannot apply learner command {cmd.op!r}; known: {', '.join(BACKEND_METHODS)}")
    return getattr(backend, cmd.op)(*cmd.arguments())


# --- leader and followers ----------------------------------------------------------------


class Leader:
    """Rank 0's backend: each call goes to the followers first, then runs here (the same interface).

    Its TrainingBackend methods are made from the Protocol below the class, one per BACKEND_METHODS.
    """

    def __init__(self, backend: TrainingBackend, channel: CommandChannel) -> None:
        self.backend, self.channel = backend, channel
        self.pad_id, self.parameter_count = backend.pad_id, backend.parameter_count
        self.vocab_size, self.max_positions = backend.vocab_size, backend.max_positions
        self.released = False

    def _call(self, cmd: Command):
        self.channel.send(cmd)
        return apply(self.backend, cmd)

    def release(self) -> None:
        """Tell the followers to exit (once)."""
        if not self.released:
            self.released = True
            self.channel.send(Command("stop"))


def _forwarding(op: str):
    def call(self: Leader, *args, **kwargs):
        return self._call(Command.of_call(op, *args, **kwargs))

    call.__name__, call.__qualname__ = op, f"Leader.{op}"
    call.__doc__ = getattr(TrainingBackend, op).__doc__
    return call


for _op in BACKEND_METHODS:
    setattr(Leader, _op, _forwarding(_op))


_LEADERS: list[Leader] = []


def lead(backend: TrainingBackend) -> TrainingBackend:
    """Rank 0 of a group: the backend wrapped in a Leader; otherwise the backend itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_rank() != 0:
        return backend
    leader = Leader(backend, CommandChannel())
    _LEADERS.append(leader)
    return leader


def release_followers() -> None:
    """Rank 0, at exit: let the followers stop cleanly (a no-op in a single process)."""
    while _LEADERS:
        try:
            _LEADERS.pop().release()
        except RuntimeError as err:  # a follower already gone: it has nothing left to do
            log.warning("could not release the followers: %s", err)


def follower_loop(backend: TrainingBackend, channel: Optional[CommandChannel] = None) -> int:
    """Ranks > 0: make rank 0's calls until it says stop. Returns the number of commands run."""
    channel = channel or CommandChannel()
    done = 0
    while True:
        cmd = channel.receive()
        if cmd.op == "stop":
            return done
        apply(backend, cmd)
        done += 1
