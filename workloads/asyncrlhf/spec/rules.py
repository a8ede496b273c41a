"""Constraints across fields of the spec, enforced by `JobSpec` and emitted as CEL rules in the CRD."""

from __future__ import annotations


class CrossFieldRule:
    """A constraint across fields, checked by `JobSpec` (Python) and by the apiserver (CEL).

    `check` takes a `JobSpec` and says whether the constraint holds."""

    def __init__(self, path: str, cel: str, message: str, check) -> None:
        self.path, self.cel, self.message, self.check = path, cel, message, check


# Each rule is written twice by necessity — once in CEL for the apiserver, once in Python —
# and kept side by side so they cannot drift; tests/test_crd.py::test_cel_rules_agree_with_pydantic
# checks both agree.
CROSS_FIELD_RULES: list[CrossFieldRule] = [
    CrossFieldRule(
        "async.maxStaleness",
        "self.async.mode == 'sync' ? self.weightSync.everySteps == 1 "
        ": self.async.maxStaleness >= self.weightSync.everySteps - 1",
        "the staleness bound N must be at least weightSync.everySteps - 1 (a snapshot every k "
        "steps cannot keep rollouts within fewer than k-1 versions); sync mode needs everySteps 1",
        lambda s: (s.weight_sync.every_steps == 1) if s.async_.mode == "sync"
        else s.async_.max_staleness >= s.weight_sync.every_steps - 1,
    ),
    CrossFieldRule(
        "algorithm.samplesPerPrompt",
        "!(self.algorithm.loss in ['online-dpo', 'rloo', 'proximal-rloo', 'grpo', 'tb']) "
        "|| self.algorithm.samplesPerPrompt >= 2",
        "this loss compares completions of the same prompt: set samplesPerPrompt to 2 or more",
        lambda s: s.algorithm.loss not in ("online-dpo", "rloo", "proximal-rloo", "grpo", "tb")
        or s.algorithm.samples_per_prompt >= 2,
    ),
    CrossFieldRule(
        "task.prompts.path",
        "self.task.prompts.source != 'file' || self.task.prompts.path != ''",
        "prompts.source is 'file': set prompts.path to a JSONL file on a mounted volume",
        lambda s: s.task.prompts.source != "file" or s.task.prompts.path != "",
    ),
    CrossFieldRule(
        "task.reward.model",
        "self.task.reward.kind != 'model' || self.task.reward.model != ''",
        "reward.kind is 'model': set reward.model to a reward model id or path",
        lambda s: s.task.reward.kind != "model" or s.task.reward.model != "",
    ),
    CrossFieldRule(
        "learner.offload",
        "self.learner.backend == 'deepspeed' || !self.learner.offload",
        "offload needs backend 'deepspeed'",
        lambda s: s.learner.backend == "deepspeed" or not s.learner.offload,
    ),
]
