"""Chat conversations: the tokenizer's own template, loss on every assistant turn and nothing else, bad data named,
truncation counted, held-out loss and generation evaluation, packing, and a fit."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from datamodules.chat import (
    GENERATION,
    ChatDataModule,
    alpaca_conversations,
    encode_conversation,
    encode_conversations,
    read_conversations,
    special_token_ids,
)
from datamodules.instruction import BUNDLED_ALPACA, IGNORE_INDEX, INSTRUCTION_FIELDS, load_tokenizer, read_records
from sparse_lightning.models import resolve_model_path
from sparse_lightning.modules import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "2+2 is 4."}]},
    {"messages": [{"role": "system", "content": "You answer in one word."},
                  {"role": "user", "content": "Colour of the sky?"},
                  {"role": "assistant", "content": "Blue"},
                  {"role": "user", "content": "And grass?"},
                  {"role": "assistant", "content": " Green "},
                  {"role": "user", "content": "Thanks"}]},
    {"messages": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "OK"}]},
]
# A second template family: header tokens, trimmed content, an end token and then text (Llama-3-like).
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>{{ m['content'] | trim }}<|end|>\n\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}"
)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's real tokenizer and chat template, saved alone."""
    path = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(resolve_model_path("SmolLM2-135M-Instruct")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_chat_lm_dir(smol_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny LLaMA with SmolLM2's tokenizer and chat template (fast to run, real template)."""
    path = tmp_path_factory.mktemp("tiny-chat-lm")
    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def header_tokenizer_dir(tmp_path_factory) -> Path:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>",
                                        additional_special_tokens=["<|start|>", "<|sep|>"])
    tokenizer.chat_template = HEADER_TEMPLATE
    path = tmp_path_factory.mktemp("header-tokenizer")
    tokenizer.save_pretrained(path)
    return path


def labelled_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive labelled positions (their ids, which equal the labels)."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["two-turns", "system-and-trailing-user", "one-turn"])
def test_exactly_the_assistant_turns_are_labelled_smollm2(smol_tokenizer_dir, conversation):
    """Decode exactly the labelled tokens: each assistant content followed by the end-of-turn token, nothing else."""
    tokenizer = load_tokenizer(str(smol_tokenizer_dir))
    messages = conversation["messages"]
    input_ids, labels = encode_conversation(tokenizer, messages, "test", special_token_ids(tokenizer))
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in labelled_spans(input_ids, labels)] == \
        [f"{content}<|im_end|>" for content in assistant]
    # the tokens are the template's rendering, tokenized as a whole (up to the last assistant turn)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
    assert input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(input_ids) == text


def test_exactly_the_assistant_turns_are_labelled_header_template(header_tokenizer_dir):
    """Another template family: trimmed content, header tokens, and text after the end token (not labelled)."""
    tokenizer = load_tokenizer(str(header_tokenizer_dir))
    messages = CONVERSATIONS[1]["messages"]
    input_ids, labels = encode_conversation(tokenizer, messages, "test", special_token_ids(tokenizer))
    assert [tokenizer.decode(span) for span in labelled_spans(input_ids, labels)] == ["Blue<|end|>", "Green<|end|>"]
    assert tokenizer.decode(input_ids).startswith("<s><|start|>system<|sep|>You answer in one word.<|end|>\n\n")


@pytest.mark.parametrize(("messages", "problem"), [
    ([], "field 'messages': the conversation is empty"),
    ([{"role": "user", "content": "hi"}], "field 'messages': no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}],
     "field 'messages': message 1, field 'role': unknown role 'tool'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
     "field 'messages': message 1, field 'content': expected a string, got int"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
     "field 'messages': message 1, field 'content': expected a string, got NoneType"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "field 'messages': message 1: missing field 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     "message 1, field 'role': a system message may only come first"),
    ("hello", "field 'messages': expected a list of messages, got str"),
    (None, "field 'messages': expected a list of messages, got NoneType"),
])
def test_bad_data_names_file_record_and_field(tmp_path, messages, problem):
    path = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0], {"messages": messages}])
    with pytest.raises(ValueError) as error:
        read_conversations(str(path))
    assert str(error.value).startswith(f"{path}: record 1 (0-based)")
    assert problem in str(error.value)


