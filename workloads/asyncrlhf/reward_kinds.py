"""Rewards, one interface for every kind: a batch of (prompt, completion, record columns) -> floats.

`spec.task.reward.kind` picks one: `rule` (a verifier shipped here), `model` (a sequence-
classification reward model), `python` (your function), `http` (your reward server), `onepass`
(the head learned from preferences, rewards.py) or `sum` (a weighted sum of several). The
generator scores each batch with `score_batch`, which turns every way a reward can fail — it
raises, times out, returns the wrong number of values or a value that is not a finite number —
into a `RewardError` naming the reward and the batch; the generator then hands the batch's prompts
back to the queue (they are retried), so a failing reward never turns into a silent 0.

The python and http contracts follow TRL's reward functions: `f(prompts=[...], completions=[...],
**columns) -> list[float]`, one value per completion, where each column of the prompt's record
(`answer` among them) is a list aligned with the completions, and a prompt is its text or, for chat
datasets, its list of {role, content} messages. The http server gets the same as JSON:
POST {"prompts": [...], "completions": [...], "columns": {...}} -> {"rewards": [...]}.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .api import REWARD_CODE_DIR, HttpReward, JobSpec, RewardSource
from .messages import Prompt, RewardHead
from .tasks import prompt_text, rule_reward

log = logging.getLogger("asyncrlhf.rewards")


class RewardError(RuntimeError):
    """A reward failed on a batch; the batch's prompts go back to the queue and are retried."""


class RewardConfigError(ValueError):
    """A reward that cannot be set up (a function that does not import, ...): fix the spec."""


@dataclass(frozen=True)
class RewardBatch:
    """One value per completion is asked for; `prompts[i]` and each column's `[i]` belong to it."""

    prompts: list  # text, or a list of {role, content} messages
    completions: list[str]
    columns: dict[str, list] = field(default_factory=dict)  # `answer` and the record's other columns
    where: str = "a batch"  # how errors name the batch (its prompt ids)

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def texts(self) -> list[str]:
        return [prompt_text(p) for p in self.prompts]

    @property
    def answers(self) -> list[str]:
        return [str(a) for a in self.columns.get("answer", [""] * len(self))]

    @classmethod
    def from_prompts(cls, prompts: list[Prompt], completions: list[list[str]]) -> "RewardBatch":
        """The batch of every completion of each prompt (prompt i's completions, in order)."""
        owners = [p for p, texts in zip(prompts, completions) for _ in texts]
        keys = list(dict.fromkeys(k for p in prompts for k in p.columns))
        columns = {k: [p.columns.get(k) for p in owners] for k in keys if k != "answer"}
        columns["answer"] = [p.answer for p in owners]
        ids = [p.id for p in prompts]
        shown = ", ".join(ids) if len(ids) <= 4 else f"{ids[0]}, {ids[1]}, ..., {ids[-1]}"
        return cls(prompts=[p.messages if p.messages is not None else p.text for p in owners],
                   completions=[t for texts in completions for t in texts], columns=columns,
                   where=f"batch {prompts[0].batch} ({len(ids)} prompts: {shown}; {len(owners)} completions)")


class Reward(Protocol):
    name: str  # how errors name it: "python reward my_rewards:score"

    def __call__(self, batch: RewardBatch) -> list[float]: ...


def score_batch(reward: Reward, batch: RewardBatch) -> list[float]:
    """The reward's values for the batch, checked: a list of one finite number per completion."""
    try:
        values = reward(batch)
    except RewardError:
        raise
    except Exception as err:  # the user's code may raise anything; the batch is retried
        raise RewardError(f"{reward.name} raised on {batch.where}: {type(err).__name__}: {err}") from err
    return check_values(reward.name, batch, values)


def check_values(name: str, batch: RewardBatch, values: Any) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{name} returned {type(values).__name__} on {batch.where}; "
                          f"return a list of {len(batch)} floats, one per completion") from None
    if len(values) != len(batch):
        raise RewardError(f"{name} returned {len(values)} values for the {len(batch)} completions of "
                          f"{batch.where}; return one float per completion, in order")
    out = []
    for i, v in enumerate(values):
        try:
            number = float(v)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(v, bool) or not math.isfinite(number):
            raise RewardError(f"{name} returned {v!r} for completion {i} of {batch.where}; "
                              "every value must be a finite number")
        out.append(number)
    return out


# --- the kinds -------------------------------------------------------------------------------

