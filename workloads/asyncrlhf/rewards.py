"""Model-based scorers: reward models and the one-pass online reward head.

Every scorer scores a batch: `score(prompts, responses, answers) -> list[float]`; reward_kinds.py
wraps them (and the rule, python, http and sum rewards) behind the one interface the generator uses.

The one-pass head (Li et al. 2025; onepass.py) is linear over frozen features φ(x, a): the last
layer's hidden state at the last token of prompt+answer, L2-normalised (the head's λ and bound
assume unit-scale features). It is learned where preferences arrive — the learner process, the
one process per job — from the job's `preferences` subject, O(d²) per label; θ (d numbers) is put
into the job's KV bucket after each batch of labels and generators score with the latest θ.
Preference messages are acked only after the checkpoint holding the head's state is written,
like rollouts, so a learner restart loses no label.
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np
import torch

from .api import JobSpec
from .logprobs import pack
from .messages import Preference, RewardHead
from .models import conversation_text, encode_prompt, load_tokenizer, resolve_model
from .onepass import OnePassRewardHead


class Scorer(Protocol):
    def score(self, prompts: list[str], responses: list[str], answers: list[str]) -> list[float]: ...


class ModelScorer:
    """A sequence-classification reward model (hub id or path) with one output: its logit is the
    score. Prompt + response are rendered as a conversation with the reward model's own chat
    template (models.conversation_text), scored `micro_batch` at a time."""

    def __init__(self, path: str, dtype: str, chat_template: str = "auto", micro_batch: int = 16,
                 device: Optional[str] = None) -> None:
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype)
        ).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"spec.task.reward.model: {path} has {self.model.config.num_labels} outputs; a reward "
                             "model has one (a sequence-classification head with num_labels=1)")
        if self.tokenizer.pad_token is None:  # Llama-style tokenizers: pad with EOS, attention masks it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or default_device()
        self.model.to(self.device)
        self.chat_template, self.micro_batch = chat_template, micro_batch

    @torch.no_grad()
    def score(self, prompts, responses, answers) -> list[float]:
        """`prompts[i]` is text or a list of chat messages."""
        rendered = [conversation_text(self.tokenizer, p, r, self.chat_template) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(rendered), self.micro_batch):
            chunk = rendered[start:start + self.micro_batch]
            special = chunk[0][1]  # the same for a whole job: template or not
            batch = self.tokenizer([text for text, _ in chunk], return_tensors="pt", padding=True,
                                   truncation=True, add_special_tokens=special)
            scores += self.model(**batch.to(self.device)).logits[:, 0].float().tolist()
        return scores


def default_device() -> str:
    """Where a scoring model runs unless told: this process's first GPU (a generator sees only its
    own GPUs: placement.py), else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def reward_device(spec: JobSpec) -> str:
    """A generator's reward/feature-model device: its first GPU, or its last with reward.device 'dedicated'."""
    from .placement import generator_devices

    return generator_devices(spec, torch.cuda.device_count())[1]


class FeatureModel:
    """φ(x, a): a frozen causal LM's last hidden state at the last token, L2-normalised, computed
    `micro_batch` sequences at a time on `device`."""

    def __init__(self, path: str, dtype: str = "float32", device: Optional[str] = None, micro_batch: int = 16) -> None:
        from .models import load_causal_lm

        self.tokenizer = load_tokenizer(path)
        self.device = device or default_device()
        self.model = load_causal_lm(path, dtype).eval().requires_grad_(False).to(self.device)
        self.dim = self.model.config.hidden_size
        self.pad_id = self.model.config.pad_token_id or 0
        self.micro_batch = micro_batch

    @torch.no_grad()
    def features(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        p_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        r_ids = [self.tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
        parts = []
        for start in range(0, len(p_ids), self.micro_batch):
            rows = slice(start, start + self.micro_batch)
            ids, attn, _ = (t.to(self.device) for t in pack(p_ids[rows], r_ids[rows], self.pad_id))
            hidden = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
            last = hidden[torch.arange(len(ids), device=ids.device), attn.sum(1) - 1].double()
            parts.append(torch.nn.functional.normalize(last, dim=-1).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, self.dim))


def feature_model_path(spec: JobSpec) -> str:
    return resolve_model(spec.task.reward.onepass.feature_model or spec.model.policy)


class OnePassScorer:
    """Scores with θᵀφ(x, a), θ refreshed from the KV bucket by the generator before each batch."""

    def __init__(self, spec: JobSpec) -> None:
        self.features = FeatureModel(feature_model_path(spec), spec.model.dtype, reward_device(spec),
                                     spec.task.reward.batch_size)
        self.theta = np.zeros(self.features.dim)
        self.updates = 0

    def set_head(self, head: RewardHead) -> None:
        self.theta, self.updates = np.asarray(head.theta), head.updates

    def score(self, prompts, responses, answers) -> list[float]:
        return (self.features.features(prompts, responses) @ self.theta).tolist()


def _learner_device(spec: JobSpec) -> str:
    """The learner process learns the head on its own training device."""
    import os

    from .placement import learner_device

    return learner_device(spec.learner.gpus_per_node, int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())


class HeadLearner:
    """The learning side of the one-pass head: preferences in, θ out."""

    def __init__(self, spec: JobSpec, features: Optional[FeatureModel] = None) -> None:
        self.features = features or FeatureModel(feature_model_path(spec), spec.model.dtype, _learner_device(spec),
                                                 spec.task.reward.batch_size)
        self.head = OnePassRewardHead.from_spec(spec.task.reward.onepass, self.features.dim)
        self.bonus = spec.task.reward.onepass.exploration_bonus  # ν of DeploymentAdapter

    def learn(self, prefs: list[Preference]) -> None:
        if not prefs:
            return
        chosen = self.features.features([p.prompt for p in prefs], [p.chosen for p in prefs])
        rejected = self.features.features([p.prompt for p in prefs], [p.rejected for p in prefs])
        for z in chosen - rejected:
            self.head.update(z, 1.0)

    def head_message(self) -> RewardHead:
        return RewardHead(theta=self.head.theta.tolist(), updates=self.head.updates)


class DeploymentAdapter:
    """Deployment-time adaptation (Li et al. 2025): serve the head's best answer a plus an
    optimistic second one, argmax θ·φ(a′) + ν ‖φ(a′) − φ(a)‖_{H⁻¹} (`OnePassRewardHead.deployment_pair`,
    ν = onepass.explorationBonus), and learn from which of the two the user preferred."""

    def __init__(self, learner: HeadLearner, bonus: Optional[float] = None) -> None:
        self.learner, self.bonus = learner, learner.bonus if bonus is None else bonus

    def choose(self, prompt: str, candidates: list[str]) -> tuple[int, int]:
        if len(candidates) < 2:
            raise ValueError("deployment-time adaptation needs at least two candidate answers")
        phi = self.learner.features.features([prompt] * len(candidates), candidates)
        return self.learner.head.deployment_pair(phi, self.bonus)

    def feedback(self, prompt: str, preferred: str, other: str) -> Preference:
        pref = Preference(id=f"pref-{self.learner.head.updates}", prompt=prompt, chosen=preferred,
                          rejected=other, source="deployment")
        self.learner.learn([pref])
        return pref
