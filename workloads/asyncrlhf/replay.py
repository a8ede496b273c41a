"""TBA's replay buffer: per-prompt, deduplicated, bounded, with recency-biased sampling.

Why this shape (Bartoldson et al. 2025): Trajectory Balance is valid on arbitrarily off-policy
samples, so the learner can reuse old completions; but the freshest ones carry the most
information about the current policy, hence a draw from "what arrived since the last weight
sync" with probability m, and otherwise from everything kept (uniformly or favouring high
scores). Duplicates would make a prompt's K samples collapse onto one sequence (and TB's
VarGrad log Z with them), so the buffer keeps one item per distinct token sequence.

Rules (docs/algorithms.md, "Replay buffer"):
- capacity bounds the total number of items; the oldest (by insertion) is evicted first;
- adding a token sequence already stored for that prompt replaces the stored item: the newer
  score, payload and policy version win, and the item counts as just added (recent, youngest);
- `mark_sync()` starts a new generation: "recent" = added since the last `mark_sync()`;
- `sample(k)` per training prompt: with probability m (recency_probability) the pool is the
  prompt's recent items (when it has none, all of its items), otherwise all of its items; the
  recent pool is drawn uniformly, the full pool uniformly ('uniform') or by softmax(score / τ)
  ('reward', τ = temperature); 'recency' always uses the recent pool. K items are drawn without replacement,
  or with replacement when the pool holds fewer than K;
- `state_dict()` is plain JSON-serialisable data (payloads must be JSON-serialisable too).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from asyncrlhf.api import JobSpec, ReplayBufferSpec

PromptId = Union[str, int]
Rng = Union[torch.Generator, random.Random]
SAMPLING_MODES = ("uniform", "reward", "recency")
STATE_VERSION = 1
# Item fields that replay state written by earlier builds holds (always null: nothing ever set
# them); dropped on load, so that such a checkpoint still resumes.
_RETIRED_ITEM_FIELDS = ("old_logprobs", "ref_logprobs")


@dataclass
class ReplayItem:
    """One completion. `generation` and `seq` are set by the buffer."""

    prompt_id: PromptId
    tokens: tuple[int, ...]
    score: float
    policy_version: int
    payload: Any = None  # opaque to the buffer; JSON-serialisable so that state_dict stays pickle-free
    generation: int = field(default=0)
    seq: int = field(default=0)

    def __post_init__(self) -> None:
        self.tokens = tuple(int(t) for t in self.tokens)


def replay_enabled(spec: "ReplayBufferSpec", loss: str) -> bool:
    """`enabled` unset means: only for Trajectory Balance (the loss that is valid off-policy)."""
    return spec.enabled if spec.enabled is not None else loss == "tb"


def generated_samples(spec: "JobSpec") -> int:
    """Completions generated per prompt: S (`replayBuffer.generateSamples`) when the buffer is on
    and S is set, else K (`algorithm.samplesPerPrompt`). The buffer keeps all S; each step trains
    on K per prompt drawn by the buffer's rule (TBA: S = 24, K = 20 on GSM8k)."""
    buffer, k = spec.async_.replay_buffer, spec.algorithm.samples_per_prompt
    return buffer.generate_samples or k if replay_enabled(buffer, spec.algorithm.loss) else k


