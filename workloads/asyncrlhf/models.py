"""Model resolution: hub ids and paths load as they are; `builtin:tiny-sort` is built locally.

Nothing is downloaded for the built-in model: a word-level tokenizer is trained with the
`tokenizers` library, a 2-layer Llama is initialised from a seed and given a short SFT warm-up
on the sort-digits task (a mixture of sorted and shuffled answers). The build is deterministic
and cached under a directory keyed by its settings, behind a file lock, so the learner and the
generators of one machine share one copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from filelock import FileLock

from .api import BUILTIN_MODEL_PREFIX
from .tasks import prompt_messages, prompt_text, sort_digits_prompt

TINY_SORT = "tiny-sort"
_TINY_SETTINGS = {
    "hidden": 64, "layers": 2, "heads": 2, "intermediate": 256, "positions": 64,
    "sft_steps": 150, "sft_batch": 64, "sft_lr": 3e-3, "sorted_fraction": 0.2, "seed": 1234,
    "format": 2,
}
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def cache_root() -> Path:
    return Path(os.environ.get("ASYNCRLHF_CACHE", Path.home() / ".cache" / "asyncrlhf"))


class ModelNotFoundError(ValueError):
    """A model named by a local path that is not there (a restart cannot help)."""


def resolve_model(name: str) -> str:
    """A path or hub id that transformers and vLLM can load; builds built-in models on demand.
    A local path (absolute, or starting with . or ~) that does not exist is refused at once
    (transformers would take it for a hub id and fail later, less clearly)."""
    if not name.startswith(BUILTIN_MODEL_PREFIX):
        if name.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(name)):
            raise ModelNotFoundError(f"model {name!r}: no such directory on this machine (on a cluster: is the "
                                     "volume that holds it mounted, e.g. through spec.model.cache or a podTemplate?)")
        return os.path.expanduser(name)
    which = name[len(BUILTIN_MODEL_PREFIX):]
    if which != TINY_SORT:
        raise ValueError(
            f"spec.model.policy: unknown built-in model {name!r}; the built-in model is "
            f"'{BUILTIN_MODEL_PREFIX}{TINY_SORT}' (or name a hub id or a path)"
        )
    key = hashlib.sha256(json.dumps(_TINY_SETTINGS, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{TINY_SORT}-{key}"
    if not (target / "DONE").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # one process builds; the others (learner and generators start together) wait, then reuse
        with FileLock(target.parent / f".{target.name}.lock"):
            if not (target / "DONE").exists():
                build_tiny_sort(target, **_TINY_SETTINGS)
    return str(target)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [str(d) for d in range(10)] + ["="])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_sort(target: Path, *, hidden, layers, heads, intermediate, positions,
                    sft_steps, sft_batch, sft_lr, sorted_fraction, seed, format) -> None:
    """Build, warm up and save the tiny policy into `target` atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=positions, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=sft_lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions: identical weights on every machine
    try:
        for _ in range(sft_steps):
            ids, labels = _sft_batch(tokenizer, rng, sft_batch, sorted_fraction, sort_digits_prompt)
            loss = model(input_ids=ids, labels=labels).loss
            optim.zero_grad()
            loss.backward()
            optim.step()
    finally:
        torch.set_num_threads(threads)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "DONE").write_text("ok\n")
    os.replace(tmp, target)


def _sft_batch(tokenizer, rng, size, sorted_fraction, make_prompt):
    import torch

    rows, labels = [], []
    for _ in range(size):
        rec = make_prompt(rng)
        digits = rec.text.split()[:-1]
        answer = sorted(digits) if rng.random() < sorted_fraction else rng.sample(digits, len(digits))
        prompt = [BOS_ID] + tokenizer.convert_tokens_to_ids(rec.text.split())
        response = tokenizer.convert_tokens_to_ids(answer) + [EOS_ID]
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, lab


# --- chat templates ---------------------------------------------------------------------------
# A prompt is text, or a list of chat messages ({"role": ..., "content": ...}). spec.model.chatTemplate
# says how it becomes tokens: "auto" (the tokenizer's template for messages, BOS + text for text),
# "none" (never a template) or an inline Jinja template (for every prompt). Generators encode with
# it and the learner trains on the tokens they send, so both see the same ids by construction.

AUTO_TEMPLATE, NO_TEMPLATE = "auto", "none"


class ChatTemplateError(ValueError):
    """A prompt that cannot be rendered with the chat template the spec asks for."""


def _template_for(tokenizer, prompt, chat_template: str):
    """The Jinja template to render `prompt` with, or None for plain text."""
    if chat_template == NO_TEMPLATE or (chat_template == AUTO_TEMPLATE and isinstance(prompt, str)):
        return None
    if chat_template != AUTO_TEMPLATE:
        return chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"spec.model.chatTemplate is 'auto' and the prompt is a list of chat messages, but tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: give one inline in "
            "spec.model.chatTemplate, or set it to 'none' (the messages' contents joined as plain text)"
        )
    return tokenizer.chat_template


def render_chat(tokenizer, messages: list[dict], template: str, generation_prompt: bool) -> str:
    """Messages rendered by a chat template (transformers renders it in a Jinja sandbox)."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's errors, or a template raising on unexpected roles
        raise ChatTemplateError(f"spec.model.chatTemplate: rendering the prompt failed: {err}") from err


def encode_prompt(tokenizer, prompt, chat_template: str = NO_TEMPLATE) -> list[int]:
    """Prompt token ids as the engines generate from and the learner trains on: the chat template
    with the generation prompt (the template writes its own special tokens), or BOS + text."""
    template = _template_for(tokenizer, prompt, chat_template)
    if template is not None:
        rendered = render_chat(tokenizer, prompt_messages(prompt), template, generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt_text(prompt), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def conversation_text(tokenizer, prompt, response: str, chat_template: str) -> tuple[str, bool]:
    """(text, add_special_tokens) a reward model scores: the conversation rendered with the reward
    model's own template when it has one (else the policy's inline template), or prompt + response."""
    if chat_template == NO_TEMPLATE or (chat_template == AUTO_TEMPLATE and isinstance(prompt, str)):
        return prompt_text(prompt) + response, True
    template = getattr(tokenizer, "chat_template", None) or (
        chat_template if chat_template != AUTO_TEMPLATE else None)
    if template is None:  # messages, but neither the reward model nor the spec has a template
        return prompt_text(prompt) + response, True
    messages = prompt_messages(prompt) + [{"role": "assistant", "content": response}]
    return render_chat(tokenizer, messages, template, generation_prompt=False), False


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