def test_a_record_without_messages_and_a_tokenizer_without_template(tmp_path, tiny_lm_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": []}])
    with pytest.raises(ValueError, match=r"chat.jsonl: record 0 \(0-based\): missing field 'messages'"):
        read_conversations(str(path))
    datamodule = ChatDataModule(data_files=str(write_jsonl(tmp_path / "ok.jsonl", CONVERSATIONS)),
                                tokenizer_name_or_path=str(tiny_lm_dir))
    with pytest.raises(ValueError, match="has no chat template"):
        datamodule.setup("fit")


def test_a_template_that_rewrites_earlier_turns_is_refused(header_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(str(header_tokenizer_dir))
    # renders each message with the number of messages in the conversation: earlier turns change as it grows
    tokenizer.chat_template = "{% for m in messages %}{{ messages | length }}{{ m['content'] }}<|end|>{% endfor %}"
    with pytest.raises(ValueError, match=r"record 4 \(0-based\), field 'messages': message 1: the chat template "
                                         "renders the conversation before this assistant turn differently"):
        encode_conversations([{"messages": CONVERSATIONS[0]["messages"], "_where": "f.jsonl: record 4 (0-based)"}],
                             tokenizer, 100)


def test_a_template_that_raises_is_named(header_tokenizer_dir):
    tokenizer = load_tokenizer(str(header_tokenizer_dir))
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}"
                               "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match=r"f.jsonl: record 2 \(0-based\), field 'messages': the tokenizer's chat "
                                         "template refused the first 3 message\(s\): .*roles must alternate"):
        encode_conversations([{"messages": messages, "_where": "f.jsonl: record 2 (0-based)"}], tokenizer, 100)


def test_truncation_is_counted_and_reported(smol_tokenizer_dir, tmp_path, caplog):
    tokenizer = load_tokenizer(str(smol_tokenizer_dir))
    lengths = [len(encode_conversation(tokenizer, c["messages"], "", special_token_ids(tokenizer))[0])
               for c in CONVERSATIONS]
    # long enough for the first assistant turn of every conversation, too short for the whole of the first two
    cut = len(encode_conversation(tokenizer, CONVERSATIONS[0]["messages"][:2], "", special_token_ids(tokenizer))[0])
    examples, stats = encode_conversations(CONVERSATIONS, tokenizer, cut)
    assert (stats.records, stats.truncated, stats.dropped_truncated) == (3, 2, 0) and len(examples) == 3
    assert all(len(e["input_ids"]) <= cut for e in examples) and sorted(lengths)[0] <= cut
    _, stats = encode_conversations(CONVERSATIONS, tokenizer, 12)  # before any assistant token: dropped
    assert stats.dropped_truncated == 3
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    with caplog.at_level(logging.INFO):
        ChatDataModule(data_files=str(path), tokenizer_name_or_path=str(smol_tokenizer_dir), max_length=cut,
                       val_fraction=0.25).setup("fit")
    assert "right-truncated to max_length: " in caplog.text and "conversations (" in caplog.text


