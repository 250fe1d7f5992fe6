"""Issue 26 on the command line: runs sharing a folder get their own (case 5); errors keep the library's context
(13-16): one line naming the file and line, the key and its closest match, the task file that does not parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparse_lightning import cli
from tiny_sst2_runs import command_line_error, tiny_sst2_config

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, model_dir: Path, **trainer) -> Path:
    return tiny_sst2_config(tmp_path, model_dir, {"max_steps": 1, "limit_val_batches": 1, "val_check_interval": 1,
                                                  **trainer})


# ------------------------------------------------------------------------------------------------- case 5


@pytest.mark.parametrize("logger", [None, {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                           "init_args": {"save_dir": "SHARED", "name": "runs"}}])
def test_two_runs_started_together_in_one_folder_get_their_own_run_folders(tiny_bert_dir, tmp_path, monkeypatch,
                                                                            logger):
    """Run B starts after run A picked its run folder and before A wrote to it (the race of two runs started at
    once): each must end with its own config.yaml, checkpoint and metrics."""
    shared = tmp_path / "shared"
    trainer = {"default_root_dir": str(shared)}
    if logger is not None:
        trainer["logger"] = {**logger, "init_args": {**logger["init_args"], "save_dir": str(shared)}}
    config = write_config(tmp_path, tiny_bert_dir, **trainer)
    original = cli.SparseLightningCLI.before_fit
    started = []

    def before_fit(self) -> None:
        original(self)
        _ = self.trainer.logger.version  # run A has chosen its folder (Lightning: by listing the existing ones)
        if not started:
            started.append(True)
            cli.main(["fit", "--config", str(config)])  # run B, start to end

    monkeypatch.setattr(cli.SparseLightningCLI, "before_fit", before_fit)
    cli.main(["fit", "--config", str(config)])
    runs = sorted(path.parent for path in shared.rglob("config.yaml"))
    assert [run.name for run in runs] == ["version_0", "version_1"]
    for run in runs:
        assert len(list((run / "checkpoints").glob("*.ckpt"))) == 1
        assert (run / "metrics.csv").read_text().count("epoch") == 1  # one header: not two runs interleaved


# ------------------------------------------------------------------------------------------------- cases 13-16


def run_command_line(monkeypatch, capsys, *args: str) -> str:
    """`sparse-lightning ARGS` as typed: exit status 1 and exactly one line on stderr, returned."""
    code, err = command_line_error(monkeypatch, capsys, *args)
    err = err.strip()
    assert code == 1 and err.startswith("sparse-lightning: error: "), err[-3000:]
    assert len(err.splitlines()) == 1, err[-3000:]
    return err


def chat_fit(tmp_path: Path, data_file: Path) -> list[str]:
    return ["fit", "--model", "sparse_lightning.modules.CausalLMModule", "--model.model_name_or_path",
            "SmolLM2-135M-Instruct", "--data", "datamodules.chat.ChatDataModule", "--data.data_files", str(data_file),
            "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(tmp_path)]


def conversation(*roles: str) -> str:
    return json.dumps({"messages": [{"role": role, "content": f"{role} says hi"} for role in roles]})


def test_a_jsonl_syntax_error_names_the_file_and_its_line(tmp_path: Path, monkeypatch, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(conversation("user", "assistant") + "\n" + '{"messages": [{"role": "user" "content": "x"}]}\n')
    err = run_command_line(monkeypatch, capsys, *chat_fit(tmp_path, path))
    assert f"{path} line 2: not valid JSON" in err


def test_a_non_utf8_chat_file_is_named(tmp_path: Path, monkeypatch, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_bytes((conversation("user", "assistant") + "\n").encode() + b'{"messages": "caf\xe9"}\n')
    err = run_command_line(monkeypatch, capsys, *chat_fit(tmp_path, path))
    assert f"{path}: line 2: not UTF-8 text" in err


def test_an_assistant_first_conversation_says_so(tmp_path: Path, monkeypatch, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(conversation("user", "assistant") + "\n" + conversation("assistant", "user") + "\n")
    err = run_command_line(monkeypatch, capsys, *chat_fit(tmp_path, path))
    assert "record 1 (0-based), field 'messages': message 0, field 'role': the conversation opens with an assistant " \
           "turn" in err


def test_an_unknown_config_key_is_one_line_naming_the_closest(tiny_bert_dir: Path, tmp_path: Path, monkeypatch,
                                                               capsys):
    config = write_config(tmp_path, tiny_bert_dir, max_step=3)
    err = run_command_line(monkeypatch, capsys, "fit", "--config", str(config))
    assert "'trainer.max_step'" in err and "did you mean 'trainer.max_steps'?" in err


def test_s2ft_strategy_in_a_config_names_select_by(monkeypatch, capsys):
    configs = ["model/minilm.yaml", "task/mrpc.yaml", "method/minilm/s2ft.yaml"]
    args = [a for c in configs for a in ("--config", str(ROOT / "configs" / c))]
    err = run_command_line(monkeypatch, capsys, "fit", *args, "--trainer.callbacks.init_args.strategy", "random")
    assert err.endswith("S2FTStructureCallback's strategy is now select_by")


def test_export_to_the_checkpoint_file_is_one_line(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "last.ckpt").write_bytes(b"x")
    err = run_command_line(monkeypatch, capsys, "export", "--ckpt_path", str(tmp_path / "last.ckpt"), "--output",
                           str(tmp_path / "last.ckpt"))
    assert "last.ckpt is a file, not a directory" in err


def test_export_to_an_empty_output_is_one_line(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "last.ckpt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    err = run_command_line(monkeypatch, capsys, "export", "--ckpt_path", "last.ckpt", "--output", "")
    assert "the export output is empty" in err
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("args, names", [
    (("export", "--bogus", "1"), "sparse-lightning export: unrecognized arguments: --bogus 1"),
    (("export",), "sparse-lightning export: the following arguments are required"),
    (("evaluate", "--model", "m", "--tasks", "t", "--bogus"), "sparse-lightning evaluate: unrecognized arguments"),
    (("estimate", "--model", "llama-8b", "--bogus"), "sparse-lightning estimate: unrecognized arguments: --bogus"),
    (("plot", "curves", "--output", "c.png"), "sparse-lightning plot curves: the following arguments are required"),
])
def test_a_subcommands_bad_flag_is_one_line_naming_it_and_its_help(args, names, monkeypatch, capsys):
    err = run_command_line(monkeypatch, capsys, *args)
    assert names in err and err.endswith(f"(options: {names.split(':')[0]} --help)"), err


def test_a_loss_already_non_finite_before_any_update_blames_the_init_delta(tiny_lm_dir: Path, tmp_path: Path):
    import lightning.pytorch as pl
    import torch
    from transformers import LlamaForCausalLM

    from datamodules.reasoning import MathDataModule
    from sparse_lightning import CausalLMModule
    from sparse_lightning.callbacks import RandomMaskCallback
    from sparse_lightning.export import export_model
    from sparse_lightning.sparse import freeze_except, sparse_delta_layers

    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    RandomMaskCallback(density=0.5).attach(model)
    for layer in sparse_delta_layers(model).values():
        layer.delta_values.data.fill_(1e30)  # finite in fp32; the forward overflows
    freeze_except(model, [])
    export_model(model, tmp_path / "huge")
    records = [{"instruction": f"What is {a} plus 2?", "input": "", "output": str(a + 2)} for a in range(8)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "dataset" / "AddSub").mkdir(parents=True)
    (tmp_path / "dataset" / "AddSub" / "test.json").write_text(json.dumps(
        [{"instruction": "Tom has 2 apples and gets 3 more. How many?", "input": "", "output": "", "answer": "5"}]))
    data = MathDataModule(data_dir=str(tmp_path), train_files="train.json", tokenizer_name_or_path=str(tiny_lm_dir),
                          eval_datasets=["AddSub"], max_length=64, batch_size=4, val_fraction=0.0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                         enable_checkpointing=False, callbacks=[RandomMaskCallback(density=0.05)])
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match=r"at step 0 \(batch 0\), before any update: base \+ init_delta "
                                                 r".*huge already gives a non-finite loss; check the init_delta"):
        trainer.fit(CausalLMModule(str(tiny_lm_dir), init_delta=str(tmp_path / "huge")), datamodule=data)


def test_evaluate_refuses_a_classifiers_delta_and_pickles_plainly(tiny_bert_cls_dir: Path, tiny_lm_dir: Path,
                                                                   tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    from sparse_lightning.callbacks import RandomMaskCallback
    from sparse_lightning.evaluate import EvaluateError, load_model
    from sparse_lightning.export import export_model
    from sparse_lightning.sparse import freeze_except

    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir)
    RandomMaskCallback(density=0.05).attach(classifier)
    freeze_except(classifier, ["classifier"])
    export_model(classifier, tmp_path / "cls", base_model=str(tiny_bert_cls_dir))
    with pytest.raises(EvaluateError, match="is a sequence classifier's delta \\(it trains classifier.weight\\); "
                                            "lm-eval scores causal LMs"):
        load_model(tmp_path / "cls")
    (tmp_path / "model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(EvaluateError, match=r"model.bin: a PyTorch pickle \(.bin\), which is refused .*convert it"):
        load_model(tmp_path / "model.bin")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_lm_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(EvaluateError, match=r"its weights are PyTorch pickles \(pytorch_model.bin\), which are refused"):
        load_model(pickled)


def test_a_broken_task_yaml_under_include_path_is_named_with_its_line(tmp_path: Path):
    from sparse_lightning.evaluate import EvaluateError, task_roots

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "good.yaml").write_text("task: mine\nprocess_docs: !function utils.process\n")
    (tmp_path / "tasks" / "mine.yaml").write_text("task: mine\ndataset_path: [unclosed\noutput_type: generate_until\n")
    with pytest.raises(EvaluateError, match=r"mine.yaml:\d+: not valid YAML \(.*\); fix it or move it out of "
                                            "--include_path"):
        task_roots(str(tmp_path / "tasks"))


def test_a_hub_id_typo_fails_at_once_without_a_network(monkeypatch):
    import socket

    from sparse_lightning import models

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    models.hub_reachable.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"HuggingFaceTB/SmolLM2-135M-Instruc: .*the hub .* cannot be "
                                                    "reached: check the name"):
            models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruc")
    finally:
        models.hub_reachable.cache_clear()


@pytest.mark.parametrize("where", ["config", "flag"])
def test_a_bad_callback_value_names_the_callback_its_argument_and_why(where: str, tmp_path: Path, monkeypatch, capsys):
    """jsonargparse nests the reason under the callbacks list and beside the other union members' failures; the one
    line is the innermost reason (it used to read 'Parser key "trainer.callbacks":' or 'unknown key')."""
    method = ROOT / "configs" / "method" / "minilm" / "sift.yaml"
    if where == "config":
        text = method.read_text().replace("calibration_batches: 8", "calibration_batches: 8\n        allocation: globl")
        (tmp_path / "sift.yaml").write_text(text)
        extra = ["--config", str(tmp_path / "sift.yaml")]
    else:
        extra = ["--config", str(method), "--trainer.callbacks.init_args.allocation", "globl"]
    err = run_command_line(monkeypatch, capsys, "fit", "--config", str(ROOT / "configs" / "model" / "minilm.yaml"),
                           "--config", str(ROOT / "configs" / "task" / "sst2.yaml"), *extra)
    assert err == ("sparse-lightning: error: trainer.callbacks: GradientTopKCallback's allocation: Expected a "
                   "typing.Literal['per_weight', 'global']. Got value: globl")


def test_a_flag_indexing_the_callbacks_list_says_how_to_set_it(monkeypatch, capsys):
    """jsonargparse has no `.0.` for list items; the one line says which flag does what the user meant."""
    err = run_command_line(monkeypatch, capsys, "fit", "--config", str(ROOT / "configs" / "model" / "minilm.yaml"),
                           "--config", str(ROOT / "configs" / "task" / "sst2.yaml"),
                           "--config", str(ROOT / "configs" / "method" / "minilm" / "sift.yaml"),
                           "--trainer.callbacks.0.init_args.density=0.01")
    assert err == ("sparse-lightning: error: unknown key '0.init_args.density' in the config or command line: a flag "
                   "cannot pick a list item by its index; --trainer.callbacks.init_args.density=... sets the last "
                   "callback's (the method's), or change the item in a --config YAML")
