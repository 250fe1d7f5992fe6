"""Issue 11, items 7, 8, 9 and 14: bad inputs get one clear sentence, at once.

7: a `lora_rank` larger than the target weights hold fails like an oversized `num_params` (no silent cap);
8: a missing model path or a mistyped alias says so at once and lists the built-in aliases (only `owner/name` reaches
   the hub, and not when offline unless cached); 9: a config error is one line on the command line, not a double
   traceback; 14: `max_train_samples: 0` fails at construction, and a run that ends before its first validation warns.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from datamodules.glue import GLUEDataModule
from datamodules.instruction import InstructionDataModule
from sparse_lightning import cli
from sparse_lightning.models import builtin_aliases, resolve_model_path
from sparse_lightning.sparse import allocate_budget
from tiny_sst2_runs import command_line_error, tiny_sst2_config



# ------------------------------------------------------------------------------------------------ item 7


def test_a_lora_rank_larger_than_the_targets_hold_fails_like_num_params() -> None:
    shapes = [(32, 32), (64, 32)]
    assert allocate_budget(shapes, lora_rank=16) == [16 * 64, 16 * 96]  # r * (out + in) == out * in still fits
    with pytest.raises(ValueError, match=r"lora_rank must be between 1 and 16 .* a \[32, 32\] weight holds 1024\), "
                                         r"got 17"):
        allocate_budget(shapes, lora_rank=17)
    with pytest.raises(ValueError, match=r"num_params must be between 2 .* and 3072 .*, got 3073"):
        allocate_budget(shapes, num_params=3073)


# ------------------------------------------------------------------------------------------------ item 8


def test_a_mistyped_alias_fails_at_once_and_lists_the_aliases() -> None:
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"all-MiniLM-L6-v3: no such model directory, and not a built-in alias "
                                                r"\(all-MiniLM-L6-v2, .*SmolLM2-135M-Instruct.*\); did you mean "
                                                r"'all-MiniLM-L6-v2'\?"):
        resolve_model_path("all-MiniLM-L6-v3")
    assert time.monotonic() - start < 2  # no hub retries


@pytest.mark.parametrize("path", ["/no/such/model/dir", "./no-such-model", "../no/such", "~/no-such-model-dir"])
def test_a_missing_path_says_it_does_not_exist(path: str) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{path}: no such model directory, and not a built-in alias"):
        resolve_model_path(path)


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a model directory"):
        resolve_model_path(str(file))


def test_hub_ids_pass_through_online_and_need_the_cache_offline(tiny_bert_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("sparse_lightning.models.hub_reachable", lambda: True)  # online (unreachable: test_edges_cli)
    assert resolve_model_path("someone/some-model") == "someone/some-model"
    assert resolve_model_path(str(tiny_bert_dir)) == str(tiny_bert_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"someone/some-model: .*not in the Hugging Face cache while "
                                                r"HF_HUB_OFFLINE is set"):
        resolve_model_path("someone/some-model")
    assert all(alias in builtin_aliases() for alias in ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"))


def test_the_datamodule_tokenizer_goes_through_the_same_check() -> None:
    datamodule = GLUEDataModule(task="sst2", tokenizer_name_or_path="all-MiniLM-L6-v3", data_dir="bundled")
    with pytest.raises(FileNotFoundError, match="did you mean 'all-MiniLM-L6-v2'"):
        datamodule.prepare_data()


# ------------------------------------------------------------------------------------------------ item 9


def write_config(tmp_path: Path, model_dir: Path, trainer: dict | None = None, callback: dict | None = None) -> Path:
    sift = {"class_path": "sparse_lightning.callbacks.GradientTopKCallback",
            "init_args": {"density": 0.05, **(callback or {})}}
    return tiny_sst2_config(tmp_path, model_dir, {"max_steps": 2, "logger": False, "enable_checkpointing": False,
                                                  "default_root_dir": str(tmp_path / "root"), **(trainer or {}),
                                                  "callbacks": [sift]})


def test_a_config_error_is_one_line_on_the_command_line(tiny_bert_dir: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    config = write_config(tmp_path, tiny_bert_dir, callback={"density": 0})
    code, err = command_line_error(monkeypatch, capsys, "fit", "--config", str(config))
    assert code == 1
    assert err.strip() == "sparse-lightning: error: density must be in (0, 1], got 0.0"
    assert "Traceback" not in err


def test_a_missing_model_is_one_line_on_the_command_line(tmp_path: Path, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, tmp_path / "no-such-model")
    code, err = command_line_error(monkeypatch, capsys, "fit", "--config", str(config))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "no-such-model: no such model directory, and not a built-in alias" in err


# ------------------------------------------------------------------------------------------------ item 14


@pytest.mark.parametrize("limit", ["max_train_samples", "max_eval_samples"])
def test_a_zero_sample_limit_fails_at_construction(limit: str) -> None:
    with pytest.raises(ValueError, match=rf"{limit} must be a positive number of records \(or null for all of them\), "
                                         "got 0"):
        GLUEDataModule(task="sst2", data_dir="bundled", **{limit: 0})
    with pytest.raises(ValueError, match="max_train_samples must be a positive number"):
        InstructionDataModule(data_files="x.json", max_train_samples=0)


def test_a_run_that_ends_before_its_first_validation_warns(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_bert_dir, trainer={"val_check_interval": 5, "check_val_every_n_epoch": None})
    with pytest.warns(UserWarning, match=r"max_steps=2 \(2 training batches\) ends before the first validation "
                                         r"\(val_check_interval=5 batches\)"):
        cli.main(["fit", "--config", str(config)])


def test_a_run_without_validation_that_would_save_nothing_warns(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_bert_dir, trainer={"limit_val_batches": 0, "check_val_every_n_epoch": None,
                                                             "val_check_interval": 5, "enable_checkpointing": True})
    with pytest.warns(UserWarning, match=r"validation is off \(limit_val_batches=0\) .* this run will save no checkpoint"):
        cli.main(["fit", "--config", str(config)])
    assert not list(tmp_path.rglob("*.ckpt"))  # what the warning says