class RuleReward:
    def __init__(self, source: RewardSource) -> None:
        self.rule, self.name = rule_reward(source), f"rule reward {source.rule!r}"

    def __call__(self, batch: RewardBatch) -> list[float]:
        return [self.rule(p, c, a) for p, c, a in zip(batch.texts, batch.completions, batch.answers)]


def import_function(function: str, path: str = "spec.task.reward.function") -> Callable:
    """`package.module:name`, imported from sys.path (PYTHONPATH, the job file's directory for local
    runs) and, on a cluster, the directory codeConfigMap is mounted at."""
    module_name, _, attr = function.partition(":")
    if os.path.isdir(REWARD_CODE_DIR) and REWARD_CODE_DIR not in sys.path:
        sys.path.append(REWARD_CODE_DIR)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        searched = [p or os.getcwd() for p in sys.path if not p.endswith((".zip", "lib-dynload"))][:8]
        raise RewardConfigError(
            f"{path}: cannot import module {module_name!r} ({err}); searched {searched}. Put it on PYTHONPATH, "
            "next to the job file (asyncrlhf run), or in task.reward.codeConfigMap (cluster)") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardConfigError(f"{path}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                                f"function {attr!r}")
    return fn


class PythonReward:
    """Your function: f(prompts=..., completions=..., **columns) -> list of floats (async def works too).

    Each call runs in a thread of its own, waited for `functionTimeoutSeconds`: a function that
    hangs (a lock, a network call without a timeout) becomes a RewardError and its batch is retried,
    instead of a generator that holds its prompts until its hold limit. Python cannot stop a
    thread, so the hung call is left behind (a daemon thread, counted in `abandoned`)."""

    def __init__(self, source: RewardSource, path: str = "spec.task.reward.function") -> None:
        self.fn, self.name = import_function(source.function, path), f"python reward {source.function}"
        self.timeout, self.timeout_path = source.function_timeout_seconds, f"{path.rsplit('.', 1)[0]}.functionTimeoutSeconds"
        self.abandoned = 0

    def __call__(self, batch: RewardBatch) -> list[float]:
        columns = {k: v for k, v in batch.columns.items() if k not in ("prompts", "completions")}
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                result = self.fn(prompts=batch.prompts, completions=batch.completions, **columns)
                if inspect.isawaitable(result):  # a thread of its own: no event loop there
                    result = asyncio.run(_awaited(result))
                outcome["value"] = result
            except BaseException as err:  # noqa: BLE001 -- raised again in the caller's thread
                outcome["error"] = err

        worker = threading.Thread(target=call, name=f"{self.name} call", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            self.abandoned += 1
            raise RewardError(f"{self.name} did not return within {self.timeout:g} s on {batch.where} "
                              f"({self.timeout_path}; {self.abandoned} calls abandoned so far): the prompts are "
                              "retried; make the function faster or raise the timeout")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


async def _awaited(awaitable):
    return await awaitable


class HttpRewardClient:
    """Your reward server: the batch POSTed as JSON (in chunks of batchSize), retried with
    exponential backoff on connection errors, timeouts, 429 and 5xx."""

    def __init__(self, spec: HttpReward) -> None:
        import httpx

        self.spec, self.name = spec, f"http reward {spec.url}"
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(spec.auth.env, "")
        if token:  # the credential itself is never logged
            headers[spec.auth.header] = f"{spec.auth.scheme} {token}" if spec.auth.scheme else token
        elif spec.auth.secret.name:
            log.warning("%s: %s is not set, so no %s header is sent (the Secret %r should provide it)",
                        self.name, spec.auth.env, spec.auth.header, spec.auth.secret.name)
        self.client = httpx.Client(timeout=spec.timeout_seconds, headers=headers)

    def __call__(self, batch: RewardBatch) -> list[float]:
        size = self.spec.batch_size or len(batch)
        values: list[float] = []
        for start in range(0, len(batch), size):
            end = start + size
            chunk = RewardBatch(batch.prompts[start:end], batch.completions[start:end],
                                {k: v[start:end] for k, v in batch.columns.items()}, batch.where)
            values += check_values(self.name, chunk, self._post(chunk))
        return values

    def _post(self, batch: RewardBatch) -> Any:
        import httpx
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

        body = {"prompts": batch.prompts, "completions": batch.completions, "columns": batch.columns}
        try:
            for attempt in Retrying(stop=stop_after_attempt(self.spec.retries + 1), reraise=True,
                                    wait=wait_exponential(multiplier=0.5, max=10.0) + wait_random(0, 0.5),
                                    retry=retry_if_exception(_retryable)):
                with attempt:
                    response = self.client.post(self.spec.url, json=body)
                    response.raise_for_status()
        except httpx.HTTPStatusError as err:
            raise RewardError(f"{self.name} answered HTTP {err.response.status_code} on {batch.where}: "
                              f"{err.response.text[:300]}") from err
        except httpx.TimeoutException as err:
            raise RewardError(f"{self.name} timed out ({self.spec.timeout_seconds:g} s, {self.spec.retries + 1} "
                              f"attempts) on {batch.where}") from err
        except httpx.HTTPError as err:
            raise RewardError(f"{self.name} failed on {batch.where} after {self.spec.retries + 1} attempts: "
                              f"{type(err).__name__}: {err}") from err
        try:
            return response.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            raise RewardError(f"{self.name} answered {response.text[:200]!r} on {batch.where}; "
                              'expected JSON {"rewards": [one float per completion]}') from None


def _retryable(err: BaseException) -> bool:
    import httpx

    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code == 429 or err.response.status_code >= 500
    return isinstance(err, httpx.TransportError)


class ModelReward:
    def __init__(self, source: RewardSource, spec: JobSpec) -> None:
        from .models import resolve_model
        from .rewards import ModelScorer, reward_device

        self.scorer = ModelScorer(resolve_model(source.model), spec.model.dtype, spec.model.chat_template,
                                  micro_batch=spec.task.reward.batch_size, device=reward_device(spec))
        self.name = f"reward model {source.model}"

    def __call__(self, batch: RewardBatch) -> list[float]:
        return self.scorer.score(batch.prompts, batch.completions, batch.answers)


class OnePassReward:
    """θᵀφ(prompt, completion); the generator refreshes θ from the job's KV bucket before each batch."""

    name = "one-pass reward head"

    def __init__(self, spec: JobSpec) -> None:
        from .rewards import OnePassScorer

        self.scorer = OnePassScorer(spec)

    def set_head(self, head: RewardHead) -> None:
        self.scorer.set_head(head)

    def __call__(self, batch: RewardBatch) -> list[float]:
        return self.scorer.score(batch.texts, batch.completions, batch.answers)


class SumReward:
    """Σ weight_i · reward_i, each term checked on its own (an error names the term)."""

    def __init__(self, terms: list[tuple[float, Reward]]) -> None:
        self.terms = terms
        self.name = "sum of " + ", ".join(f"{w:g} x {r.name}" for w, r in terms)

    def __call__(self, batch: RewardBatch) -> list[float]:
        total = [0.0] * len(batch)
        for weight, reward in self.terms:
            total = [t + weight * v for t, v in zip(total, score_batch(reward, batch))]
        return total


def make_source(source: RewardSource, kind: str, spec: JobSpec, path: str) -> Reward:
    if kind == "rule":
        return RuleReward(source)
    if kind == "python":
        return PythonReward(source, f"{path}.function")
    if kind == "http":
        return HttpRewardClient(source.http)
    if kind == "model":
        return ModelReward(source, spec)
    raise RewardConfigError(f"{path}.kind: {kind!r} cannot be used here")


def check_functions(spec: JobSpec) -> None:
    """Import every python reward function the spec names (RewardConfigError if one cannot be):
    a generator checks this before it loads its engine, so the mistake costs seconds, not a load."""
    reward = spec.task.reward
    terms = [(t, f"spec.task.reward.terms[{i}]") for i, t in enumerate(reward.terms)] if reward.kind == "sum" \
        else [(reward, "spec.task.reward")]
    for source, path in terms:
        if source.kind == "python":
            import_function(source.function, f"{path}.function")


def make_reward(spec: JobSpec) -> Reward:
    """The job's reward, ready to score batches."""
    reward = spec.task.reward
    if reward.kind == "onepass":
        return OnePassReward(spec)
    if reward.kind == "sum":
        return SumReward([(t.weight, make_source(t, t.kind, spec, f"spec.task.reward.terms[{i}]"))
                          for i, t in enumerate(reward.terms)])
    return make_source(reward, reward.kind, spec, "spec.task.reward")


def prompt_of(prompt: Prompt):
    """What the chat template renders: the prompt's messages, or its text."""
    return prompt.messages if prompt.messages is not None else prompt.text


def job_dir_on_path(manifest: str | Path, env: dict[str, str]) -> dict[str, str]:
    """`env` with the job file's directory first on PYTHONPATH, so `asyncrlhf run` finds a python
    reward module kept next to the job file."""
    here = str(Path(manifest).resolve().parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return env | {"PYTHONPATH": os.pathsep.join([here] + [p for p in parts if p != here])}
