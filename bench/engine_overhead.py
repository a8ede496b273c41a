"""What the project costs around its engines, side by side in one run.

    python bench/engine_overhead.py [--batches 4] [--rounds 2] [--quick] [--skip-vllm]

(a) Our generator vs bare vLLM: the same prompts (the local example's: 32 sort prompts per batch,
    K=4, temperature 0.7, maxTokens 8, per-prompt seeds) through
      * `vllm.LLM.generate` alone (the engine's own `llm`, token-id prompts, one call per batch);
      * asyncrlhf's `Generator` with that same engine: prompts published on an embedded NATS,
        fetched, tokenised, generated, decoded, scored, published as rollout groups and acked.
    Tokens/s = generated tokens / wall-clock (ours: first prompt published -> last group stored; the
    Generator is constructed, connected and subscribed before the clock starts).
(b) The HF engine batched (engines/hf_sampling.py: all prompts of a call in one decode loop, log-probs
    from the same pass) vs the path it replaced (reference copy below: `model.generate` per prompt,
    then a second forward pass for the log-probs), same prompts, same K.
(a) runs pairs of one-batch trials back to back in alternating order and takes the median of the
pairs' ratios (load drifting over minutes hits both sides of a pair alike); (b) alternates rounds
and takes the best of each. Prints the load average: 2 cores shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

import torch  # noqa: E402

from asyncrlhf.api import JobSpec  # noqa: E402
from asyncrlhf.logprobs import pack, token_logprobs  # noqa: E402
from asyncrlhf.models import encode_prompt, load_tokenizer, resolve_model  # noqa: E402
from asyncrlhf.tasks import sort_digits_prompt  # noqa: E402

PER_BATCH, K = 32, 4


def job_spec(engine: str) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"policy": "builtin:tiny-sort"},
        "task": {"prompts": {"source": "builtin", "name": "sort-digits"},
                 "reward": {"kind": "rule", "rule": "sort-digits"}},
        "algorithm": {"samplesPerPrompt": K},
        "generator": {"engine": engine, "sampling": {"temperature": 0.7, "maxTokens": 8}, "kvCacheGiB": 0.25},
        "learner": {"promptsPerStep": PER_BATCH},
    })


def prompt_batches(batches: int) -> list[list]:
    rng = random.Random(0)
    return [[sort_digits_prompt(rng) for _ in range(PER_BATCH)] for _ in range(batches)]


def seeds_of(b: int) -> list[int]:
    return [zlib.crc32(f"0:{b}:{i}:0".encode()) for i in range(PER_BATCH)]


# --- (b) the HF engine before batching (reference copy of the replaced code) ---------------------

@torch.no_grad()
def hf_one_prompt_at_a_time(engine, prompts: list[list[int]], n: int, seeds: list[int]) -> int:
    """The HF engine's generate as it was: `model.generate` per prompt, then one forward pass for
    the sampled tokens' log-probs. Returns the tokens generated."""
    s, model, tokens = engine.sampling_args, engine.model, 0
    for prompt, seed in zip(prompts, seeds):
        torch.manual_seed(seed)
        ids = torch.tensor([prompt] * n)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=s.temperature,
                             top_p=s.top_p, max_new_tokens=s.max_tokens, pad_token_id=s.pad_id,
                             eos_token_id=list(s.eos_ids))
        responses = []
        for row in out:
            r = row[len(prompt):].tolist()
            responses.append(r[: r.index(s.eos_ids[0]) + 1] if s.eos_ids[0] in r else r)
        ids, attn, mask = pack([prompt] * n, responses, s.pad_id)
        logp = token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, mask, s.temperature)
        _ = [row[m.bool()].tolist() for row, m in zip(logp, mask)]
        tokens += sum(len(r) for r in responses)
    return tokens


def hf_batched(engine, prompts: list[list[int]], n: int, seeds: list[int]) -> int:
    return sum(len(s.token_ids) for group in engine.generate(prompts, n, seeds) for s in group)


def bench_hf(batches: list[list[list[int]]], rounds: int) -> dict[str, float]:
    from asyncrlhf.engines.hf import HFEngine

    engine = HFEngine(job_spec("hf"), resolve_model("builtin:tiny-sort"))
    variants = {"HF engine, batched": hf_batched, "HF engine, one prompt at a time (before)": hf_one_prompt_at_a_time}
    return best_rates(variants, lambda fn: sum(fn(engine, p, K, seeds_of(b)) for b, p in enumerate(batches)), rounds)


