"""The frontier bench's task (bench/frontier.py): the policies of two sizes, the gold rule, the proxy
reward model fitted on gold-labelled pairs, sampling, and the checkpoint evaluation on fresh samples."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

import torch

EVAL_SEED = 987_654
PROXY_SEED = 55_555
PROXY_PROMPTS = 192  # x K_PROXY samples of the reference, all pairs of different gold reward
K_PROXY = 4
PROXY_L2 = 1e-2
TEMPERATURE, MAX_TOKENS = 0.7, 8
# the second size: 4 layers x 128 wide (~8x the parameters of the built-in 2 x 64), the same SFT warm-up
SMALL = {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 512, "positions": 64,
         "sft_steps": 150, "sft_batch": 64, "sft_lr": 1e-3, "sorted_fraction": 0.2, "seed": 1234, "format": 2}


def model_path(size: str) -> str:
    from filelock import FileLock

    from asyncrlhf.models import build_tiny_sort, cache_root, resolve_model

    if size == "tiny":
        return resolve_model("builtin:tiny-sort")
    if size != "small":
        raise ValueError(f"unknown size {size!r}: tiny or small")
    key = hashlib.sha256(json.dumps(SMALL, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"frontier-small-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if not (target / "DONE").exists():
            build_tiny_sort(target, **SMALL)
    return str(target)


def sample(model, prompts: list[list[int]], k: int, seed: int) -> list[list[int]]:
    """k answers per prompt (rows p*k .. p*k+k-1), up to and including EOS, sampled from the full
    softmax at T (no top-p/top-k). One left-padded batch (attention mask, positions from it), a plain
    loop without KV cache: for these models ~5x faster than `generate` per length bucket."""
    eos, pad = model.config.eos_token_id, model.config.pad_token_id or 0
    rng = torch.Generator().manual_seed(seed)
    width = max(len(p) for p in prompts)
    rows = [p for p in prompts for _ in range(k)]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    done = torch.zeros(len(rows), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits[:, -1]
            probs = torch.softmax(logits.float() / TEMPERATURE, dim=-1)
            token = torch.where(done, pad, torch.multinomial(probs, 1, generator=rng).squeeze(-1))
            ids = torch.cat([ids, token[:, None]], dim=1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            done |= token == eos
            if bool(done.all()):
                break
    out = []
    for tokens in ids[:, width:].tolist():
        out.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    return out


def _features(ref, prompts, responses) -> torch.Tensor:
    """phi(x, y): the reference's last hidden state, averaged over the answer's tokens, and at its last one."""
    from asyncrlhf.logprobs import pack

    ids, attn, mask = pack(prompts, responses, ref.config.pad_token_id or 0)
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
    answer = torch.nn.functional.pad(mask, (1, 0))  # hidden state at position t+1 is that of answer token t
    mean = (hidden * answer[..., None]).sum(1) / answer.sum(1, keepdim=True).clamp(min=1)
    last = hidden[torch.arange(len(ids)), (answer * torch.arange(answer.shape[1])).argmax(1)]
    return torch.cat([mean, last], dim=-1)


@dataclass
class Task:
    size: str
    path: str
    tokenizer: object
    ref: object
    eval_records: list
    proxy_head: torch.Tensor  # [2H + 1] on standardised features, bias last
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    scale: tuple[float, float, float, float]  # proxy (mean, std) and gold (mean, std) on the reference's samples
    proxy_accuracy: float
    pairs: int

    @classmethod
    def build(cls, size: str) -> "Task":
        from asyncrlhf.models import load_causal_lm, load_tokenizer
        from asyncrlhf.tasks import sort_digits_prompt

        path = model_path(size)
        rng = random.Random(EVAL_SEED)
        task = cls(size, path, load_tokenizer(path), load_causal_lm(path).eval(),
                   [sort_digits_prompt(rng) for _ in range(1024)], torch.zeros(0), torch.zeros(0), torch.ones(0),
                   (0.0, 1.0, 0.0, 1.0), 0.0, 0)
        task._fit_proxy()
        return task

    def encode(self, record) -> list[int]:
        from asyncrlhf.models import encode_prompt

        return encode_prompt(self.tokenizer, record.text)

    def gold(self, record, response: list[int]) -> float:
        from asyncrlhf.tasks import sort_digits_reward

        eos = self.ref.config.eos_token_id
        text = self.tokenizer.decode([t for t in response if t != eos], skip_special_tokens=True)
        return sort_digits_reward(record.text, text, record.answer)

    def _raw_proxy(self, prompts, responses) -> torch.Tensor:
        phi = (_features(self.ref, prompts, responses) - self.feature_mean) / self.feature_std
        return phi @ self.proxy_head[:-1] + self.proxy_head[-1]

    def proxy(self, prompts, responses) -> torch.Tensor:
        """The proxy reward, on the gold's scale (the mean and spread of the reference's samples)."""
        p_mean, p_std, g_mean, g_std = self.scale
        return g_mean + g_std * (self._raw_proxy(prompts, responses) - p_mean) / p_std

    def _fit_proxy(self) -> None:
        """Bradley-Terry logistic regression on gold-labelled pairs of the reference's samples (ties
        dropped), L2-regularised, 80/20 split by prompt for a held-out pairwise accuracy."""
        from asyncrlhf.tasks import sort_digits_prompt

        rng = random.Random(PROXY_SEED)
        records = [sort_digits_prompt(rng) for _ in range(PROXY_PROMPTS)]
        prompts = [self.encode(r) for r in records]
        responses = sample(self.ref, prompts, K_PROXY, PROXY_SEED)
        rep = [p for p in prompts for _ in range(K_PROXY)]
        gold = torch.tensor([self.gold(records[i // K_PROXY], y) for i, y in enumerate(responses)])
        phi = _features(self.ref, rep, responses)
        self.feature_mean, self.feature_std = phi.mean(0), phi.std(0).clamp(min=1e-6)
        z = (phi - self.feature_mean) / self.feature_std
        split = int(0.8 * PROXY_PROMPTS) * K_PROXY
        diffs, labels, held = _pairs(z, gold, split)
        head = torch.zeros(z.shape[1] + 1, requires_grad=True)
        opt = torch.optim.LBFGS([head], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = diffs[~held] @ head[:-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[~held])
            loss = loss + PROXY_L2 * (head[:-1] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.proxy_head = head.detach()
        with torch.no_grad():
            self.proxy_accuracy = float(((diffs[held] @ self.proxy_head[:-1] > 0).float() == labels[held])
                                        .float().mean())
            raw = z @ self.proxy_head[:-1] + self.proxy_head[-1]
        self.scale = (float(raw.mean()), float(raw.std()), float(gold.mean()), float(gold.std()))
        self.pairs = int(len(labels))

    def describe(self) -> dict:
        return {"path": self.path, "parameters": sum(p.numel() for p in self.ref.parameters()),
                "proxy_pairwise_accuracy_heldout": self.proxy_accuracy, "proxy_pairs": self.pairs,
                "reference_gold_mean": self.scale[2], "reference_gold_std": self.scale[3]}


def _pairs(z: torch.Tensor, gold: torch.Tensor, split: int):
    """Every pair of a prompt's samples with different gold: feature differences, labels, held-out flags."""
    diffs, labels, held = [], [], []
    for start in range(0, len(gold), K_PROXY):
        for i in range(start, start + K_PROXY):
            for j in range(i + 1, start + K_PROXY):
                if gold[i] != gold[j]:
                    diffs.append(z[i] - z[j])
                    labels.append(float(gold[i] > gold[j]))
                    held.append(start >= split)
    return torch.stack(diffs), torch.tensor(labels), torch.tensor(held)


