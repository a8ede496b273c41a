"""A minimal reward server for `task.reward.kind: http` (examples/http-reward.yaml). Standard library only.

    python examples/reward_server.py --port 8000          # then: asyncrlhf run examples/http-reward.yaml

Protocol: the generators POST a batch as JSON and expect one float per completion, in order:

    request   {"prompts": [...], "completions": [...], "columns": {"answer": [...], ...}}
    response  {"rewards": [0.5, 1.0, ...]}

`prompts[i]` is text, or a list of {role, content} messages for chat datasets; each column of the
prompt's record is a list aligned with `completions`. With REWARD_SERVER_TOKEN set, requests must
carry `Authorization: Bearer <token>` (the job sends it from task.reward.http.auth). Answer
5xx or 429 and the generator retries with backoff; anything else wrong and the batch's prompts are
retried later. Replace `score` with your own (a model, a sandbox that runs code, a judge LLM, ...).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def score(prompt, completion: str, columns: dict) -> float:
    """Partial credit for sorting digits (the built-in task): positions equal to the answer."""
    got, want = completion.split(), str(columns.get("answer", "")).split()
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1)


class RewardHandler(BaseHTTPRequestHandler):
    token = os.environ.get("REWARD_SERVER_TOKEN", "")

    def do_POST(self) -> None:
        if self.token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {self.token}"):
            return self._reply(401, {"error": "missing or wrong bearer token"})
        try:
            batch = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            prompts, completions, columns = batch["prompts"], batch["completions"], batch.get("columns", {})
            rewards = [score(p, c, {k: v[i] for k, v in columns.items()})
                       for i, (p, c) in enumerate(zip(prompts, completions))]
        except (ValueError, KeyError, TypeError, IndexError) as err:
            return self._reply(400, {"error": f"bad request: {err}"})
        self._reply(200, {"rewards": rewards})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args) -> None:  # one line per request is too much at RL rates
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), RewardHandler)
    print(f"reward server on http://{args.host}:{server.server_port}/score", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