def best_rates(variants: dict, run, rounds: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            started = time.perf_counter()
            tokens = run(variants[name])  # tokens, or (tokens, seconds) when the variant times itself
            tokens, seconds = tokens if isinstance(tokens, tuple) else (tokens, time.perf_counter() - started)
            best[name] = max(best.get(name, 0.0), tokens / seconds)
    return best


# --- (a) our Generator vs bare vLLM ----------------------------------------------------------------

BARE, OURS = "bare vllm.LLM.generate", "asyncrlhf Generator (bus, scoring, publishing)"


def bare_vllm(engine, batches: list[list[list[int]]], first: int = 0) -> int:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokens = 0
    for b, prompts in enumerate(batches, start=first):
        params = [SamplingParams(n=K, temperature=0.7, top_p=1.0, max_tokens=8, logprobs=0, seed=s)
                  for s in seeds_of(b)]
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    return tokens


def through_generator(engine, spec: JobSpec, url: str, records: list[list], tag: str,
                      first: int = 0) -> tuple[int, float]:
    return asyncio.run(run_generator(engine, spec, url, records, tag, first))


async def run_generator(engine, spec: JobSpec, url: str, records: list[list], tag: str,
                        first: int = 0) -> tuple[int, float]:
    """A Generator with `engine`, started and subscribed first (its start-up is not throughput);
    then the clock runs from publishing the prompts (as the learner does) until every rollout
    group is stored. Returns (tokens generated, seconds)."""
    from asyncrlhf.bus import PROMPTS, JobBus, connect, delete_job_resources, ensure_job_resources, publish_all
    from asyncrlhf.generator import Generator
    from asyncrlhf.kv import JobKV
    from asyncrlhf.messages import Prompt

    bus = JobBus("bench", f"gen-{tag}")
    nc = await connect(url)
    js = nc.jetstream()
    await ensure_job_resources(js, bus, 1 << 30, 60.0)
    kv = await JobKV.open(js, bus.bucket)
    prompts = [Prompt(id=f"p{b}-{i}", batch=b, index=i, text=r.text, answer=r.answer, samples=K, min_version=0)
               for b, recs in enumerate(records, start=first) for i, r in enumerate(recs)]
    gen = Generator(spec, bus, url, "g0", engine=engine)
    task = asyncio.create_task(gen.run())
    while not await kv.reports() and not task.done():  # its first report follows its subscription
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    await publish_all(js, [(bus.subject(PROMPTS), p.encode(), p.id) for p in prompts])
    while gen.state.rollouts < len(prompts) and not task.done():
        await asyncio.sleep(0.002)
    seconds = time.perf_counter() - started
    gen.stopping.set()
    await task
    await delete_job_resources(js, bus)
    await nc.close()
    return gen.state.tokens, seconds


def bench_vllm(records: list[list], rounds: int) -> tuple[dict[str, float], float]:
    """Pairs of trials, one batch each, the two variants back to back in alternating order: the
    median of the pairs' ratios (load that drifts over minutes hits both sides of a pair alike).
    Returns (median tokens/s of each variant, median paired ratio ours / bare)."""
    from asyncrlhf.bus import EmbeddedNats
    from asyncrlhf.engines.vllm_engine import VLLMEngine

    spec = job_spec("vllm")
    path = resolve_model("builtin:tiny-sort")
    tokenizer = load_tokenizer(path)
    batches = [[encode_prompt(tokenizer, r.text) for r in recs] for recs in records]
    engine = VLLMEngine(spec, path)
    rates: dict[str, list[float]] = {BARE: [], OURS: []}
    with EmbeddedNats() as server:
        bare_vllm(engine, batches[:1])  # warm-up (first-call costs are start-up, not throughput)
        for t in range(rounds * len(batches)):
            b = t % len(batches)
            for name in ((BARE, OURS) if t % 2 == 0 else (OURS, BARE)):
                if name == BARE:
                    started = time.perf_counter()
                    tokens = bare_vllm(engine, [batches[b]], first=b)
                    seconds = time.perf_counter() - started
                else:
                    tokens, seconds = through_generator(engine, spec, server.url, [records[b]], f"t{t}", first=b)
                rates[name].append(tokens / seconds)
    engine.close()
    ratio = statistics.median(o / b for o, b in zip(rates[OURS], rates[BARE]))
    return {name: statistics.median(r) for name, r in rates.items()}, ratio


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 prompts x K=4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 batch, 1 round (HF: 8 prompts)")
    parser.add_argument("--skip-vllm", action="store_true", help="only (b), the HF engine")
    parser.add_argument("--hf-batches", type=int, default=1, help="batches for (b): the old path is slow")
    args = parser.parse_args(argv)
    n, rounds = (1, 1) if args.quick else (args.batches, args.rounds)
    records = prompt_batches(n)
    tokenizer = load_tokenizer(resolve_model("builtin:tiny-sort"))
    result: dict = {"batches": n, "prompts_per_batch": PER_BATCH, "k": K}
    rates = {}
    if not args.skip_vllm:
        vllm_rates, result["generator_vs_bare_vllm"] = bench_vllm(records, rounds)
        rates |= vllm_rates
    hf_prompts = 8 if args.quick else PER_BATCH  # the old path is slow: --quick compares on 8 prompts
    rates |= bench_hf([[encode_prompt(tokenizer, r.text) for r in recs[:hf_prompts]]
                       for recs in prompt_batches(args.hf_batches)], rounds)
    result["hf_batched_vs_before"] = rates["HF engine, batched"] / rates["HF engine, one prompt at a time (before)"]
    result["tokens_per_second"] = rates
    print(f"{n} batch(es) of {PER_BATCH} prompts x K={K} for vLLM ({rounds} round(s) of pairs, medians), "
          f"{args.hf_batches} for HF (best of {rounds}), maxTokens 8; "
          f"load average {os.getloadavg()[0]:.2f}")
    width = max(len(k) for k in rates)
    for name, rate in rates.items():
        print(f"  {name.ljust(width)}  {rate:8.0f} tokens/s")
    if "generator_vs_bare_vllm" in result:
        print(f"our Generator / bare vLLM: {result['generator_vs_bare_vllm']:.2f}x (target >= 0.9x; median of "
              "paired trials)")
    print(f"HF engine batched / before: {result['hf_batched_vs_before']:.2f}x (target >= 3x)")
    return result


if __name__ == "__main__":
    main()
