"""Constraints across fields of the spec, enforced by `JobSpec` and emitted as CEL rules in the CRD."""

from __future__ import annotations

from .algorithm import BEHAVIOUR_LOGPROB_LOSSES, RATIO_CLIPPED_LOSSES
from .plumbing import NATS_DEFAULT_MAX_PAYLOAD


class CrossFieldRule:
    """A constraint across fields, checked by `JobSpec` (Python) and by the apiserver (CEL).

    `check` takes a `JobSpec` and says whether the constraint holds."""

    def __init__(self, path: str, cel: str, message: str, check) -> None:
        self.path, self.cel, self.message, self.check = path, cel, message, check


# A rollout group (samplesPerPrompt completions: token ids, log-probs, text) travels as one NATS
# message, msgpack with packed arrays (messages.py): 4 bytes of token id + 8 of log-prob + the
# token's text (~4 bytes of English on average; JSON took ~31 in all). 24 leaves 12 bytes of text a
# token on average (code indentation, CJK). The message must fit nats.maxMessageBytes (the bus's
# max_payload: 1 MiB by default, the chart's NATS 8 MiB), 64 KiB of it kept for the prompt and the
# envelope: at 1 MiB, at most 40,960 tokens per group (e.g. 8 x 4096, 16 x 2048, 64 x 640); at 8 MiB,
# 346,794 (e.g. 16 x 16384, 64 x 4096).
BYTES_PER_TOKEN = 24
GROUP_ENVELOPE_BYTES = 64 << 10


def max_group_tokens(message_bytes: int) -> int:
    """The most tokens a rollout group may hold on a bus that takes `message_bytes` messages."""
    return (message_bytes - GROUP_ENVELOPE_BYTES) // BYTES_PER_TOKEN


MAX_GROUP_TOKENS = max_group_tokens(NATS_DEFAULT_MAX_PAYLOAD)  # at NATS's default max_payload
_FITS = f" * self.generator.sampling.maxTokens * {BYTES_PER_TOKEN} + {GROUP_ENVELOPE_BYTES} <= self.nats.maxMessageBytes"
_RAISE = ("or raise nats.maxMessageBytes, up to your NATS server's max_payload (the chart's NATS: 8 MiB; "
          "NATS's default, and nats.maxMessageBytes's: 1 MiB)")

_BEHAVIOUR = "[" + ", ".join(f"'{x}'" for x in BEHAVIOUR_LOGPROB_LOSSES) + "]"
_CLIPPED = "[" + ", ".join(f"'{x}'" for x in RATIO_CLIPPED_LOSSES) + "]"


def _reads_behaviour_logprobs(s) -> bool:
    """Whether the loss reads the generator's log-probs (pi_old = behaviour, or the importance weight)."""
    a = s.algorithm
    return a.loss in BEHAVIOUR_LOGPROB_LOSSES and (a.old_logprobs == "behaviour" or a.importance_cap is not None)


# The off-policy switches (algorithm.oldLogprobs, dualClip, importanceCap, valueHead) and the sampling
# they need; docs/algorithms.md § Off-policy switches.
OFF_POLICY_RULES = [
    CrossFieldRule(
        "algorithm.oldLogprobs",
        f"self.algorithm.oldLogprobs == 'behaviour' || self.algorithm.loss in {_BEHAVIOUR}",
        "oldLogprobs 'learner' recomputes pi_old, which this loss does not read: use it with "
        f"{', '.join(BEHAVIOUR_LOGPROB_LOSSES)}, or leave it 'behaviour'",
        lambda s: s.algorithm.old_logprobs == "behaviour" or s.algorithm.loss in BEHAVIOUR_LOGPROB_LOSSES,
    ),
    CrossFieldRule(
        "algorithm.dualClip",
        f"!has(self.algorithm.dualClip) || self.algorithm.loss in {_CLIPPED}",
        f"dualClip bounds a clipped ratio, which this loss does not have: use it with "
        f"{', '.join(RATIO_CLIPPED_LOSSES)}, or leave it unset",
        lambda s: s.algorithm.dual_clip is None or s.algorithm.loss in RATIO_CLIPPED_LOSSES,
    ),
    CrossFieldRule(
        "algorithm.importanceCap",
        "!has(self.algorithm.importanceCap) || self.algorithm.oldLogprobs == 'learner'",
        "importanceCap truncates pi_old / pi_behaviour, which is 1 when pi_old is the behaviour policy: "
        "set oldLogprobs 'learner', or leave importanceCap unset",
        lambda s: s.algorithm.importance_cap is None or s.algorithm.old_logprobs == "learner",
    ),
    CrossFieldRule(
        "algorithm.valueHead",
        "self.algorithm.valueHead == 'shared' || self.algorithm.loss == 'ppo'",
        "valueHead is ppo's value head and this loss has none: leave it 'shared'",
        lambda s: s.algorithm.value_head == "shared" or s.algorithm.loss == "ppo",
    ),
    CrossFieldRule(
        "generator.sampling.topP",
        f"self.generator.sampling.topP == 1.0 || !(self.algorithm.loss in {_BEHAVIOUR}) "
        "|| (self.algorithm.oldLogprobs == 'learner' && !has(self.algorithm.importanceCap))",
        "with topP < 1 the generator's log-probs are those of the truncated (renormalised) distribution, not "
        "the learner's full softmax, so ratios and KL penalties built on them are wrong: set topP 1, or "
        "algorithm.oldLogprobs 'learner' without importanceCap (pi_old recomputed by the learner), or a "
        "loss that reads no behaviour log-probs (online-dpo, tb, best-of-n-sft)",
        lambda s: s.generator.sampling.top_p == 1.0 or not _reads_behaviour_logprobs(s),
    ),
]

