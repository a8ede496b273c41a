"""Token log-probs of responses under a causal LM: the one computation learner and HF engine share.

Logits are divided by the sampling temperature before the log-softmax, as the generators'
log-probs are (vLLM `processed_logprobs`), so π_θ, π_old and π_ref are all on the same scale.
Sequences are right-padded; `mask` marks response tokens.
"""

from __future__ import annotations

import torch


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-padded input ids, attention mask, and the response-token mask aligned to labels."""
    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
    # label position t predicts token t+1; response token j sits at len(prompt)+j
    resp_mask = torch.zeros((len(rows), width - 1))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        resp_mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
    return ids, attn, resp_mask


def token_logprobs(logits, ids, mask, temperature: float):
    """Log-probs of the next tokens `ids[:, 1:]` under `logits[:, :-1] / T`, zero off the mask."""
    scaled = logits[:, :-1].float() / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask


def response_logprobs(model, prompts, responses, temperature: float, pad_id: int):
    """(token log-probs [N, L-1], response mask [N, L-1]) — differentiable when grad is on."""
    ids, attn, mask = pack(prompts, responses, pad_id)
    logits = model(input_ids=ids, attention_mask=attn).logits
    return token_logprobs(logits, ids, mask, temperature), mask


@torch.no_grad()
def sequence_token_logprobs(model, prompts, responses, temperature: float, pad_id: int):
    """Per-sequence lists of the response tokens' log-probs."""
    logp, mask = response_logprobs(model, prompts, responses, temperature, pad_id)
    return [row[m.bool()].tolist() for row, m in zip(logp, mask)]

