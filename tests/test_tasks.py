"""Prompt sources: every file format through `datasets`, column mapping, and errors that name the
dataset, the split and the missing column; chat templates as the generator applies them."""

from __future__ import annotations

import json

import pytest

from asyncrlhf.api import PromptSource
from asyncrlhf.models import ChatTemplateError, conversation_text, encode_prompt, load_tokenizer, resolve_model
from asyncrlhf.tasks import describe, load_rows, prompt_stream, records_from_rows

ROWS = [
    {"question": "3 1 2 =", "solution": "1 2 3", "level": 1},
    {"question": "9 0 =", "solution": "0 9", "level": 2},
    {"question": "5 5 4 =", "solution": "4 5 5", "level": 3},
]


def write(path, fmt: str, rows=ROWS):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def file_source(path, **fields) -> PromptSource:
    return PromptSource.model_validate({"source": "file", "path": str(path), **fields})


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_each_file_format_loads_with_its_columns(tmp_path, fmt):
    source = file_source(write(tmp_path / f"prompts.{fmt}", fmt), field="question", answerField="solution")
    records = records_from_rows(load_rows(source), source)
    assert [(r.text, r.answer, r.messages) for r in records] == [
        ("3 1 2 =", "1 2 3", None), ("9 0 =", "0 9", None), ("5 5 4 =", "4 5 5", None)]
    # every other column reaches the reward, with its type (csv types are inferred: ints stay ints)
    assert [r.columns for r in records] == [{"solution": "1 2 3", "level": 1}, {"solution": "0 9", "level": 2},
                                            {"solution": "4 5 5", "level": 3}]


def test_a_messages_column_is_the_prompt_and_its_text_is_the_contents(tmp_path):
    prompt = [{"role": "system", "content": "Sort."}, {"role": "user", "content": "3 1 2 ="}]
    # an SFT conversation: the reference reply at the end is not part of the prompt
    rows = [{"chat": prompt + [{"role": "assistant", "content": "1 2 3"}], "answer": "1 2 3"}]
    source = file_source(write(tmp_path / "chat.jsonl", "jsonl", rows), messagesField="chat")
    (record,) = records_from_rows(load_rows(source), source)
    assert record.messages == prompt and record.prompt == prompt
    assert record.text == "Sort.\n\n3 1 2 =" and record.answer == "1 2 3"
    assert record.columns == {"answer": "1 2 3"}
    # the prompt column holding messages is recognised without messagesField (TRL's conversational format)
    source = file_source(tmp_path / "chat.jsonl", field="chat")
    assert records_from_rows(load_rows(source), source)[0].messages == prompt


@pytest.mark.parametrize("fields, message", [
    ({"field": "prompt"}, "spec.task.prompts.field: prompt file {path} has no column 'prompt' "
                          "(its columns: ['question', 'solution', 'level']); set field to the right one"),
    ({"field": "question", "answerField": "gold"}, "spec.task.prompts.answerField: prompt file {path} has no "
     "column 'gold' (its columns: ['question', 'solution', 'level']); set answerField to the right one"),
    ({"messagesField": "question"}, "spec.task.prompts.messagesField: record 0 of prompt file {path}: column "
     "'question' holds str ('3 1 2 ='), not a list of {role, content} messages"),
    ({"field": "level"}, "spec.task.prompts.field: record 0 of prompt file {path}: column 'level' holds int "
     "('1'), not a list of {role, content} messages, or text"),
])
def test_errors_name_the_source_and_the_column(tmp_path, fields, message):
    path = write(tmp_path / "p.jsonl", "jsonl")
    source = file_source(path, **fields)
    with pytest.raises(ValueError) as err:
        records_from_rows(load_rows(source), source)
    assert str(err.value) == message.replace("{path}", str(path))


def test_the_default_answer_column_may_be_absent(tmp_path):
    source = file_source(write(tmp_path / "p.jsonl", "jsonl", [{"prompt": "hi"}]))
    assert records_from_rows(load_rows(source), source)[0].answer == ""


def test_a_file_that_is_not_there(tmp_path):
    with pytest.raises(ValueError) as err:
        load_rows(file_source(tmp_path / "missing.jsonl"))
    assert str(err.value) == f"spec.task.prompts.path: {tmp_path}/missing.jsonl does not exist (mount it on a volume)"


