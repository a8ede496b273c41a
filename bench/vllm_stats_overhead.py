"""What vLLM's own metrics cost a generator: its engine with stats on (metrics.port set, the default:
vLLM's Prometheus metrics on /metrics) vs off (metrics.port 0), side by side in one run.

    python bench/vllm_stats_overhead.py [--pairs 8] [--batch 32] [--quick]

Two VLLMEngines of the tiny built-in model live in this process, one per setting; each trial is one
`generate` call on the same batch (the local example's: 32 sort prompts, K=4, temperature 0.7,
maxTokens 8, the same seeds). Trials run in pairs, in alternating order, and the result is the
median of the pairs' time ratios (on/off): load drifting over minutes (2 cores shared) hits both
sides of a pair alike. Prints the load average too.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

from asyncrlhf.api import JobSpec  # noqa: E402
from asyncrlhf.models import encode_prompt, load_tokenizer, resolve_model  # noqa: E402
from asyncrlhf.tasks import sort_digits_prompt  # noqa: E402

K = 4


def spec(port: int, batch: int) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"policy": "builtin:tiny-sort"}, "metrics": {"port": port},
        "algorithm": {"samplesPerPrompt": K}, "learner": {"promptsPerStep": batch},
        "generator": {"engine": "vllm", "sampling": {"temperature": 0.7, "maxTokens": 8}, "kvCacheGiB": 0.25},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="Pairs of trials (one generate call each side).")
    parser.add_argument("--batch", type=int, default=32, help="Prompts per generate call.")
    parser.add_argument("--quick", action="store_true", help="3 pairs of 8 prompts (a smoke run).")
    args = parser.parse_args()
    pairs, batch = (3, 8) if args.quick else (args.pairs, args.batch)
    from asyncrlhf.engines.vllm_engine import VLLMEngine

    path = resolve_model("builtin:tiny-sort")
    tokenizer = load_tokenizer(path)
    rng = random.Random(0)
    prompts = [encode_prompt(tokenizer, sort_digits_prompt(rng).text) for _ in range(batch)]
    seeds = [zlib.crc32(f"0:0:{i}:0".encode()) for i in range(batch)]
    engines = {"off": VLLMEngine(spec(0, batch), path), "on": VLLMEngine(spec(9410, batch), path)}
    for engine in engines.values():
        engine.generate(prompts, K, seeds)  # warm-up
    ratios, times = [], {"on": [], "off": []}
    for p in range(pairs):
        pair = {}
        for name in (("on", "off") if p % 2 else ("off", "on")):
            started = time.perf_counter()
            engines[name].generate(prompts, K, seeds)
            pair[name] = time.perf_counter() - started
            times[name].append(pair[name])
        ratios.append(pair["on"] / pair["off"])
    for engine in engines.values():
        engine.close()
    print(f"load average {os.getloadavg()[0]:.1f}; {pairs} pairs of one generate call ({batch} prompts x {K})")
    print(f"median seconds per call: stats off {statistics.median(times['off']):.3f}, "
          f"on {statistics.median(times['on']):.3f}")
    print(f"stats on / off, median of the pairs' ratios: {statistics.median(ratios):.3f}x "
          f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
