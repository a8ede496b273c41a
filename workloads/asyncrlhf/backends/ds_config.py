"""The DeepSpeed config a spec asks for, and the micro-batch plan it is built from (pure).

Why its own module: the config is a pure function of the spec and the world size, tested without
DeepSpeed; deepspeed_backend.py is the engine around it.
"""

from __future__ import annotations

from ..api import JobSpec
from .micro import MicroPlan, micro_plan


def spec_plan(spec: JobSpec, world: int) -> MicroPlan:
    """Rank 0's plan for a full step: it has the largest share, hence the most micro-batches."""
    return micro_plan(spec.learner.prompts_per_step, spec.algorithm.samples_per_prompt,
                      spec.learner.micro_batch_size, world, rank=0)


def accumulation_steps(spec: JobSpec, world: int) -> int:
    """Micro-batches per rank and optimizer step: the same on every rank and every step."""
    return spec_plan(spec, world).steps


def ds_config(spec: JobSpec, world: int) -> dict:
    """The DeepSpeed config a spec asks for."""
    learner, opt = spec.learner, spec.learner.optimizer
    plan = spec_plan(spec, world)
    steps, rows = plan.steps, plan.rows_per_micro
    zero: dict = {"stage": learner.zero_stage}
    if learner.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": rows,
        "gradient_accumulation_steps": steps,
        "train_batch_size": rows * steps * world,
        "gradient_clipping": opt.max_grad_norm,
        # torch's AdamW: the same update as TorchBackend, and no C++/CUDA op to build
        "optimizer": {"type": "AdamW", "params": {"lr": opt.lr, "weight_decay": opt.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.model.dtype == "bfloat16"},
        "fp16": {"enabled": spec.model.dtype == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