def rollout_batch(generator, task: Task, step: int, seed: int, prompts_per_step: int, k: int):
    """The step's batch, sampled by `generator` (a stale policy): proxy scores, behaviour log-probs."""
    from asyncrlhf.backends.base import Batch
    from asyncrlhf.logprobs import response_logprobs
    from asyncrlhf.tasks import sort_digits_prompt

    rng = random.Random(seed * 1_000_003 + step)
    records = [sort_digits_prompt(rng) for _ in range(prompts_per_step)]
    prompts = [task.encode(r) for r in records]
    responses = sample(generator, prompts, k, seed * 10_007 + step)
    rep = [p for p in prompts for _ in range(k)]
    with torch.no_grad():
        logp, mask = response_logprobs(generator, rep, responses, TEMPERATURE, generator.config.pad_token_id or 0)
    eos = generator.config.eos_token_id
    ended = torch.tensor([bool(y) and y[-1] == eos for y in responses])
    gold = [task.gold(records[i // k], y) for i, y in enumerate(responses)]
    batch = Batch(rep, responses, logp, mask, task.proxy(rep, responses), ended, k)
    return batch, sum(gold) / len(gold)


def evaluate(model, task: Task, prompts: int) -> dict:
    """Gold, proxy and KL(pi || pi_ref) on fresh samples of `model` (one per held-out prompt, fixed seeds)."""
    from asyncrlhf.logprobs import response_logprobs

    was_training = model.training
    model.eval()
    records = task.eval_records[:prompts]
    encoded = [task.encode(r) for r in records]
    responses = sample(model, encoded, 1, EVAL_SEED)
    pad = task.ref.config.pad_token_id or 0
    with torch.no_grad():
        logp, mask = response_logprobs(model, encoded, responses, TEMPERATURE, pad)
        ref_logp, _ = response_logprobs(task.ref, encoded, responses, TEMPERATURE, pad)
        proxy = task.proxy(encoded, responses)
    model.train(was_training)
    kl = ((logp - ref_logp) * mask).sum(-1)
    gold = torch.tensor([task.gold(r, y) for r, y in zip(records, responses)])
    eos = task.ref.config.eos_token_id
    n = len(records)
    return {"kl": float(kl.mean()), "kl_se": float(kl.std() / n ** 0.5), "gold": float(gold.mean()),
            "gold_se": float(gold.std() / n ** 0.5), "proxy": float(proxy.mean()),
            "eos_fraction": sum(bool(y) and y[-1] == eos for y in responses) / n}
