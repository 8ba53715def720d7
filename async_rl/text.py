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
    """Token ids of the prompt: the chat template when asked for and available, else the
    question verbatim (no special tokens added)."""
    if template is Template.AUTO and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(question, add_special_tokens=False)["input_ids"])


def response_text(tokenizer: Any, token_ids: list[int]) -> str:
    return str(tokenizer.decode(token_ids, skip_special_tokens=True))
