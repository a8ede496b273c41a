"""A python reward for `task.reward.kind: python` (examples/python-reward.yaml).

The contract (the same as TRL's reward functions): called with keyword arguments — `prompts` (text,
or a list of {role, content} messages for chat datasets), `completions` (text), and one list per
column of the prompt's record (`answer` among them) — it returns one float per completion, in
order. A batch holds every completion of several prompts, so a costly setup (a model, a client) is
paid once per batch. `async def` works too. If it raises or returns the wrong number of values,
the batch's prompts are retried later; nothing is scored 0 behind your back.
"""


def score(prompts, completions, answer, **columns):
    """Partial credit: the fraction of positions where the completion equals the sorted digits."""
    rewards = []
    for completion, target in zip(completions, answer):
        got, want = completion.split(), target.split()
        matches = sum(a == b for a, b in zip(got, want))
        rewards.append(matches / max(len(got), len(want), 1))
    return rewards
