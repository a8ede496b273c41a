"""Batched sampling with a transformers causal LM: every prompt of a call in one decode loop.

Why not `model.generate`: it draws every row from one random stream, so a prompt's samples would
depend on which other prompts share its call (a fetch's size varies with timing), and its scores
are those after its own logits processors. Here each prompt has its own `torch.Generator` seeded
with the prompt's seed (the same samples whoever generates it, with whatever else), sampling is
vLLM's (temperature, then nucleus top-p; nothing else), and the log-prob of each sampled token is
read in the same pass, from the temperature-scaled logits before top-p, as vLLM's
`processed_logprobs` and the learner's `logprobs.token_logprobs` compute it.

Prompts are left-padded (new tokens line up across rows), positions count real tokens only, and
the KV cache makes each step one token per row. A row stops at EOS; the loop stops when all have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    eos_ids: tuple[int, ...]  # a row ends at any of these
    pad_id: int


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, each row's tokens at the right end."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attn[i, width - len(row):] = 1
    return ids.to(device), attn.to(device)


def nucleus(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with the tokens outside the top-p nucleus set to -inf (the most likely token always
    stays), as transformers' TopPLogitsWarper and vLLM do."""
    if top_p >= 1.0:
        return scaled
    sorted_logits, order = torch.sort(scaled, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False
    return scaled.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def draw(probs: torch.Tensor, generators: list[torch.Generator], n: int) -> torch.Tensor:
    """One token per row; rows [i*n, (i+1)*n) draw from prompt i's generator."""
    return torch.cat([torch.multinomial(probs[i * n:(i + 1) * n], 1, generator=g) for i, g in enumerate(generators)])


@torch.no_grad()
def sample(model, prompts: list[list[int]], n: int, seeds: list[int], s: Sampling):
    """`n` samples per prompt: (tokens [rows, T], log-probs [rows, T], lengths [rows], ended [rows]),
    rows prompt-major; a row's entries past its length are padding."""
    device = next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    ids, attn = left_pad([p for p in prompts for _ in range(n)], s.pad_id, device)
    rows = ids.shape[0]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True)
    next_pos = positions[:, -1:] + 1
    tokens, logps = [], []
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    for _ in range(s.max_tokens):
        scaled = out.logits[:, -1].float() / s.temperature
        token = draw(nucleus(scaled, s.top_p).softmax(-1), generators, n).squeeze(-1)
        token = torch.where(ended, torch.full_like(token, s.pad_id), token)
        tokens.append(token)
        logps.append(torch.log_softmax(scaled, -1).gather(-1, token.unsqueeze(-1)).squeeze(-1))
        lengths += (~ended).long()
        if s.eos_ids:
            ended |= torch.isin(token, torch.tensor(s.eos_ids, device=device))
        if bool(ended.all()) or len(tokens) == s.max_tokens:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)  # a finished row's pads are never read
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attn, position_ids=next_pos,
                    past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    return torch.stack(tokens, 1), torch.stack(logps, 1), lengths, ended
