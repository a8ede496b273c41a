"""Prompt sources and reward functions.

The built-in task `sort-digits` lets the whole system be exercised on a laptop CPU: the prompt
is a few digits, the right answer is the same digits sorted ascending. The reward is partial
credit per position, so a policy that copies the digits in some order scores about 1/L and a
sorting policy scores 1. The tiny model (models.py) is warmed up by SFT on a mixture of sorted
and shuffled answers, so RL has a clear, quick job: shift probability to the sorted answers —
the same "sharpening" RLHF does on a real SFT model.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .api import PromptSource, RewardSpec

DIGITS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class PromptRecord:
    text: str
    answer: str


# --- the built-in task -----------------------------------------------------------------------

def sort_digits_prompt(rng: random.Random, min_len: int = 3, max_len: int = 5) -> PromptRecord:
    digits = [rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len))]
    return PromptRecord(text=" ".join(digits) + " =", answer=" ".join(sorted(digits)))


def sort_digits_reward(prompt: str, response: str, answer: str) -> float:
    """Fraction of positions equal to the sorted answer; extra or missing tokens count as wrong."""
    target = answer.split()
    got = response.split()
    if not target:
        return 0.0
    matches = sum(1 for a, b in zip(got, target) if a == b)
    return matches / max(len(got), len(target))


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def gsm8k_reward(prompt: str, response: str, answer: str) -> float:
    """1 if the last number in the response equals the reference (after '####' if present)."""
    ref = answer.split("####")[-1].strip().replace(",", "")
    numbers = _NUMBER.findall(response.replace(",", ""))
    if not numbers or not ref:
        return 0.0
    try:
        return float(float(numbers[-1].rstrip(".")) == float(ref))
    except ValueError:
        return 0.0


RULES: dict[str, Callable[[str, str, str], float]] = {
    "sort-digits": sort_digits_reward,
    "gsm8k": gsm8k_reward,
}
BUILTIN_TASKS: dict[str, Callable[[random.Random], PromptRecord]] = {
    "sort-digits": sort_digits_prompt,
}


def rule_reward(spec: RewardSpec) -> Callable[[str, str, str], float]:
    try:
        return RULES[spec.rule]
    except KeyError:
        raise ValueError(
            f"spec.task.reward.rule: unknown verifier {spec.rule!r}; choose one of {sorted(RULES)}"
        ) from None


# --- prompt streams ------------------------------------------------------------------------

def prompt_stream(source: PromptSource, seed: int) -> Iterator[PromptRecord]:
    """An endless, deterministic stream of prompts (datasets are cycled, reshuffled each epoch)."""
    rng = random.Random(seed)
    if source.source == "builtin":
        if source.name not in BUILTIN_TASKS:
            raise ValueError(
                f"spec.task.prompts.name: unknown built-in task {source.name!r}; "
                f"choose one of {sorted(BUILTIN_TASKS)}"
            )
        make = BUILTIN_TASKS[source.name]
        while True:
            yield make(rng)
    records = _load_records(source)
    if not records:
        raise ValueError(f"spec.task.prompts: no prompts found in {source.path or source.name}")
    while True:
        order = list(range(len(records)))
        rng.shuffle(order)
        for i in order:
            yield records[i]


def _load_records(source: PromptSource) -> list[PromptRecord]:
    if source.source == "file":
        path = Path(source.path)
        if not path.exists():
            raise ValueError(f"spec.task.prompts.path: {path} does not exist (mount it on a volume)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:  # a hub dataset; loaded lazily so the CPU path does not need `datasets`
        from datasets import load_dataset  # type: ignore[import-not-found]

        rows = list(load_dataset(source.name, split=source.split))
    out = []
    for n, row in enumerate(rows):
        if source.field not in row:
            raise ValueError(
                f"spec.task.prompts.field: record {n} has no field {source.field!r} "
                f"(fields: {sorted(row)})"
            )
        out.append(PromptRecord(text=str(row[source.field]), answer=str(row.get(source.answer_field, ""))))
    return out
