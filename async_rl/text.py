"""Tokenizer loading and prompt rendering, shared by actors (sampling) and learner (eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from async_rl.config import Template


def check_model_dir(path: str) -> None:
    """One clear error for a model directory that cannot be a Hugging Face causal LM."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model.path={path}: no such directory (give a local Hugging Face model directory)"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={path}: no config.json there; is it a Hugging Face model directory?"
        )


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model.path={path}: the tokenizer has no EOS token; generation could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_prompt(tokenizer: Any, question: str, template: Template) -> list[int]:
    """Token ids of the prompt.

    * ``auto`` with a chat template: the template's text (it writes its own BOS where the model
      wants one), tokenized without adding special tokens, so BOS is never doubled;
    * otherwise (``none``, or a tokenizer without a template): the question as the tokenizer
      encodes it by default, special tokens included. A tokenizer that adds BOS (Llama, Gemma)
      gives BOS + question, as ``tokenizer(question)`` did when the model was fine-tuned.
    """
    if template is Template.AUTO and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(question)["input_ids"])


def stop_token_ids(path: str, tokenizer: Any) -> list[int]:
    """Every token id that ends a response: the EOS ids of the model's generation config (one
    or a list; Llama 3 has three) and of its config, and the tokenizer's EOS. Sorted."""
    import json

    ids = {int(tokenizer.eos_token_id)}
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"model.path={path}: {name} is not a readable JSON object ({err})") from None
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and not isinstance(item, bool):
                ids.add(item)
    return sorted(ids)


def strip_stop(token_ids: list[int], stop_ids: set[int] | frozenset[int]) -> list[int]:
    """``token_ids`` without a final stop token (the stop token is not part of the answer)."""
    return token_ids[:-1] if token_ids and token_ids[-1] in stop_ids else token_ids


def response_text(tokenizer: Any, token_ids: list[int]) -> str:
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))


def stop_string_end(tokenizer: Any, token_ids: list[int], stop_strings: tuple[str, ...]) -> int | None:
    """The length of the shortest prefix of ``token_ids`` whose text contains one of
    ``stop_strings`` (the turn ends with that token), or None if the whole text has none.
    A binary search: a longer prefix never decodes to less text, so the test is monotone."""
    if not stop_strings or not token_ids:
        return None

    def hit(n: int) -> bool:
        text = response_text(tokenizer, token_ids[:n])
        return any(stop in text for stop in stop_strings)

    if not hit(len(token_ids)):
        return None
    low, high = 1, len(token_ids)
    while low < high:
        mid = (low + high) // 2
        if hit(mid):
            high = mid
        else:
            low = mid + 1
    return low
