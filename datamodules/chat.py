"""Multi-turn chat fine-tuning: records {"messages": [{"role": ..., "content": ...}, ...]} rendered with the
tokenizer's own chat template, the loss on every assistant turn and on nothing else.

How labels are placed. For each assistant turn i, the template renders the conversation up to turn i with the
generation prompt (`add_generation_prompt=True`) and up to and including turn i; what the second adds to the first is
what the model must write for that turn. Of it, the labelled part runs from its start through the assistant content
and through the template's first special token after the content (the end-of-turn token, e.g. SmolLM2's
`<|im_end|>`, Llama 3's `<|eot_id|>`); what the template writes after that (SmolLM2's newline) and everything before
the turn (system, user, the assistant header) is context only (-100). The pieces are tokenized separately and
concatenated, so no token straddles a prompt/response boundary, and the prompt tokens are exactly what generation
sees. A template that renders an earlier turn differently depending on what follows cannot be labelled this way and
is refused with the record named.

Sources: .json (a list of records), .jsonl, .parquet, a hub dataset name; "alpaca:<file>": two-to-three-turn
conversations built from an Alpaca file (`alpaca_conversations`: the turns are real Alpaca instruction/response pairs,
their grouping into conversations is ours); "bundled": the same from the 500 Alpaca records shipped in the package.
`python -m datamodules.chat --from-alpaca IN.json --output OUT.jsonl` writes such a set as a file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.instruction import (
    BUNDLED_ALPACA,
    HELDOUT,
    IGNORE_INDEX,
    INSTRUCTION_FIELDS,
    InstructionDataModule,
    collate_for_generation,
    fit_to_length,
    load_tokenizer,
    read_records,
    split_heldout,
)

ROLES = ("system", "user", "assistant")
BUNDLED = "bundled"
ALPACA_PREFIX = "alpaca:"  # "alpaca:<file>": conversations built from an Alpaca file
GENERATION = "heldout_generation"
#: How `CausalLMModule` scores the generation loader's answers (whitespace- and case-normalised equality).
SCORING = "exact_match"
CONTEXT = -1
WHERE = "_where"  # key added to each record: "file: record N (0-based)", for errors found while rendering


# ---------------------------------------------------------------------------------------------- records


def messages_field(value: Any) -> list[dict[str, Any]]:
    """Field converter for `messages`: a non-empty list of {role, content} with string content, roles system / user /
    assistant (system first only), and at least one assistant turn; anything else is bad data."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError("the conversation is empty")
    for position, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {position}: expected an object with 'role' and 'content', got "
                             f"{type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {position}: missing field {key!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {position}, field 'role': unknown role {role!r}; expected one of "
                             f"{', '.join(ROLES)}")
        if role == "system" and position != 0:
            raise ValueError(f"message {position}, field 'role': a system message may only come first")
        if not isinstance(content, str):
            raise ValueError(f"message {position}, field 'content': expected a string, got {type(content).__name__} "
                             f"{content!r:.60}")
    if not any(message["role"] == "assistant" for message in value):
        raise ValueError("no assistant turn: nothing to train on")
    opening = next(position for position, message in enumerate(value) if message["role"] != "system")
    if value[opening]["role"] == "assistant":  # a reply to nothing: its prompt would be an empty conversation
        raise ValueError(f"message {opening}, field 'role': the conversation opens with an assistant turn; put the "
                         "user message it answers before it (or drop it)")
    return value


CHAT_FIELDS = {"messages": messages_field}


def read_conversations(source: str | Path) -> list[dict[str, Any]]:
    """Every record of a .json/.jsonl/.parquet file or hub dataset, checked (errors name file, record and field);
    each record gets its location under `WHERE` for errors found later, while rendering."""
    if str(source) == BUNDLED:
        return alpaca_conversations(read_records(BUNDLED_ALPACA, INSTRUCTION_FIELDS), source=f"{BUNDLED} (Alpaca)")
    if str(source).startswith(ALPACA_PREFIX):
        path = str(source)[len(ALPACA_PREFIX):]
        return alpaca_conversations(read_records(path, INSTRUCTION_FIELDS), source=path)
    records = read_records(source, CHAT_FIELDS)
    for index, record in enumerate(records):
        record[WHERE] = f"{source}: record {index} (0-based)"
    return records