def test_a_dataset_directory_with_data_files_and_a_split(tmp_path):
    """source: dataset with a local dataset directory, its dataFiles and a sliced split."""
    write(tmp_path / "train.jsonl", "jsonl")
    write(tmp_path / "other.jsonl", "jsonl", [{"question": "x", "solution": "y", "level": 0}])
    source = PromptSource.model_validate({"source": "dataset", "name": str(tmp_path), "dataFiles": ["train.jsonl"],
                                          "split": "train[:2]", "field": "question"})
    assert [r.text for r in records_from_rows(load_rows(source), source)] == ["3 1 2 =", "9 0 ="]


def test_dataset_config_revision_and_files_reach_load_dataset(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "rows")
    source = PromptSource.model_validate({"source": "dataset", "name": "openai/gsm8k", "config": "main",
                                          "revision": "v1", "split": "test", "dataFiles": ["a.parquet"]})
    assert load_rows(source) == "rows"
    assert calls == [(("openai/gsm8k", "main"), {"split": "test", "data_files": ["a.parquet"], "revision": "v1"})]


def test_a_dataset_that_cannot_load_is_named_with_config_and_split(monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ValueError("BuilderConfig 'mian' not found. Available: ['main', 'socratic']")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    source = PromptSource.model_validate({"source": "dataset", "name": "openai/gsm8k", "config": "mian"})
    with pytest.raises(ValueError) as err:
        load_rows(source)
    assert str(err.value) == ("spec.task.prompts: cannot load dataset 'openai/gsm8k', config 'mian', split 'train': "
                              "ValueError: BuilderConfig 'mian' not found. Available: ['main', 'socratic']")
    assert describe(source) == "dataset 'openai/gsm8k', config 'mian', split 'train'"


def test_the_stream_cycles_the_file_in_a_new_order_each_epoch(tmp_path):
    stream = prompt_stream(file_source(write(tmp_path / "p.csv", "csv"), field="question"), seed=0)
    texts = [next(stream).text for _ in range(6)]
    assert sorted(texts[:3]) == sorted(texts[3:]) == sorted(r["question"] for r in ROWS)


# --- chat templates --------------------------------------------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}={% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """The built-in model's word-level tokenizer: <s>=1 </s>=2 <unk>=3 '0'..'9'=4..13 '='=14."""
    tok = load_tokenizer(resolve_model("builtin:tiny-sort"))
    tok.add_tokens(["user", "system", "assistant"])  # 15, 16, 17
    return tok


MESSAGES = [{"role": "system", "content": "9"}, {"role": "user", "content": "3 1 2"}]


@pytest.mark.parametrize("prompt, template, expected", [
    ("3 1 2 =", "auto", [1, 7, 5, 6, 14]),                       # text: BOS + text, as before
    ("3 1 2 =", "none", [1, 7, 5, 6, 14]),
    (MESSAGES, "none", [1, 13, 7, 5, 6]),                        # contents joined, no template
    ("3 1 2", TEMPLATE, [1, 15, 7, 5, 6, 14]),                   # inline: a text prompt is one user message
    (MESSAGES, TEMPLATE, [1, 16, 13, 15, 7, 5, 6, 14]),          # with the generation prompt '='
])
def test_encode_prompt_applies_the_chat_template(tokenizer, prompt, template, expected):
    assert encode_prompt(tokenizer, prompt, template) == expected


def test_auto_uses_the_tokenizers_own_template_for_messages(tokenizer):
    with pytest.raises(ChatTemplateError, match="has no chat template: give one inline"):
        encode_prompt(tokenizer, MESSAGES, "auto")
    tokenizer.chat_template = TEMPLATE
    try:
        assert encode_prompt(tokenizer, MESSAGES, "auto") == [1, 16, 13, 15, 7, 5, 6, 14]
        assert encode_prompt(tokenizer, "3 1 2 =", "auto") == [1, 7, 5, 6, 14]  # text stays plain
    finally:
        tokenizer.chat_template = None


def test_a_reward_model_renders_the_conversation_with_its_own_template(tokenizer):
    # no template anywhere: prompt + response, special tokens added by the tokenizer
    assert conversation_text(tokenizer, MESSAGES, "1 2 3", "auto") == ("9\n\n3 1 21 2 3", True)
    # the policy's inline template when the reward model has none; no generation prompt
    assert conversation_text(tokenizer, MESSAGES, "1 2 3", TEMPLATE) == (
        "<s>system 9 user 3 1 2 assistant 1 2 3 ", False)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    try:  # the reward model's own template wins
        assert conversation_text(tokenizer, MESSAGES, "1 2 3", TEMPLATE) == ("[9][3 1 2][1 2 3]", False)
    finally:
        tokenizer.chat_template = None