# The TBA searchers (generator.searchers): GeneratorSpec._check_searchers refuses these first, with the
# values in its message; these are its twins for the apiserver, worded alike. searchers has
# maxItems 16 (processes.py), which bounds the CEL cost of the pairwise name check (16 x 16).
SEARCHER_RULES = [
    CrossFieldRule(
        "generator.searchers",
        "self.generator.searchers.all(a, self.generator.searchers.exists_one(b, b.name == a.name))",
        "names must be unique",
        lambda s: len({g.name for g in s.generator.searchers}) == len(s.generator.searchers),
    ),
    CrossFieldRule(  # list.sum(): the Kubernetes CEL list library (1.24+; the chart needs 1.29, Chart.yaml)
        "generator.searchers",
        "self.generator.searchers.map(g, g.replicas).sum() <= self.generator.replicas",
        "their replicas add up to more than generator.replicas; the searchers are part "
        "of replicas, raise it to at least their sum",
        lambda s: sum(g.replicas for g in s.generator.searchers) <= s.generator.replicas,
    ),
    CrossFieldRule(
        "generator.searchers",
        "size(self.generator.searchers) == 0 || !self.generator.autoscale.enabled",
        "generator.searchers and generator.autoscale cannot be combined (the autoscaler would resize the "
        "groups' shares): remove one of them",
        lambda s: not s.generator.searchers or not s.generator.autoscale.enabled,
    ),
]