def alpaca_conversations(records: Sequence[Mapping[str, str]], source: str = "alpaca",
                         system: str = "You are a helpful assistant.") -> list[dict[str, Any]]:
    """Group consecutive Alpaca records into conversations of 2, 3, 2, 3, ... turns (a turn: the instruction, with its
    input after a blank line, as the user; the output as the assistant); every third conversation opens with a
    system message. Deterministic; records with an empty output are skipped."""
    usable = [record for record in records if record["output"].strip()]
    conversations, start = [], 0
    while start < len(usable):
        turns = usable[start : start + 2 + len(conversations) % 2]
        messages = [{"role": "system", "content": system}] if len(conversations) % 3 == 0 else []
        for record in turns:
            user = f"{record['instruction']}\n\n{record['input']}" if record["input"].strip() else record["instruction"]
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        conversations.append({"messages": messages, WHERE: f"{source}: conversation {len(conversations)} (0-based)"})
        start += len(turns)
    return conversations


# ---------------------------------------------------------------------------------------------- rendering


def require_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {name!r} has no chat template (no 'chat_template' in its tokenizer_config.json or "
                         "chat_template.jinja): conversations are rendered with the tokenizer's own template; use a "
                         "chat model's tokenizer, or set tokenizer.chat_template and save it")


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token (EOS, pad, the template's turn markers added as special tokens)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {index for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return ids


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation_prompt: bool,
            where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja's TemplateError (e.g. "roles must alternate"), or a template bug
        raise ValueError(f"{where}, field 'messages': the tokenizer's chat template refused the first "
                         f"{len(messages)} message(s): {type(error).__name__}: {error}") from error


def _content_end(response: str, content: str, where: str, turn: int) -> int:
    """Where the assistant content ends inside the text the template writes for the turn."""
    if not content.strip():
        return 0
    for candidate in (content, content.strip()):
        found = response.find(candidate)
        if found >= 0:
            return found + len(candidate)
    raise ValueError(f"{where}, field 'messages': message {turn}: the chat template does not write this assistant "
                     f"content verbatim ({content!r:.60}), so its tokens cannot be labelled")


def conversation_pieces(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                        where: str) -> list[tuple[str, int]]:
    """The rendered conversation, up to its last assistant turn, as (text, tag) pieces: tag is the index i of the
    assistant message whose response (through its content) the piece is, -2 - i for the rest of that turn, CONTEXT
    for everything else. Concatenated, the texts are the template's rendering of the conversation up to that turn."""
    full = _render(tokenizer, messages, False, where)
    pieces: list[tuple[str, int]] = []
    done = 0  # characters of `full` already in pieces
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:turn], True, where)
        through = _render(tokenizer, messages[: turn + 1], False, where)
        if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= done):
            raise ValueError(f"{where}, field 'messages': message {turn}: the chat template renders the conversation "
                             "before this assistant turn differently once later turns follow, so assistant tokens "
                             "cannot be located; this template is not supported for training")
        response = through[len(prompt):]
        end = _content_end(response, message["content"], where, turn)
        # context; the response through the content (labelled); the rest of the turn, labelled through its first
        # special token (the end of turn) by `encode_conversation`
        pieces += [(prompt[done:], CONTEXT), (response[:end], turn), (response[end:], -2 - turn)]
        done = len(through)
    return [piece for piece in pieces if piece[0]]


