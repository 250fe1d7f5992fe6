"""Prompt templates for instruction records {instruction, input, ...}: Alpaca, or the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


def build_prompt(record: Mapping[str, Any], template: str = "alpaca", tokenizer: Any = None) -> str:
    """The text the model sees before its response; the response itself is never part of it."""
    instruction, input_text = record["instruction"], record.get("input", "")
    if template == "alpaca":
        if input_text.strip():
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template='chat' needs a tokenizer with a chat template; use template='alpaca' otherwise")
        content = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