class ReplayBuffer:
    def __init__(self, capacity: int, recency_probability: float, sampling: str = "uniform",
                 temperature: float = 1.0) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        if not 0.0 <= recency_probability <= 1.0:
            raise ValueError(f"recency_probability must be in [0, 1], got {recency_probability}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"replay sampling {sampling!r} is not one of {SAMPLING_MODES}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"replay temperature must be a positive number, got {temperature}")
        self.temperature = temperature
        self.capacity, self.recency_probability, self.sampling = capacity, recency_probability, sampling
        self.generation = 0
        self._next_seq = 0
        self._by_prompt: dict[PromptId, dict[tuple[int, ...], ReplayItem]] = {}
        self._age: OrderedDict[tuple[PromptId, tuple[int, ...]], ReplayItem] = OrderedDict()

    @classmethod
    def from_spec(cls, spec: "ReplayBufferSpec") -> "ReplayBuffer":
        return cls(spec.capacity, spec.recency_probability, spec.sampling, spec.temperature)

    def __len__(self) -> int:
        return len(self._age)

    def prompts(self) -> list[PromptId]:
        return list(self._by_prompt)

    def items(self, prompt_id: PromptId) -> list[ReplayItem]:
        return list(self._by_prompt.get(prompt_id, {}).values())

    def recent(self, prompt_id: PromptId) -> list[ReplayItem]:
        return [i for i in self.items(prompt_id) if i.generation == self.generation]

    # -- writing ------------------------------------------------------------------------------

    def add(self, item: ReplayItem) -> bool:
        """Store `item` (a copy is not made); True when its token sequence was new for the prompt."""
        key = (item.prompt_id, item.tokens)
        is_new = key not in self._age
        if not is_new:
            self._remove(key)
        item.generation, item.seq = self.generation, self._next_seq
        self._next_seq += 1
        self._by_prompt.setdefault(item.prompt_id, {})[item.tokens] = item
        self._age[key] = item
        while len(self._age) > self.capacity:
            self._remove(next(iter(self._age)))
        return is_new

    def extend(self, items: Sequence[ReplayItem]) -> int:
        """Add many; returns how many were new."""
        return sum(self.add(item) for item in items)

    def mark_sync(self) -> None:
        """Start a new generation: items added from now on are the recent ones."""
        self.generation += 1

    def _remove(self, key: tuple[PromptId, tuple[int, ...]]) -> None:
        prompt_id, tokens = key
        del self._age[key]
        per_prompt = self._by_prompt[prompt_id]
        del per_prompt[tokens]
        if not per_prompt:
            del self._by_prompt[prompt_id]

    # -- sampling -----------------------------------------------------------------------------

    def sample(
        self,
        prompt_ids: Optional[Sequence[PromptId]] = None,
        n_prompts: Optional[int] = None,
        k: int = 1,
        rng: Optional[Rng] = None,
    ) -> list[list[ReplayItem]]:
        """K items for each of `prompt_ids`, or for `n_prompts` prompts picked uniformly without replacement."""
        draw = _Draw.of(rng)
        if prompt_ids is None:
            if n_prompts is None:
                raise ValueError("sample() needs prompt_ids or n_prompts")
            stored = self.prompts()
            if n_prompts > len(stored):
                raise ValueError(f"asked for {n_prompts} prompts but the buffer holds {len(stored)}")
            prompt_ids = [stored[i] for i in draw.indices([1.0] * len(stored), n_prompts)]
        return [self._sample_prompt(pid, k, draw) for pid in prompt_ids]

    def _sample_prompt(self, prompt_id: PromptId, k: int, draw: "_Draw") -> list[ReplayItem]:
        everything = self.items(prompt_id)
        if not everything:
            raise KeyError(f"prompt {prompt_id!r} has no items in the replay buffer")
        use_recent = self.sampling == "recency" or draw.uniform() < self.recency_probability
        pool = self.recent(prompt_id) if use_recent else []
        if pool:
            weights = [1.0] * len(pool)
        else:
            pool = everything
            weights = self._full_pool_weights(pool)
        return [pool[i] for i in draw.indices(weights, k)]

    def _full_pool_weights(self, pool: list[ReplayItem]) -> list[float]:
        if self.sampling != "reward":
            return [1.0] * len(pool)
        return _softmax([i.score / self.temperature for i in pool])

    def probabilities(self, prompt_id: PromptId) -> dict[tuple[int, ...], float]:
        """The probability that one draw (k = 1) for `prompt_id` picks each of its items, by tokens:
        m/|recent| for a recent item plus (1 − m) × (1/|all| or softmax(score/τ)) — the rule
        `sample` implements, in closed form (for tests and for reading a buffer's behaviour)."""
        everything, recent = self.items(prompt_id), self.recent(prompt_id)
        m = 1.0 if self.sampling == "recency" else self.recency_probability
        if not recent:
            m = 0.0  # an empty recent pool falls back to the whole pool
        full = self._full_pool_weights(everything) if self.sampling != "recency" or not recent else []
        total = sum(full)
        out = {i.tokens: (1 - m) * w / total for i, w in zip(everything, full)} if full else {}
        for i in recent:
            out[i.tokens] = out.get(i.tokens, 0.0) + m / len(recent)
        return out

    # -- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable contents (prompt order and insertion order included)."""
        return {
            "version": STATE_VERSION,
            "generation": self.generation,
            "next_seq": self._next_seq,
            "prompts": [
                {"prompt_id": pid, "items": [_item_state(i) for i in per_prompt.values()]}
                for pid, per_prompt in self._by_prompt.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"replay state version {state.get('version')!r} is not {STATE_VERSION}: "
                "it was written by another asyncrlhf version"
            )
        self.generation, self._next_seq = int(state["generation"]), int(state["next_seq"])
        self._by_prompt, self._age = {}, OrderedDict()
        every: list[ReplayItem] = []
        for entry in state["prompts"]:
            items = [_item_from_state(fields) for fields in entry["items"]]
            self._by_prompt[entry["prompt_id"]] = {i.tokens: i for i in items}
            every.extend(items)
        for item in sorted(every, key=lambda i: i.seq):
            self._age[(item.prompt_id, item.tokens)] = item
        while len(self._age) > self.capacity:  # a smaller capacity after a restart
            self._remove(next(iter(self._age)))


def _item_state(item: ReplayItem) -> dict[str, Any]:
    state = asdict(item)
    state["tokens"] = list(item.tokens)
    return state


def _item_from_state(fields: dict[str, Any]) -> ReplayItem:
    return ReplayItem(**{k: v for k, v in fields.items() if k not in _RETIRED_ITEM_FIELDS})


def _softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    # a floor keeps far-below-the-best items drawable without replacement (exp underflows past ~745)
    return [max(e / total, 1e-300) for e in exps]


class _Draw:
    """The two random operations sampling needs, on a torch.Generator or a random.Random."""

    def __init__(self, rng: Rng) -> None:
        self.rng = rng

    @classmethod
    def of(cls, rng: Optional[Rng]) -> "_Draw":
        return cls(rng if rng is not None else random.Random())

    def uniform(self) -> float:
        if isinstance(self.rng, torch.Generator):
            return torch.rand((), generator=self.rng, dtype=torch.float64).item()
        return self.rng.random()

    def indices(self, weights: list[float], k: int) -> list[int]:
        """k indices ~ weights; without replacement unless there are fewer than k."""
        replace = len(weights) < k
        if isinstance(self.rng, torch.Generator):
            w = torch.tensor(weights, dtype=torch.float64)
            return torch.multinomial(w, k, replacement=replace, generator=self.rng).tolist()
        if replace:
            return self.rng.choices(range(len(weights)), weights=weights, k=k)
        chosen: list[int] = []
        remaining = list(range(len(weights)))
        for _ in range(k):  # sequential weighted draws, like torch.multinomial(replacement=False)
            pick = self.rng.choices(range(len(remaining)), weights=[weights[i] for i in remaining])[0]
            chosen.append(remaining.pop(pick))
        return chosen