@dataclass
class ChatEncodingStats:
    """What encoding kept, cut or dropped; logged so truncation is never silent."""

    records: int = 0
    assistant_turns: int = 0
    truncated: int = 0
    dropped_truncated: int = 0  # truncation left no assistant token

    def summary(self, name: str) -> str:
        return (f"{name}: kept {self.records - self.dropped_truncated} of {self.records} conversations "
                f"({self.assistant_turns} assistant turns); right-truncated to max_length: {self.truncated}, dropped "
                f"(no assistant token within max_length): {self.dropped_truncated}")


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str,
                        special_ids: set[int]) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 except on assistant responses through their end-of-turn token), untruncated."""
    pieces = conversation_pieces(tokenizer, messages, where)
    input_ids: list[int] = []
    labels: list[int] = []
    for (_, turn), ids in zip(pieces, _token_ids(tokenizer, [text for text, _ in pieces])):
        if turn >= 0:  # the response through the content: labelled
            input_ids += ids
            labels += ids
        elif turn == CONTEXT:
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        else:  # what the template writes after the content: labelled through its first special token (end of turn)
            stop = next((i + 1 for i, token in enumerate(ids) if token in special_ids), len(ids))
            input_ids += ids
            labels += ids[:stop] + [IGNORE_INDEX] * (len(ids) - stop)
    return input_ids, labels


def encode_conversations(records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase,
                         max_length: int) -> tuple[list[dict[str, list[int]]], ChatEncodingStats]:
    """Training examples {input_ids, labels}, right-truncated to max_length; a conversation whose assistant tokens all
    fall beyond max_length is dropped (and counted)."""
    stats = ChatEncodingStats(records=len(records))
    special_ids = special_token_ids(tokenizer)
    examples = []
    for record in records:
        messages = record["messages"]
        stats.assistant_turns += sum(message["role"] == "assistant" for message in messages)
        input_ids, labels = encode_conversation(tokenizer, messages, record.get(WHERE, "a record"), special_ids)
        if len(input_ids) > max_length:
            stats.truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is never a target
            stats.dropped_truncated += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, stats


def encode_for_chat_generation(records: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase,
                               max_length: int) -> tuple[list[dict[str, Any]], int]:
    """One generation example per conversation: everything before its last assistant response (the template's
    generation prompt included; left-truncated to max_length) and that response's content as the gold answer.
    Returns the examples and how many prompts were truncated."""
    examples, truncated = [], 0
    for record in records:
        messages = record["messages"]
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        pieces = conversation_pieces(tokenizer, messages[: last + 1], record.get(WHERE, "a record"))
        first = next(i for i, (_, tag) in enumerate(pieces) if tag in (last, -2 - last))
        context = [text for text, _ in pieces[:first]]
        prompt = [token for ids in _token_ids(tokenizer, context) for token in ids]
        kept, _ = fit_to_length([], prompt, [], max_length)
        truncated += len(kept) < len(prompt)
        examples.append({"input_ids": kept, "answer": messages[last]["content"].strip()})
    return examples, truncated


# ---------------------------------------------------------------------------------------------- datamodule


class ChatDataModule(InstructionDataModule):
    """Fine-tune a causal LM on multi-turn conversations with the tokenizer's own chat template.

    Training batches: right-padded `input_ids`, `attention_mask`, `labels` (-100 everywhere except the assistant
    responses and their end-of-turn tokens); with `packing=True` several conversations per row and `position_ids`
    (see `datamodules.packing`). Validation (`val_set_names`): the held-out loss ("heldout": `val_fraction` of the
    records, or `validation_files`), then, with `generation_samples > 0`, generation on that many held-out
    conversations ("heldout_generation": the model continues the template's generation prompt before the last
    assistant turn; scored by normalised exact match against it, logged as `val/heldout_generation/accuracy`).

    Args:
        data_files: .json / .jsonl / .parquet files or hub dataset names of {"messages": [...]} records;
            "alpaca:<file>" (conversations built from an Alpaca file) or "bundled" (from the 500 shipped).
        tokenizer_name_or_path: the model's tokenizer; it must have a chat template.
        max_length: tokens per conversation (longer ones are cut from the right, counted and reported).
        val_fraction: share of the records held out for the validation loss (ignored with validation_files).
        validation_files: held-out conversations from their own files instead of a split.
        generation_samples: held-out conversations evaluated by generation (0: none).
        packing: pack several conversations per training row (no attention across them).
    """

    def __init__(
        self,
        data_files: str | list[str] | None = None,
        tokenizer_name_or_path: str = "SmolLM2-135M-Instruct",
        max_length: int = 1024,
        val_fraction: float = 0.05,
        validation_files: str | list[str] | None = None,
        generation_samples: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        seed: int = 42,
        packing: bool = False,
    ) -> None:
        super().__init__(data_files=data_files, tokenizer_name_or_path=tokenizer_name_or_path, template="chat",
                         max_length=max_length, val_fraction=val_fraction, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers,
                         max_train_samples=max_train_samples, seed=seed, packing=packing)
        if generation_samples < 0:
            raise ValueError(f"generation_samples must be >= 0, got {generation_samples}")
        self.validation_files = validation_files
        self.generation_samples = generation_samples
        self.generation_examples: list[dict[str, Any]] = []

    @property
    def _has_heldout(self) -> bool:
        return bool(self.validation_files) or self.val_fraction > 0

    @property
    def val_set_names(self) -> list[str]:
        if not self._has_heldout:
            return []
        return [HELDOUT] + ([GENERATION] if self.generation_samples else [])

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            tokenizer = load_tokenizer(self.tokenizer_name_or_path)
            require_chat_template(tokenizer, self.tokenizer_name_or_path)
            self.tokenizer = tokenizer
        if stage in (None, "fit") or (stage == "validate" and self._has_heldout):
            if self.train_examples is None:
                self._setup_training_data()

    def val_dataloader(self) -> list[DataLoader]:
        if not self._has_heldout:
            return []
        loaders = [self._loss_loader(self.heldout_examples, self.eval_batch_size)]
        if self.generation_samples:
            collate = partial(_collate_chat_generation, pad_token_id=self.tokenizer.pad_token_id)
            loaders.append(DataLoader(self.generation_examples, self.eval_batch_size, collate_fn=collate,
                                      num_workers=self.num_workers))
        return loaders

    def _read(self, files: str | list[str]) -> list[dict[str, Any]]:
        sources = [files] if isinstance(files, str) else list(files)
        rank_zero_info(f"{type(self).__name__}: conversations from {', '.join(map(str, sources))}")
        return [record for source in sources for record in read_conversations(source)]

    def _setup_training_data(self) -> None:
        records = self._read(self._train_sources())
        if self.validation_files:
            train, heldout = records, self._read(self.validation_files)
        else:
            train, heldout = split_heldout(records, self.val_fraction, self.seed)
        if self.max_train_samples is not None:
            train = train[: self.max_train_samples]
        self.train_examples = self._encode_logged("train", train)
        self.heldout_examples = self._encode_logged(HELDOUT, heldout)
        if not self.train_examples:
            raise ValueError(f"{type(self).__name__}: no training conversation left (every one was cut before its "
                             f"first assistant token by max_length={self.max_length})")
        if self.generation_samples:
            if len(heldout) < self.generation_samples:
                rank_zero_warn(f"generation_samples={self.generation_samples}, but only {len(heldout)} held-out "
                               "conversations: generating on all of them")
            self.generation_examples, truncated = encode_for_chat_generation(
                heldout[: self.generation_samples], self.tokenizer, self.max_length)
            rank_zero_info(f"{type(self).__name__} {GENERATION}: {len(self.generation_examples)} conversations, "
                           f"prompts left-truncated: {truncated}")

    def _encode_logged(self, name: str, records: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
        examples, stats = encode_conversations(records, self.tokenizer, self.max_length)
        rank_zero_info(stats.summary(f"{type(self).__name__} {name}"))
        return examples


def _collate_chat_generation(examples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    return {**collate_for_generation(examples, pad_token_id, dataset=GENERATION), "scoring": SCORING}


# ---------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """`python -m datamodules.chat --from-alpaca alpaca.json --output chat.jsonl`: conversations from Alpaca."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.chat", description=main.__doc__)
    parser.add_argument("--from-alpaca", required=True, help="an Alpaca file (.json/.jsonl/.parquet)")
    parser.add_argument("--output", required=True, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    conversations = alpaca_conversations(read_records(args.from_alpaca, INSTRUCTION_FIELDS), source=args.from_alpaca)
    with open(args.output, "w", encoding="utf-8") as file:
        file.writelines(json.dumps({"messages": c["messages"]}) + "\n" for c in conversations)
    print(f"wrote {len(conversations)} conversations to {args.output}")


if __name__ == "__main__":
    main()
