"""TBA's training batch: the step's new rollouts go into the replay buffer, and the step trains on
K completions per prompt drawn from it (within a prompt: from the items added since the last
sync with probability m, see replay.py). Deterministic given the random generator, which the
learner checkpoints with the buffer.
"""

from __future__ import annotations

import random

from .messages import Completion, RolloutGroup
from .replay import ReplayBuffer, ReplayItem


def store(buffer: ReplayBuffer, groups: list[RolloutGroup]) -> None:
    for g in groups:
        for c in g.completions:
            buffer.add(ReplayItem(
                prompt_id=g.prompt_text, tokens=c.token_ids, score=c.score, policy_version=g.policy_version,
                payload={"prompt_token_ids": g.prompt_token_ids, "completion": c.model_dump()},
            ))


def sample(buffer: ReplayBuffer, groups: list[RolloutGroup], step: int, k: int,
           rng: random.Random) -> list[RolloutGroup]:
    """Training groups for step `step`: each slot keeps this step's prompt with probability m,
    else takes a prompt drawn uniformly from everything stored (old prompts get replayed)."""
    m = buffer.recency_probability
    stored = buffer.prompts()
    chosen = [g.prompt_text if rng.random() < m else rng.choice(stored) for g in groups]
    drawn = buffer.sample(prompt_ids=chosen, k=k, rng=rng)
    return [
        RolloutGroup(
            id=f"replay-{step}-{i}", prompt_id=str(items[0].prompt_id), batch=step, index=i,
            prompt_text=str(items[0].prompt_id), prompt_token_ids=items[0].payload["prompt_token_ids"],
            completions=[Completion(**item.payload["completion"]) for item in items],
            policy_version=min(item.policy_version for item in items), generator_id="replay",
        )
        for i, items in enumerate(drawn)
    ]


def store_and_sample(buffer: ReplayBuffer, groups: list[RolloutGroup], step: int, k: int,
                     rng: random.Random) -> list[RolloutGroup]:
    store(buffer, groups)
    return sample(buffer, groups, step, k, rng)


def rng_state(rng: random.Random) -> list:
    """The generator's state as JSON-able data (for the checkpoint)."""
    return list(rng.getstate())


def set_rng_state(rng: random.Random, saved: list) -> None:
    version, internal, gauss = saved
    rng.setstate((version, tuple(internal), gauss))
