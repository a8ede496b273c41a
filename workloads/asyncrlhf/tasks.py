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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .api import PromptSource, RewardSpec

DIGITS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class PromptRecord:
    text: str  # the prompt as plain text (a chat prompt's contents joined)
    answer: str
    messages: Optional[list[dict]] = None  # the prompt as chat messages, when the record holds them
    columns: dict[str, Any] = field(default_factory=dict)  # the record's other columns (JSON values)

    @property
    def prompt(self):
        """What the chat template and reward functions get: the messages, or the text."""
        return self.messages if self.messages is not None else self.text


def prompt_messages(prompt) -> list[dict]:
    """A prompt (text, or a list of {role, content} messages) as chat messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt) -> str:
    """A prompt as plain text: itself, or its messages' contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(m.get("content", "")) for m in prompt)


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
        raise ValueError(f"spec.task.prompts: no prompts found in {describe(source)}")
    while True:
        order = list(range(len(records)))
        rng.shuffle(order)
        for i in order:
            yield records[i]


FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # spec.base.PROMPT_FILE


def describe(source: PromptSource) -> str:
    """The prompt source as errors name it: the file, or the dataset with its config and split."""
    if source.source == "file":
        return f"prompt file {source.path}"
    config = f", config {source.config!r}" if source.config else ""
    return f"dataset {source.name!r}{config}, split {source.split!r}"


def load_rows(source: PromptSource):
    """The records of a file or dataset, read by `datasets` (a `datasets.Dataset`)."""
    import datasets  # lazily: the built-in task needs none of it

    datasets.disable_progress_bars()
    if source.source == "file":
        path = Path(source.path)
        if not path.is_file():
            raise ValueError(f"spec.task.prompts.path: {path} does not exist (mount it on a volume)")
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"spec.task.prompts.path: cannot tell the format of {path} from its extension; "
                             f"use one of {sorted(FILE_FORMATS)}")
        args, kwargs = (fmt,), {"data_files": str(path), "split": "train"}
    else:
        args = (source.name, source.config or None)
        kwargs = {"split": source.split, "data_files": source.data_files or None, "revision": source.revision or None}
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # DatasetNotFoundError, a missing config or split, unreadable files, ...
        raise ValueError(f"spec.task.prompts: cannot load {describe(source)}: {type(err).__name__}: {err}") from err


def _json_value(value):
    return json.loads(json.dumps(value, default=str))  # dates, decimals, ... as text


def _as_messages(value) -> Optional[list[dict]]:
    """A conversation as the prompt: its messages up to the last non-assistant turn (an SFT
    dataset's conversations end with the reference reply, which the policy is to write itself)."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        messages = [_json_value(m) for m in value]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages or None
    return None


def records_from_rows(rows, source: PromptSource) -> list[PromptRecord]:
    """PromptRecords from a dataset's rows: the prompt (text or messages), the answer, the rest."""
    column, spec_field = ((source.messages_field, "messagesField") if source.messages_field
                          else (source.field, "field"))
    names = list(rows.column_names)
    wanted = [(column, spec_field)]
    if "answer_field" in source.model_fields_set:  # the default 'answer' may be absent: rewards need none
        wanted.append((source.answer_field, "answerField"))
    for name, spec_field_name in wanted:
        if name not in names:
            raise ValueError(f"spec.task.prompts.{spec_field_name}: {describe(source)} has no column {name!r} "
                             f"(its columns: {names}); set {spec_field_name} to the right one")
    out = []
    for n, row in enumerate(rows):
        value = row[column]
        messages = _as_messages(value)
        if messages is None and (source.messages_field or not isinstance(value, str)):
            expected = "a list of {role, content} messages" + ("" if source.messages_field else ", or text")
            raise ValueError(f"spec.task.prompts.{spec_field}: record {n} of {describe(source)}: column "
                             f"{column!r} holds {type(value).__name__} ({str(value)[:80]!r}), not {expected}")
        columns = {k: _json_value(v) for k, v in row.items() if k != column}
        answer = row.get(source.answer_field)
        out.append(PromptRecord(
            text=value if messages is None else prompt_text(messages),
            answer="" if answer is None else str(answer), messages=messages, columns=columns,
        ))
    return out


def _load_records(source: PromptSource) -> list[PromptRecord]:
    return records_from_rows(load_rows(source), source)