# Each rule is written twice by necessity — once in CEL for the apiserver, once in Python —
# and kept side by side so they cannot drift; tests/test_crd.py::test_cel_rules_agree_with_pydantic
# checks both agree.
CROSS_FIELD_RULES: list[CrossFieldRule] = [
    CrossFieldRule(
        "generator.sampling.maxTokens",
        "self.algorithm.samplesPerPrompt" + _FITS,
        f"a rollout group (samplesPerPrompt x maxTokens tokens, {BYTES_PER_TOKEN} bytes a token, plus 64 KiB) "
        f"must fit in one bus message of nats.maxMessageBytes ({MAX_GROUP_TOKENS} tokens at 1 MiB); lower "
        f"maxTokens or algorithm.samplesPerPrompt, " + _RAISE,
        lambda s: s.algorithm.samples_per_prompt * s.generator.sampling.max_tokens
        <= max_group_tokens(s.nats.max_message_bytes),
    ),
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
    *OFF_POLICY_RULES,
    CrossFieldRule(
        "task.prompts.path",
        "self.task.prompts.source != 'file' || self.task.prompts.path != ''",
        "prompts.source is 'file': set prompts.path to a JSONL, JSON, Parquet or CSV file on a mounted volume",
        lambda s: s.task.prompts.source != "file" or s.task.prompts.path != "",
    ),
    CrossFieldRule(
        "task.reward.model",
        "self.task.reward.kind != 'model' || self.task.reward.model != ''",
        "reward.kind is 'model': set reward.model to a reward model id or path",
        lambda s: s.task.reward.kind != "model" or s.task.reward.model != "",
    ),
    CrossFieldRule(
        "task.reward.function",
        "self.task.reward.kind != 'python' || self.task.reward.function != ''",
        "reward.kind is 'python': set reward.function to 'package.module:name' of your reward function",
        lambda s: s.task.reward.kind != "python" or s.task.reward.function != "",
    ),
    CrossFieldRule(
        "task.reward.http.url",
        "self.task.reward.kind != 'http' || self.task.reward.http.url != ''",
        "reward.kind is 'http': set reward.http.url to your reward server's endpoint",
        lambda s: s.task.reward.kind != "http" or s.task.reward.http.url != "",
    ),
    CrossFieldRule(
        "task.reward.terms",
        "self.task.reward.kind != 'sum' || size(self.task.reward.terms) > 0",
        "reward.kind is 'sum': list its terms in reward.terms (each a kind, a weight and its settings)",
        lambda s: s.task.reward.kind != "sum" or len(s.task.reward.terms) > 0,
    ),
    CrossFieldRule(
        "task.reward.terms",
        "self.task.reward.terms.all(t, (t.kind != 'python' || t.function != '') "
        "&& (t.kind != 'http' || t.http.url != '') && (t.kind != 'model' || t.model != ''))",
        "every term needs its kind's setting: function (python), http.url (http), model (model)",
        lambda s: all((t.kind != "python" or t.function) and (t.kind != "http" or t.http.url)
                      and (t.kind != "model" or t.model) for t in s.task.reward.terms),
    ),
    CrossFieldRule(
        "learner.offload",
        "self.learner.backend == 'deepspeed' || !self.learner.offload",
        "offload needs backend 'deepspeed'",
        lambda s: s.learner.backend == "deepspeed" or not s.learner.offload,
    ),
    CrossFieldRule(
        "learner.lora",
        "!self.learner.lora.enabled || self.learner.backend != 'deepspeed' || self.learner.zeroStage != 3",
        "LoRA with DeepSpeed ZeRO-3 is not supported: use learner.zeroStage 2 (or 1; the adapter's optimizer "
        "state is small, and every rank holds the frozen base in model.dtype), or learner.lora.enabled false",
        lambda s: not s.learner.lora.enabled or s.learner.backend != "deepspeed" or s.learner.zero_stage != 3,
    ),
    CrossFieldRule(
        "model.reference",
        "!self.learner.lora.enabled || self.model.reference == '' || self.model.reference == self.model.policy",
        "with learner.lora the reference is the policy's base (the adapter switched off, no second copy): leave "
        "model.reference empty",
        lambda s: not s.learner.lora.enabled or s.model.reference in ("", s.model.policy),
    ),
    CrossFieldRule(
        "learner.offloadReference",
        "!self.learner.offloadReference || self.learner.gpusPerNode > 0",
        "offloadReference moves the reference model between host and GPU: it needs learner.gpusPerNode > 0 "
        "(on CPUs the reference is in host memory already)",
        lambda s: not s.learner.offload_reference or s.learner.gpus_per_node > 0,
    ),
    CrossFieldRule(
        "weightSync.checkpointEverySteps",
        "self.weightSync.checkpointEverySteps % self.weightSync.everySteps == 0",
        "a checkpoint is written with a snapshot: set checkpointEverySteps to a multiple of everySteps "
        "(or 0 to choose it from the model's size)",
        lambda s: s.weight_sync.checkpoint_every_steps % s.weight_sync.every_steps == 0,
    ),
    CrossFieldRule(
        "task.reward.device",
        "self.task.reward.device != 'dedicated' || self.generator.resources.gpus >= 2",
        "a dedicated reward GPU is the generator's last GPU: set generator.resources.gpus to at least 2 "
        "(one for the engine, one for the reward model), or reward.device to 'generator'",
        lambda s: s.task.reward.device != "dedicated" or s.generator.resources.gpus >= 2,
    ),
    CrossFieldRule(
        "generator.tensorParallelSize",
        "self.generator.tensorParallelSize <= self.generator.resources.gpus "
        "- (self.task.reward.device == 'dedicated' ? 1 : 0)",
        "tensorParallelSize is more than the generator's GPUs (generator.resources.gpus, minus one for a "
        "dedicated reward GPU): lower it, or give the generator more GPUs",
        lambda s: s.generator.tensor_parallel_size
        <= s.generator.resources.gpus - (1 if s.task.reward.device == "dedicated" else 0),
    ),
    CrossFieldRule(
        "generator.engine",
        "self.generator.engine == 'vllm' || self.generator.resources.gpus "
        "- (self.task.reward.device == 'dedicated' ? 1 : 0) <= 1",
        "engine 'hf' generates on one GPU: give the generator 1 GPU for the engine (2 with a dedicated "
        "reward GPU), or use engine 'vllm' for tensor parallelism",
        lambda s: s.generator.engine == "vllm"
        or s.generator.resources.gpus - (1 if s.task.reward.device == "dedicated" else 0) <= 1,
    ),
    CrossFieldRule(
        "eval.everySteps",
        "self.eval.everySteps % self.weightSync.everySteps == 0",
        "evaluation samples from the step's snapshot: set eval.everySteps to a multiple of "
        "weightSync.everySteps (or 0: no evaluation)",
        lambda s: s.eval_.every_steps % s.weight_sync.every_steps == 0,
    ),
    CrossFieldRule(
        "eval.prompts",
        "self.eval.everySteps == 0 || self.task.prompts.source == 'builtin' || self.eval.prompts.source != 'builtin'",
        "evaluation needs held-out prompts of your task: set eval.prompts to its held-out split or file (for "
        "example the same dataset with split: test); only built-in tasks draw them by themselves",
        lambda s: s.eval_.every_steps == 0 or s.task.prompts.source == "builtin"
        or s.eval_.prompts.source != "builtin",
    ),
    CrossFieldRule(
        "eval.prompts.path",
        "self.eval.prompts.source != 'file' || self.eval.prompts.path != ''",
        "eval.prompts.source is 'file': set eval.prompts.path to the held-out file on a mounted volume",
        lambda s: s.eval_.prompts.source != "file" or s.eval_.prompts.path != "",
    ),
    CrossFieldRule(
        "generator.autoscale.minReplicas",
        "!self.generator.autoscale.enabled "
        "|| self.generator.autoscale.minReplicas <= self.generator.autoscale.maxReplicas",
        "autoscale.minReplicas must not be above autoscale.maxReplicas",
        lambda s: not s.generator.autoscale.enabled
        or s.generator.autoscale.min_replicas <= s.generator.autoscale.max_replicas,
    ),
    CrossFieldRule(
        "generator.replicas",
        "!self.generator.autoscale.enabled || (self.generator.replicas >= self.generator.autoscale.minReplicas "
        "&& self.generator.replicas <= self.generator.autoscale.maxReplicas)",
        "with generator.autoscale the autoscaler sets replicas: set it within minReplicas..maxReplicas (where the "
        "job starts; left out it is 1, which fits only when minReplicas is 1), and scale by changing "
        "minReplicas/maxReplicas",
        lambda s: not s.generator.autoscale.enabled
        or s.generator.autoscale.min_replicas <= s.generator.replicas <= s.generator.autoscale.max_replicas,
    ),
    CrossFieldRule(
        "async.replayBuffer.generateSamples",
        "self.async.replayBuffer.generateSamples == 0 "
        "|| self.async.replayBuffer.generateSamples >= self.algorithm.samplesPerPrompt",
        "replayBuffer.generateSamples (S, generated per prompt) must be at least algorithm.samplesPerPrompt "
        "(K, trained on per prompt), or 0 (= K)",
        lambda s: s.async_.replay_buffer.generate_samples == 0
        or s.async_.replay_buffer.generate_samples >= s.algorithm.samples_per_prompt,
    ),
    CrossFieldRule(
        "generator.sampling.maxTokens",
        "self.async.replayBuffer.generateSamples" + _FITS,
        f"a rollout group (replayBuffer.generateSamples x maxTokens tokens, {BYTES_PER_TOKEN} bytes a token, plus "
        f"64 KiB) must fit in one bus message of nats.maxMessageBytes ({MAX_GROUP_TOKENS} tokens at 1 MiB); "
        f"lower maxTokens or generateSamples, " + _RAISE,
        lambda s: s.async_.replay_buffer.generate_samples * s.generator.sampling.max_tokens
        <= max_group_tokens(s.nats.max_message_bytes),
    ),
    CrossFieldRule(
        "generator.searchers",
        "self.generator.searchers.all(s, s.syncEvery * self.weightSync.everySteps - 1 "
        "<= (self.async.mode == 'sync' ? 0 : self.async.maxStaleness))",
        "a searcher that loads every syncEvery-th snapshot answers with weights up to "
        "syncEvery x weightSync.everySteps - 1 versions old: raise async.maxStaleness to at least that "
        "(async mode), or lower syncEvery",
        lambda s: all(g.sync_every * s.weight_sync.every_steps - 1 <= s.async_.effective_staleness
                      for g in s.generator.searchers),
    ),
    *SEARCHER_RULES,
]