def test_heldout_loss_and_generation_loaders(smol_tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    datamodule = ChatDataModule(data_files=str(path), tokenizer_name_or_path=str(smol_tokenizer_dir),
                                val_fraction=0.25, generation_samples=2, batch_size=2, eval_batch_size=2)
    datamodule.setup("fit")
    assert datamodule.val_set_names == ["heldout", GENERATION]
    assert (len(datamodule.train_examples), len(datamodule.heldout_examples)) == (9, 3)
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
    assert ((batch["labels"] == IGNORE_INDEX) | (batch["labels"] == batch["input_ids"])).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    loss_loader, generation_loader = datamodule.val_dataloader()
    generation = next(iter(generation_loader))
    assert generation["dataset"] == GENERATION and generation["scoring"] == "exact_match"
    tokenizer = datamodule.tokenizer
    expected = {}
    for conversation in CONVERSATIONS:
        messages = conversation["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        expected[messages[last]["content"].strip()] = tokenizer.apply_chat_template(
            messages[:last], tokenize=False, add_generation_prompt=True)
    for row, mask, answer in zip(generation["input_ids"], generation["attention_mask"], generation["answers"]):
        assert mask[-1] == 1  # left-padded: every prompt ends at the last column
        assert tokenizer.decode(row[mask.bool()]) == expected[answer]  # the template's own generation prompt


def test_validation_files_instead_of_a_split(smol_tokenizer_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    heldout = write_jsonl(tmp_path / "dev.jsonl", CONVERSATIONS[:1])
    datamodule = ChatDataModule(data_files=str(train), validation_files=str(heldout), val_fraction=0.0,
                                tokenizer_name_or_path=str(smol_tokenizer_dir))
    datamodule.setup("fit")
    assert (len(datamodule.train_examples), len(datamodule.heldout_examples)) == (3, 1)
    assert datamodule.val_set_names == ["heldout"]


def test_parquet_and_hub_sources(smol_tokenizer_dir, tmp_path, monkeypatch):
    import datasets

    parquet = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(CONVERSATIONS[:1]).to_parquet(str(parquet))
    assert [r["messages"] for r in read_conversations(str(parquet))] == [CONVERSATIONS[0]["messages"]]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(CONVERSATIONS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = read_conversations("someone/chats")
    assert calls == [("someone/chats", "train")] and records[0]["_where"] == "someone/chats: record 0 (0-based)"


def test_conversations_built_from_alpaca():
    records = read_records(BUNDLED_ALPACA, INSTRUCTION_FIELDS)
    conversations = alpaca_conversations(records)
    assert len(conversations) == 200  # 500 records in conversations of 2, 3, 2, 3, ... turns
    first = conversations[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[2]["content"] == records[0]["output"] and first[4]["content"] == records[1]["output"]
    assert [m["role"] for m in conversations[1]["messages"]] == ["user", "assistant"] * 3
    assert sum(len(c["messages"]) // 2 for c in conversations) == 500
    assert read_conversations("bundled")[5]["messages"] == conversations[5]["messages"]
    assert read_conversations(f"alpaca:{BUNDLED_ALPACA}")[7]["messages"] == conversations[7]["messages"]


def test_chat_packing(smol_tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    datamodule = ChatDataModule(data_files=str(path), tokenizer_name_or_path=str(smol_tokenizer_dir), packing=True,
                                max_length=256, val_fraction=0.0, batch_size=2)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert all("position_ids" in b for b in batches) and sum(b["input_ids"].shape[0] for b in batches) < 12
    labelled = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert labelled == sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in datamodule.train_examples)


def test_a_chat_run_trains_and_evaluates_by_generation(tiny_chat_lm_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS * 4)
    datamodule = ChatDataModule(data_files=str(path), tokenizer_name_or_path=str(tiny_chat_lm_dir),
                                val_fraction=0.25, generation_samples=2, batch_size=2, eval_batch_size=2)
    module = CausalLMModule(str(tiny_chat_lm_dir), max_new_tokens=4,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=2)
    trainer.fit(module, datamodule)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/heldout/loss"])
    assert f"val/{GENERATION}/accuracy" in metrics  # exact match of 4 random tokens: 0, but scored


@pytest.mark.slow
def test_smollm2_chat_fit_through_the_cli(tmp_path):
    """The real SmolLM2 on the bundled conversations, every method's composition with SIFT here: 2 steps."""
    command = [sys.executable, "-m", "sparse_lightning.cli", "fit",
               "--config", str(ROOT / "configs/model/smollm2.yaml"), "--config", str(ROOT / "configs/task/chat.yaml"),
               "--config", str(ROOT / "configs/method/smollm2/sift.yaml"),
               "--data.data_files", "bundled", "--data.max_train_samples", "8", "--data.val_fraction", "0.02",
               "--data.batch_size", "1", "--data.eval_batch_size", "2", "--data.max_length", "256",
               "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval", "2",
               "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--trainer.enable_checkpointing", "false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final metrics: val/loss=" in result.stdout + result.stderr
