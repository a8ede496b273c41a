"""The one reward interface: python functions, http reward servers (a real server on 127.0.0.1),
reward models with chat templates, weighted sums, and every way a reward fails turned into one
RewardError that names the reward and the batch."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from asyncrlhf.api import JobSpec
from asyncrlhf.messages import Prompt
from asyncrlhf.reward_kinds import (
    RewardBatch, RewardConfigError, RewardError, SumReward, check_functions, job_dir_on_path, make_reward, score_batch,
)
from asyncrlhf.tasks import sort_digits_reward

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def prompt(i: int, text: str, answer: str, **columns) -> Prompt:
    return Prompt(id=f"job-p7-{i}", batch=7, index=i, text=text, answer=answer, samples=2, min_version=0,
                  columns=columns)


BATCH = RewardBatch.from_prompts(
    [prompt(0, "3 1 2 =", "1 2 3", level=1), prompt(1, "9 0 =", "0 9", level=2)],
    [["1 2 3", "3 2 1"], ["0 9", "9"]],
)


def test_a_batch_lines_up_every_column_with_the_completions():
    assert BATCH.prompts == ["3 1 2 =", "3 1 2 =", "9 0 =", "9 0 ="]
    assert BATCH.completions == ["1 2 3", "3 2 1", "0 9", "9"]
    assert BATCH.columns == {"level": [1, 1, 2, 2], "answer": ["1 2 3", "1 2 3", "0 9", "0 9"]}
    assert BATCH.where == "batch 7 (2 prompts: job-p7-0, job-p7-1; 4 completions)"
    chat = Prompt(id="c", batch=0, index=0, text="hi", samples=1, min_version=0,
                  messages=[{"role": "user", "content": "hi"}])
    assert RewardBatch.from_prompts([chat], [["yo"]]).prompts == [[{"role": "user", "content": "hi"}]]


# --- python ----------------------------------------------------------------------------------

REWARD_MODULE = '''
import asyncio

def score(prompts, completions, answer, level, **kwargs):
    return [float(c == a) + 0.1 * l for c, a, l in zip(completions, answer, level)]

async def score_async(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [len(c.split()) for c in completions]

def boom(prompts, completions, **kwargs):
    raise KeyError("no judge for this prompt")

def short(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def none(prompts, completions, **kwargs):
    return None

not_a_function = 3

import threading
release = threading.Event()

def hang(prompts, completions, **kwargs):
    release.wait(30)  # a call that does not come back (until the test lets it go)
    return [0.0] * len(completions)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards"
    sys.modules.pop("user_rewards", None)


def python_reward(function: str):
    return make_reward(JobSpec.model_validate({"task": {"reward": {"kind": "python", "function": function}}}))


def test_a_python_function_gets_prompts_completions_and_the_columns(user_module):
    reward = python_reward("user_rewards:score")
    assert reward.name == "python reward user_rewards:score"
    assert score_batch(reward, BATCH) == pytest.approx([1.1, 0.1, 1.2, 0.2])
    assert score_batch(python_reward("user_rewards:score_async"), BATCH) == [3.0, 3.0, 2.0, 1.0]


@pytest.mark.parametrize("function, message", [
    ("user_rewards:boom", "python reward user_rewards:boom raised on batch 7 (2 prompts: job-p7-0, job-p7-1; "
                          "4 completions): KeyError: 'no judge for this prompt'"),
    ("user_rewards:short", "python reward user_rewards:short returned 1 values for the 4 completions of batch 7 "
                           "(2 prompts: job-p7-0, job-p7-1; 4 completions); return one float per completion, in order"),
    ("user_rewards:nan", "python reward user_rewards:nan returned nan for completion 0 of batch 7 (2 prompts: "
                         "job-p7-0, job-p7-1; 4 completions); every value must be a finite number"),
    ("user_rewards:none", "python reward user_rewards:none returned NoneType on batch 7 (2 prompts: job-p7-0, "
                          "job-p7-1; 4 completions); return a list of 4 floats, one per completion"),
])
def test_a_failing_function_is_a_reward_error_naming_it_and_the_batch(user_module, function, message):
    with pytest.raises(RewardError) as err:
        score_batch(python_reward(function), BATCH)
    assert str(err.value) == message


def test_a_function_that_hangs_times_out_as_a_reward_error_and_the_next_batch_is_scored(user_module):
    spec = JobSpec.model_validate({"task": {"reward": {"kind": "sum", "terms": [
        {"kind": "python", "function": "user_rewards:hang", "functionTimeoutSeconds": 0.2},
        {"kind": "python", "function": "user_rewards:score_async"}]}}})
    reward = make_reward(spec)
    hung = reward.terms[0][1]
    started = time.monotonic()
    with pytest.raises(RewardError) as err:
        score_batch(reward, BATCH)
    assert 0.2 <= time.monotonic() - started < 5
    assert str(err.value) == (
        "python reward user_rewards:hang did not return within 0.2 s on batch 7 (2 prompts: job-p7-0, job-p7-1; "
        "4 completions) (spec.task.reward.terms[0].functionTimeoutSeconds; 1 calls abandoned so far): the prompts "
        "are retried; make the function faster or raise the timeout")
    sys.modules["user_rewards"].release.set()  # the abandoned call ends; a new one is not blocked by it
    assert score_batch(hung, BATCH) == [0.0] * 4 and hung.abandoned == 1


def test_the_function_timeout_defaults_to_a_minute_and_is_bounded():
    assert JobSpec().task.reward.function_timeout_seconds == 60.0
    for bad in (0, -1, 3601, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            JobSpec.model_validate({"task": {"reward": {"functionTimeoutSeconds": bad}}})


@pytest.mark.parametrize("function, match", [
    ("no_such_module:score", r"spec.task.reward.function: cannot import module 'no_such_module' .* Put it on "
                             r"PYTHONPATH, next to the job file \(asyncrlhf run\), or in task.reward.codeConfigMap"),
    ("user_rewards:missing", r"spec.task.reward.function: module 'user_rewards' \(.*user_rewards.py\) has no "
                             r"function 'missing'"),
    ("user_rewards:not_a_function", r"has no function 'not_a_function'"),
])
def test_a_function_that_cannot_be_found_is_a_spec_error(user_module, function, match):
    with pytest.raises(RewardConfigError, match=match):
        python_reward(function)


def test_the_job_files_directory_goes_first_on_the_path(tmp_path):
    env = job_dir_on_path(tmp_path / "job.yaml", {"PYTHONPATH": f"/a:{tmp_path}"})
    assert env["PYTHONPATH"] == f"{tmp_path}:/a"
    assert job_dir_on_path(tmp_path / "job.yaml", {})["PYTHONPATH"] == str(tmp_path)


def test_the_python_example_is_the_sort_digits_rule():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from sort_reward import score
    finally:
        sys.path.remove(str(EXAMPLES))
    cases = [("1 2 3", "1 2 3"), ("3 2 1", "1 2 3"), ("1 2", "1 2 3"), ("", "1 2 3"), ("0 9 9", "0 9")]
    assert score(prompts=[""] * 5, completions=[c for c, _ in cases], answer=[a for _, a in cases]) == [
        sort_digits_reward("", c, a) for c, a in cases]


# --- http ------------------------------------------------------------------------------------

class ScriptedServer:
    """A reward server on 127.0.0.1 that answers each request with the next scripted reply:
    'ok' (the example server's sort-digits reward), an HTTP status, 'slow' (longer than the
    client's timeout), 'short' (one value too few) or 'garbage' (not JSON)."""

    def __init__(self, script: list) -> None:
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((dict(self.headers), body))
                step = outer.script.pop(0) if outer.script else "ok"
                if step == "slow":
                    outer.release.wait(5)
                    step = "ok"
                if isinstance(step, int):
                    return self.reply(step, b'{"error": "scripted"}')
                if step == "garbage":
                    return self.reply(200, b"<html>oops</html>")
                rewards = [sort_digits_reward("", c, a) for c, a in zip(body["completions"], body["columns"]["answer"])]
                self.reply(200, json.dumps({"rewards": rewards[:-1] if step == "short" else rewards}).encode())

            def reply(self, status, data):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.release = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(request):
    srv = ScriptedServer(getattr(request, "param", []))
    yield srv
    srv.close()


def http_reward(url: str, **http):
    spec = {"task": {"reward": {"kind": "http", "http": {"url": url, **http}}}}
    return make_reward(JobSpec.model_validate(spec))


EXPECTED = [1.0, 1 / 3, 1.0, 0.0]  # sort-digits partial credit of BATCH's completions ('9' vs '0 9': 0/2)


@pytest.mark.parametrize("server", [[]], indirect=True)
def test_an_http_reward_posts_the_batch_with_the_token_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret")
    reward = http_reward(server.url, batchSize=3, auth={"env": "MY_REWARD_TOKEN"})
    assert score_batch(reward, BATCH) == pytest.approx(EXPECTED)
    assert len(server.requests) == 2  # batchSize 3: 3 + 1 completions
    headers, body = server.requests[0]
    assert headers["Authorization"] == "Bearer s3cret"
    assert body == {"prompts": ["3 1 2 =", "3 1 2 =", "9 0 ="], "completions": ["1 2 3", "3 2 1", "0 9"],
                    "columns": {"level": [1, 1, 2], "answer": ["1 2 3", "1 2 3", "0 9"]}}


@pytest.mark.parametrize("server", [[503, 429, "ok"]], indirect=True)
def test_an_http_reward_retries_5xx_and_429(server):
    assert score_batch(http_reward(server.url, retries=2), BATCH) == pytest.approx(EXPECTED)
    assert len(server.requests) == 3


@pytest.mark.parametrize("server, http, message", [
    ([500, 500], {"retries": 1}, "http reward {url} answered HTTP 500 on batch 7 (2 prompts: job-p7-0, job-p7-1; "
                                 '4 completions): {{"error": "scripted"}}'),
    ([400], {"retries": 3}, "http reward {url} answered HTTP 400 on batch 7 (2 prompts: job-p7-0, job-p7-1; "
                            '4 completions): {{"error": "scripted"}}'),  # a client error is not retried
    (["slow"], {"retries": 0, "timeoutSeconds": 0.3}, "http reward {url} timed out (0.3 s, 1 attempts) on batch 7 "
                                                       "(2 prompts: job-p7-0, job-p7-1; 4 completions)"),
    (["short"], {}, "http reward {url} returned 3 values for the 4 completions of batch 7 (2 prompts: job-p7-0, "
                    "job-p7-1; 4 completions); return one float per completion, in order"),
    (["garbage"], {}, "http reward {url} answered '<html>oops</html>' on batch 7 (2 prompts: job-p7-0, job-p7-1; "
                      '4 completions); expected JSON {{"rewards": [one float per completion]}}'),
], indirect=["server"])
def test_an_http_reward_that_fails_is_a_reward_error_naming_it_and_the_batch(server, http, message):
    with pytest.raises(RewardError) as err:
        score_batch(http_reward(server.url, **http), BATCH)
    assert str(err.value) == message.format(url=server.url)
    assert len(server.requests) == (2 if http.get("retries") == 1 else 1)


def test_a_server_that_is_not_there_is_a_reward_error():
    from asyncrlhf.bus import free_port

    url = f"http://127.0.0.1:{free_port()}/score"
    with pytest.raises(RewardError, match=rf"http reward {url} failed on batch 7 .* after 1 attempts: ConnectError"):
        score_batch(http_reward(url, retries=0), BATCH)


def test_the_example_server_answers_the_protocol(monkeypatch):
    """examples/reward_server.py, in a thread: the sort-digits reward, and its bearer-token check."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import reward_server
    finally:
        sys.path.remove(str(EXAMPLES))
    monkeypatch.setattr(reward_server.RewardHandler, "token", "s3cret")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), reward_server.RewardHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/score"
    try:
        with pytest.raises(RewardError, match="answered HTTP 401"):
            score_batch(http_reward(url, auth={"env": "NOT_SET_ANYWHERE"}), BATCH)
        monkeypatch.setenv("ASYNCRLHF_REWARD_TOKEN", "s3cret")
        assert score_batch(http_reward(url), BATCH) == pytest.approx(EXPECTED)
    finally:
        srv.shutdown()
        srv.server_close()


# --- sum, model ------------------------------------------------------------------------------

def test_a_sum_weights_its_terms_and_an_error_names_the_term(user_module):
    spec = {"task": {"reward": {"kind": "sum", "terms": [
        {"kind": "rule", "rule": "sort-digits", "weight": 2.0},
        {"kind": "python", "function": "user_rewards:score_async", "weight": -0.5}]}}}
    reward = make_reward(JobSpec.model_validate(spec))
    assert isinstance(reward, SumReward)
    assert reward.name == "sum of 2 x rule reward 'sort-digits', -0.5 x python reward user_rewards:score_async"
    assert score_batch(reward, BATCH) == pytest.approx([2 * r - 0.5 * n for r, n in zip(EXPECTED, [3, 3, 2, 1])])
    spec["task"]["reward"]["terms"][1]["function"] = "user_rewards:short"
    with pytest.raises(RewardError, match=r"^python reward user_rewards:short returned 1 values"):
        score_batch(make_reward(JobSpec.model_validate(spec)), BATCH)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A sequence-classification head (one output) on the tiny model, with a chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from asyncrlhf.models import load_tokenizer, resolve_model

    tiny = resolve_model("builtin:tiny-sort")
    config = AutoConfig.from_pretrained(tiny, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    tokenizer = load_tokenizer(tiny)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}</s>"
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model.eval(), tokenizer


def test_a_reward_model_scores_the_rendered_conversation_in_micro_batches(reward_model):
    import torch

    from asyncrlhf.rewards import ModelScorer

    path, model, tokenizer = reward_model
    chat = [[{"role": "user", "content": "3 1 2 ="}], [{"role": "user", "content": "9 0 ="}]]
    prompts, completions = [chat[0], chat[0], chat[1]], ["1 2 3", "3 2 1", "0 9"]
    expected = []
    with torch.no_grad():  # one at a time, no padding: the template renders "3 1 2 = 1 2 3 </s>"
        for p, c in zip(prompts, completions):
            ids = tokenizer(f"{p[0]['content']} {c} </s>", add_special_tokens=False, return_tensors="pt")
            expected.append(model(**ids).logits[0, 0].item())
    for micro in (1, 2, 16):  # padding in a micro-batch changes nothing
        scorer = ModelScorer(path, "float32", "auto", micro_batch=micro)
        assert scorer.score(prompts, completions, [""] * 3) == pytest.approx(expected, abs=1e-5)


def test_a_generator_finds_a_missing_function_before_it_loads_anything(tmp_path, user_module):
    """`asyncrlhf generator` imports the python rewards first (check_functions): exit 2 in seconds."""
    check_functions(JobSpec.model_validate({"task": {"reward": {"kind": "python", "function": "user_rewards:score"}}}))
    spec = JobSpec.model_validate({"task": {"reward": {"kind": "sum", "terms": [
        {"kind": "rule"}, {"kind": "python", "function": "nowhere_module:score"}]}}})
    with pytest.raises(RewardConfigError, match=r"^spec.task.reward.terms\[1\].function: cannot import module"):
        check_functions(spec)
