"""Prompt building, label masking, truncation, validation and loaders of the causal-LM datamodules."""

import json
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from datamodules.instruction import (
    INSTRUCTION_FIELDS,
    AlpacaDataModule,
    EncodingStats,
    InstructionDataModule,
    collate_for_training,
    encode_for_training,
    fit_to_length,
    load_tokenizer,
    read_records,
)
from datamodules.prompts import build_prompt
from datamodules.reasoning import CommonsenseDataModule, MathDataModule

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer_dir(path: Path, bos: bool = False) -> Path:
    """A byte-level tokenizer with no merges (one id per byte), EOS but no pad token, optionally adding BOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = {"eos_token": "<eos>"}
    if bos:
        special["bos_token"] = "<s>"
        backend.add_special_tokens(["<s>"])
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return byte_tokenizer_dir(tmp_path_factory.mktemp("byte_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def instruction_records(n: int) -> list[dict]:
    return [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(n)]


# ------------------------------------------------------------------------------------------ prompts


def test_alpaca_prompt_with_input_is_verbatim():
    record = {"instruction": "Add the numbers.", "input": "2 and {3}", "output": "5"}
    assert build_prompt(record) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and {3}\n\n### Response:\n"
    )


def test_alpaca_prompt_without_input_is_verbatim():
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue"}
    assert build_prompt(record, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_chat_prompt_uses_the_tokenizer_template(tokenizer):
    with_input = build_prompt({"instruction": "Translate.", "input": "Hallo"}, "chat", tokenizer)
    without_input = build_prompt({"instruction": "Translate.", "input": ""}, "chat", tokenizer)
    assert with_input == "<|user|>Translate.\n\nHallo<eos><|assistant|>"
    assert without_input == "<|user|>Translate.<eos><|assistant|>"


def test_chat_prompt_needs_a_tokenizer_and_templates_are_checked():
    with pytest.raises(ValueError, match="chat template"):
        build_prompt({"instruction": "x", "input": ""}, "chat")
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        build_prompt({"instruction": "x", "input": ""}, "vicuna")


# ------------------------------------------------------------------------------------------ encoding


def test_labels_are_masked_exactly_over_the_prompt(tokenizer):
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue"}
    [example], stats = encode_for_training([record], tokenizer, "alpaca", max_length=512)
    prompt_bytes = list(build_prompt(record).encode())
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(build_prompt(record), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("Blue", add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) == len(prompt_bytes) and len(response_ids) == 4  # one id per byte
    assert example["input_ids"] == prompt_ids + response_ids + [eos]
    assert example["labels"] == [-100] * len(prompt_ids) + response_ids + [eos]
    assert stats == EncodingStats(records=1)


def test_bos_is_kept_and_masked_but_not_added_to_chat_prompts(tmp_path):
    tokenizer = load_tokenizer(str(byte_tokenizer_dir(tmp_path, bos=True)))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    record = {"instruction": "Hi", "input": "", "output": "Yo"}
    [alpaca], _ = encode_for_training([record], tokenizer, "alpaca", max_length=512)
    [chat], _ = encode_for_training([record], tokenizer, "chat", max_length=512)
    response = tokenizer("Yo", add_special_tokens=False)["input_ids"] + [eos]
    assert alpaca["input_ids"][0] == bos and alpaca["labels"][0] == -100
    assert alpaca["input_ids"][-3:] == response and alpaca["labels"][-3:] == response
    assert alpaca["labels"].count(-100) == 1 + len(build_prompt(record).encode())
    assert bos not in chat["input_ids"]
    assert chat["input_ids"] == tokenizer(build_prompt(record, "chat", tokenizer), add_special_tokens=False)[
        "input_ids"
    ] + response


@pytest.mark.parametrize(
    ("prompt_length", "response_length", "kept_prompt", "kept_response"),
    [
        (4, 3, 4, 3),  # fits: 1 + 4 + 3 <= 10
        (8, 3, 6, 3),  # prompt cut from the left, response whole
        (8, 8, 4, 5),  # response too long: the prompt keeps half the room, the response is cut from the right
        (2, 12, 2, 7),  # a short prompt is kept whole
    ],
)
def test_fit_to_length(prompt_length, response_length, kept_prompt, kept_response):
    prefix, prompt, response = [99], list(range(prompt_length)), list(range(100, 100 + response_length))
    new_prompt, new_response = fit_to_length(prefix, prompt, response, max_length=10)
    assert new_prompt == prompt[prompt_length - kept_prompt :]  # the end of the prompt survives
    assert new_response == response[:kept_response]  # the start of the response survives
    assert len(prefix) + len(new_prompt) + len(new_response) <= 10


def test_truncations_and_drops_are_counted(tokenizer, caplog):
    records = [
        {"instruction": "short", "input": "", "output": "ok"},
        {"instruction": "long " * 40, "input": "", "output": "ok"},
        {"instruction": "short", "input": "", "output": "response " * 40},
        {"instruction": "short", "input": "", "output": "  "},
    ]
    examples, stats = encode_for_training(records, tokenizer, "alpaca", max_length=160)
    assert stats == EncodingStats(records=4, prompt_truncated=2, response_truncated=1, dropped_empty_output=1)
    assert len(examples) == 3 and all(len(e["input_ids"]) <= 160 for e in examples)
    ok_eos = tokenizer("ok", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert examples[1]["labels"][-3:] == ok_eos and examples[1]["labels"].count(-100) == 160 - 3
    assert stats.summary("train") == (
        "train: kept 3 of 4 records; prompts left-truncated: 2, responses right-truncated: 1, "
        "dropped (empty output): 1"
    )


def test_training_collate_pads_right_with_masked_labels():
    batch = collate_for_training(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_missing_pad_token_falls_back_to_eos(tokenizer):
    assert tokenizer.pad_token == "<eos>" and tokenizer.pad_token_id == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("object.json", json.dumps({"instruction": "x"}), "expected a JSON list of records, got a JSON dict"),
        ("empty.json", "", "contains no records"),
        ("empty_list.json", "[]", "contains no records"),
        ("broken.json", '[{"instruction": ', "not valid JSON"),
        ("broken.jsonl", '{"instruction": "a", "input": "", "output": "b"}\n{oops', "line 2: not valid JSON"),
        (
            "missing.json",
            json.dumps(instruction_records(2) + [{"instruction": "x", "input": ""}]),
            r"record 2 \(0-based\): missing field 'output'",
        ),
        (
            "wrong_type.json",
            json.dumps(instruction_records(1) + [{"instruction": "x", "input": None, "output": "y"}]),
            r"record 1 \(0-based\), field 'input': expected a string, got NoneType",
        ),
        ("not_object.json", json.dumps([["x", "", "y"]]), r"record 0 \(0-based\): expected an object"),
    ],
)
def test_bad_data_names_file_record_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        read_records(path, INSTRUCTION_FIELDS)
    assert name in str(error.value)


def test_jsonl_records_are_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in instruction_records(3)) + "\n\n")
    assert read_records(path, INSTRUCTION_FIELDS) == instruction_records(3)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json", INSTRUCTION_FIELDS)


# ------------------------------------------------------------------------------------------ instruction datamodule


def test_alpaca_datamodule_batches_and_heldout_split(tmp_path, tokenizer_dir, caplog):
    empty_output = {"instruction": "x", "input": "", "output": ""}
    path = write_json(tmp_path / "train.json", instruction_records(20) + [empty_output])
    dm = AlpacaDataModule(str(path), str(tokenizer_dir), val_fraction=0.25, batch_size=4)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert len(dm.heldout_examples) + len(dm.train_examples) == 20  # 21 records, 1 empty output dropped
    assert len(dm.heldout_examples) in (5, 6)
    assert dm.val_set_names == ["heldout"] and len(dm.val_dataloader()) == 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, batch["input_ids"].shape[1])
    assert torch.equal(batch["labels"] != -100, (batch["labels"] != -100) & batch["attention_mask"].bool())
    assert "dropped (empty output): 1" in caplog.text


def test_heldout_split_is_fixed_by_the_seed(tmp_path, tokenizer_dir):
    path = write_json(tmp_path / "train.json", instruction_records(40))

    def heldout(seed):
        dm = InstructionDataModule(str(path), str(tokenizer_dir), val_fraction=0.1, seed=seed, max_train_samples=5)
        dm.setup("fit")
        assert len(dm.train_examples) == 5
        return [e["input_ids"] for e in dm.heldout_examples]

    assert heldout(1) == heldout(1) and heldout(1) != heldout(2)


def test_bundled_alpaca_is_the_shared_subset_prefix(tokenizer_dir):
    dm = AlpacaDataModule(data_files="bundled", tokenizer_name_or_path=str(tokenizer_dir), val_fraction=0.0)
    records = dm._load_train_records()
    assert len(records) == 500
    shared = SHARED_DATA / "alpaca" / "alpaca_data_5000.json"
    if shared.is_file():
        assert records == json.loads(shared.read_text())[:500]


def test_instruction_datamodule_needs_data_files(tokenizer_dir):
    with pytest.raises(ValueError, match="needs data_files"):
        InstructionDataModule(tokenizer_name_or_path=str(tokenizer_dir)).setup("fit")


# ------------------------------------------------------------------------------------------ reasoning datamodules


def reasoning_record(question: str, answer, output: str = "A: so. The answer is 1.") -> dict:
    return {"instruction": question, "input": "", "output": output, "answer": answer}


@pytest.fixture
def math_dir(tmp_path):
    write_json(
        tmp_path / "dataset" / "gsm8k" / "test.json",
        [
            reasoning_record("How many apples?", "3.0"),
            reasoning_record("A much much longer question about pears?", "4.0"),
            reasoning_record("Third?", "5.0"),
        ],
    )
    aqua = [reasoning_record("Pick one. Answer Choices: (A) 1", ["A"])]
    write_json(tmp_path / "dataset" / "AQuA" / "test.json", aqua)
    write_json(
        tmp_path / "ft-training_set" / "math_data.json",
        [reasoning_record("  how MANY\napples? ", "3.0"), reasoning_record("Train question?", "7.0"),
         reasoning_record("Another train question?", "8.0")],
    )
    return tmp_path


def test_math_overlap_is_dropped_and_counted(math_dir, tokenizer_dir, tokenizer, caplog):
    dm = MathDataModule(str(math_dir), eval_datasets=["gsm8k", "aqua"], tokenizer_name_or_path=str(tokenizer_dir))
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "dropped 1 of 3 training records" in caplog.text
    texts = sorted(tokenizer.decode(example["input_ids"]) for example in dm.train_examples)
    assert len(texts) == 2 and "Another train question?" in texts[0] and "Train question?" in texts[1]


def test_overlap_can_be_kept(math_dir, tokenizer_dir):
    dm = MathDataModule(data_dir=str(math_dir), eval_datasets=["gsm8k"], drop_train_overlap=False,
                        tokenizer_name_or_path=str(tokenizer_dir))
    dm.setup("fit")
    assert len(dm.train_examples) == 3


def test_all_training_records_overlapping_is_an_error(math_dir, tokenizer_dir):
    write_json(math_dir / "ft-training_set" / "math_data.json", [reasoning_record("Third?", "5.0")])
    dm = MathDataModule(data_dir=str(math_dir), eval_datasets=["gsm8k"], tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(ValueError, match="drop_train_overlap=False"):
        dm.setup("fit")


def test_generation_loaders_one_per_dataset_left_padded(math_dir, tokenizer_dir, tokenizer):
    dm = MathDataModule(data_dir=str(math_dir), eval_datasets=["gsm8k", "AQuA"], max_eval_samples_per_dataset=2,
                        tokenizer_name_or_path=str(tokenizer_dir), eval_batch_size=8)
    dm.setup("test")
    assert dm.train_examples is None  # testing never reads the training file
    assert dm.test_set_names == dm.val_set_names == ["gsm8k", "AQuA"]
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and len(dm.val_dataloader()) == 2
    gsm8k, aqua = (next(iter(loader)) for loader in loaders)
    assert set(gsm8k) == {"input_ids", "attention_mask", "answers", "dataset"}
    assert gsm8k["dataset"] == "gsm8k" and gsm8k["answers"] == ["3.0", "4.0"]  # the first two, in file order
    assert aqua["dataset"] == "AQuA" and aqua["answers"] == ["A"]  # one-element list normalised
    short, long = gsm8k["attention_mask"].tolist()
    pad = len(short) - sum(short)
    assert pad > 0 and short == [0] * pad + [1] * sum(short) and long == [1] * len(long)
    assert gsm8k["input_ids"][0, :pad].tolist() == [tokenizer.pad_token_id] * pad
    prompt = build_prompt({"instruction": "How many apples?", "input": ""})
    assert gsm8k["input_ids"][0, pad:].tolist() == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_val_loaders_put_the_heldout_split_first(math_dir, tokenizer_dir):
    dm = MathDataModule(data_dir=str(math_dir), eval_datasets=["AQuA"], val_fraction=0.3,
                        tokenizer_name_or_path=str(tokenizer_dir))
    dm.setup("fit")
    assert dm.val_set_names == ["heldout", "AQuA"]
    heldout, aqua = (next(iter(loader)) for loader in dm.val_dataloader())
    assert "labels" in heldout and "answers" in aqua


def test_reasoning_needs_data_dir_and_known_sets(tokenizer_dir):
    with pytest.raises(ValueError, match="needs data_dir"):
        MathDataModule(tokenizer_name_or_path=str(tokenizer_dir)).setup("test")
    with pytest.raises(ValueError, match="evaluates math sets"):
        MathDataModule(eval_datasets=["boolq"])
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        MathDataModule(eval_datasets=["gsm9k"])


def test_missing_test_file_is_reported(math_dir, tokenizer_dir):
    dm = MathDataModule(data_dir=str(math_dir), eval_datasets=["SVAMP"], tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match="SVAMP"):
        dm.setup("test")


def test_bad_eval_answer_names_file_record_and_field(math_dir, tokenizer_dir):
    two_answers = reasoning_record("q", ["1", "2"])
    write_json(math_dir / "dataset" / "gsm8k" / "test.json", [reasoning_record("q", "1"), two_answers])
    dm = MathDataModule(data_dir=str(math_dir), eval_datasets=["gsm8k"], tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(ValueError, match=r"gsm8k/test.json: record 1 \(0-based\), field 'answer': .*exactly one"):
        dm.setup("test")


def test_commonsense_defaults_to_per_task_train_files_and_reconstructed_hellaswag(tmp_path, tokenizer_dir, caplog):
    write_json(tmp_path / "dataset" / "hellaswag" / "test_reconstructed.json", [reasoning_record("Ending?", "ending2")])
    write_json(tmp_path / "dataset" / "boolq" / "test.json", [reasoning_record("Is it?", "true")])
    train = [reasoning_record("Was it?", "false", "the correct answer is false")]
    write_json(tmp_path / "dataset" / "boolq" / "train.json", train)
    dm = CommonsenseDataModule(data_dir=str(tmp_path), eval_datasets=["hellaswag", "BoolQ"],
                               tokenizer_name_or_path=str(tokenizer_dir), template="chat")
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "boolq/train.json" in caplog.text and len(dm.train_examples) == 1
    assert [next(iter(loader))["answers"] for loader in dm.val_dataloader()] == [["ending2"], ["true"]]


# ------------------------------------------------------------------------------------------ real shared data


needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


@needs_shared
def test_shared_math_data_loads(tokenizer_dir, caplog):
    dm = MathDataModule(data_dir=str(SHARED_DATA / "math_reasoning"), eval_datasets=["mawps", "AQuA"],
                        max_eval_samples_per_dataset=4, max_length=256, tokenizer_name_or_path=str(tokenizer_dir))
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "dropped 257 of 3260 training records" in caplog.text  # 54 mawps + 203 AQuA questions
    assert len(dm.train_examples) == 3260 - 257 - 3  # 3 records have an empty output
    batches = [next(iter(loader)) for loader in dm.test_dataloader()]
    assert [b["dataset"] for b in batches] == ["mawps", "AQuA"] and batches[1]["answers"][0] in "ABCDE"


@needs_shared
def test_shared_math_training_set_is_all_contaminated(tokenizer_dir):
    dm = MathDataModule(data_dir=str(SHARED_DATA / "math_reasoning"), tokenizer_name_or_path=str(tokenizer_dir))
    with pytest.raises(ValueError, match="every one of the 3260 training records"):
        dm.setup("fit")


@needs_shared
def test_shared_commonsense_test_sets_load(tokenizer_dir):
    dm = CommonsenseDataModule(data_dir=str(SHARED_DATA / "commonsense_reasoning"), max_eval_samples_per_dataset=2,
                               tokenizer_name_or_path=str(tokenizer_dir))
    dm.setup("test")
    batches = [next(iter(loader)) for loader in dm.test_dataloader()]
    assert [b["dataset"] for b in batches] == dm.test_set_names and len(batches) == 8
    assert batches[3]["dataset"] == "hellaswag" and all(a.startswith("ending") for a in batches[3]["answers"])


# ------------------------------------------------------------------------------------------ real tokenizer


@pytest.mark.slow
def test_bundled_alpaca_with_the_smollm2_tokenizer():
    dm = AlpacaDataModule(data_files="bundled", template="chat", val_fraction=0.1)
    dm.setup("fit")
    tokenizer = dm.tokenizer
    assert len(dm.train_examples) + len(dm.heldout_examples) == 500
    example = dm.train_examples[0]
    response_start = example["labels"].count(-100)
    assert example["input_ids"][:response_start][-4:] == tokenizer("<|im_start|>assistant\n")["input_ids"]
    assert example["labels"][response_start:] == example["input_ids"][response_start:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
