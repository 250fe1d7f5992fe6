"""Issue 26, exports and what they are applied to: exports appear whole or not at all (case 2), never into the working
directory by an empty name (3) or over a user's files (4), refuse what they cannot write in one line (15) and a
non-finite model (11); deltas are checked in the dtype they are added in (6, 7), a run from `init_delta` is carried or
refused (8), and a quantized run says so (12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from sparse_lightning import MultiDelta, SequenceClassificationModule
from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.export import DELTA_CONFIG, DELTA_WEIGHTS, DeltaFileError, apply_delta, export_model
from sparse_lightning.export_target import ExportTargetError
from sparse_lightning.peft_interop import ADAPTER_WEIGHTS, PeftExportError, export_peft
from sparse_lightning.sparse import freeze_except, sparse_delta_layers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "sst2_tiny"


def trained_lm(base_dir: Path, scale: float = 0.05) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    RandomMaskCallback(density=0.1).attach(model)
    for layer in sparse_delta_layers(model).values():
        layer.delta_values.data.normal_(0.0, scale)
    freeze_except(model, [])  # only the deltas train
    return model


def files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def run_killed_during_export(base_dir: Path, output: Path, replace: bool) -> subprocess.CompletedProcess:
    """An export in a child that kill -9s itself once the merged weights are written, before the tokenizer."""
    script = textwrap.dedent(f"""
        import os, torch
        from transformers import LlamaForCausalLM
        from sparse_lightning.callbacks import RandomMaskCallback
        import sparse_lightning.borders.export as export
        model = LlamaForCausalLM.from_pretrained({str(base_dir)!r})
        RandomMaskCallback(density=0.1).attach(model)
        export.save_tokenizer = lambda *args: os.kill(os.getpid(), 9)
        export.export_model(model, {str(output)!r}, merged=True, base_model={str(base_dir)!r}
                            {", replace=True" if replace else ""})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------------------- case 2


def test_kill_9_during_a_fresh_export_leaves_no_directory(tiny_lm_dir: Path, tmp_path: Path):
    done = run_killed_during_export(tiny_lm_dir, tmp_path / "out", replace=False)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # not a merged/ with weights and no tokenizer
    assert all(entry.name.startswith(".out.partial-") for entry in tmp_path.iterdir())


def test_kill_9_during_an_export_over_an_earlier_one_leaves_the_earlier_one_whole(tiny_lm_dir: Path, tmp_path: Path):
    export_peft(trained_lm(tiny_lm_dir), tmp_path / "out", base_model=str(tiny_lm_dir))
    before = files(tmp_path / "out")
    done = run_killed_during_export(tiny_lm_dir, tmp_path / "out", replace=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert files(tmp_path / "out") == before  # no new delta beside the old adapter


def test_the_next_export_says_where_a_killed_one_left_its_hidden_directories(tiny_lm_dir: Path, tmp_path: Path):
    done = run_killed_during_export(tiny_lm_dir, tmp_path / "out", replace=False)
    assert done.returncode == -9, done.stderr[-2000:]
    (tmp_path / ".out.old-0badf00d").mkdir()  # what a kill between --replace's two renames leaves
    (tmp_path / ".outer.partial-12345678").mkdir()  # another target's: not named
    with pytest.warns(UserWarning, match=r"interrupted and left \.out\.old-0badf00d, \.out\.partial-") as caught:
        export_peft(trained_lm(tiny_lm_dir), tmp_path / "out", base_model=str(tiny_lm_dir))
    assert ".outer" not in str(caught[0].message)
    assert (tmp_path / ".out.old-0badf00d").is_dir()  # never deleted for the user: it may be their only copy


# ------------------------------------------------------------------------------------------------- cases 3, 4, 15


def test_an_empty_output_is_refused_and_the_working_directory_untouched(tiny_lm_dir: Path, tmp_path: Path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("mine")
    for export in (export_model, export_peft):
        with pytest.raises(ExportTargetError, match='output is empty'):
            export(trained_lm(tiny_lm_dir), "")
    assert files(tmp_path) == {"README.md": b"mine"}


def test_a_non_empty_target_is_refused_unless_replaced_and_then_replaced_whole(tiny_lm_dir: Path, tmp_path: Path):
    model = trained_lm(tiny_lm_dir)
    export_peft(model, tmp_path / "out", base_model=str(tiny_lm_dir))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = files(tmp_path / "out")
    with pytest.raises(ExportTargetError, match=r"out is not empty \(4 entries: .*\).*--replace true"):
        export_model(model, tmp_path / "out")
    assert files(tmp_path / "out") == before
    written = export_model(model, tmp_path / "out", replace=True)
    assert written["delta"] == tmp_path / "out"
    assert set(files(tmp_path / "out")) == {"README.md", DELTA_CONFIG, DELTA_WEIGHTS}  # no adapter left to win
    assert not [entry for entry in tmp_path.iterdir() if entry.name.startswith(".")]
    expected = apply_delta(LlamaForCausalLM.from_pretrained(tiny_lm_dir), tmp_path / "out").state_dict()
    assert all(torch.equal(expected[name], value) for name, value in
               apply_delta(LlamaForCausalLM.from_pretrained(tiny_lm_dir), tmp_path / "out").state_dict().items())


def test_replacing_the_directory_holding_the_working_directory_or_checkpoint_is_refused(tiny_lm_dir, tmp_path,
                                                                                        monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(ExportTargetError, match="holds the working directory"):
        export_model(trained_lm(tiny_lm_dir), ".", replace=True)
    from sparse_lightning.export import export_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportTargetError, match="holds .*last.ckpt"):
        export_checkpoint(tmp_path / "run" / "last.ckpt", tmp_path / "run", replace=True)
    assert (tmp_path / "run" / "last.ckpt").read_bytes() == b"x"


def test_an_output_naming_a_file_is_refused_in_one_line(tiny_lm_dir: Path, tmp_path: Path):
    (tmp_path / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ExportTargetError, match="last.ckpt is a file, not a directory"):
        export_model(trained_lm(tiny_lm_dir), tmp_path / "last.ckpt")


def test_a_read_only_target_is_refused_in_one_line(tiny_lm_dir: Path, tmp_path: Path, monkeypatch):
    (tmp_path / "locked").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse as a read-only file system would
        def read_only(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ExportTargetError, match="cannot write the export to .*locked/out: Permission denied"):
        export_model(trained_lm(tiny_lm_dir), tmp_path / "locked" / "out")


def test_a_full_disk_fails_in_one_line_and_leaves_nothing(tiny_lm_dir: Path, tmp_path: Path, monkeypatch):
    import sparse_lightning.borders.delta as delta_format

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(delta_format, "save_file", full)
    with pytest.raises(ExportTargetError, match="cannot write the export to .*out: .*No space left on device"):
        export_model(trained_lm(tiny_lm_dir), tmp_path / "out")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------- case 11


def test_a_non_finite_frozen_base_is_not_exported_merged(tiny_lm_dir: Path, tmp_path: Path):
    model = trained_lm(tiny_lm_dir)
    model.model.norm.weight.data[0] = float("nan")  # frozen, outside any delta
    with pytest.raises(ValueError, match=r"refusing to write the merged model: model.norm.weight holds 1 non-finite"):
        export_model(model, tmp_path / "out", merged=True)
    with pytest.raises(ValueError, match="refusing to write the merged model"):
        export_peft(model, tmp_path / "out", merged=True)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------- case 6


def delta_with_values(tiny_lm_dir: Path, tmp_path: Path, value: float, dtype: torch.dtype) -> Path:
    export_model(trained_lm(tiny_lm_dir), tmp_path / "delta")
    tensors = load_file(str(tmp_path / "delta" / DELTA_WEIGHTS))
    key = next(key for key in sorted(tensors) if key.endswith(".values"))
    tensors[key] = tensors[key].to(dtype)
    tensors[key][0] = value
    save_file(tensors, str(tmp_path / "delta" / DELTA_WEIGHTS))
    return tmp_path / "delta"


def test_float64_values_that_overflow_fp32_are_refused_by_every_reader(tiny_lm_dir: Path, tmp_path: Path):
    directory = delta_with_values(tiny_lm_dir, tmp_path, 1e300, torch.float64)
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(DeltaFileError, match=r"holds 1 non-finite value\(s\) in fp32, the dtype deltas are added in"):
        apply_delta(model, directory)
    with pytest.raises(DeltaFileError, match="in fp32"):
        MultiDelta(model).load("big", directory)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_float64_values_in_a_peft_shira_adapter_are_refused(tiny_lm_dir: Path, tmp_path: Path):
    export_peft(trained_lm(tiny_lm_dir), tmp_path / "peft")
    tensors = load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    key = next(key for key in sorted(tensors) if key.endswith("shira_weight"))
    tensors[key] = tensors[key].double()
    tensors[key][0] = 1e300
    save_file(tensors, str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    with pytest.raises(DeltaFileError, match=f"{key}.*non-finite value\\(s\\) in fp32"):
        apply_delta(LlamaForCausalLM.from_pretrained(tiny_lm_dir), tmp_path / "peft")


def test_values_that_overflow_a_half_precision_weight_are_refused(tiny_lm_dir: Path, tmp_path: Path):
    directory = delta_with_values(tiny_lm_dir, tmp_path, 1e6, torch.float32)  # finite in fp32, inf in fp16
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float16)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(DeltaFileError, match="would make 1 entries of .* non-finite in float16"):
        apply_delta(model, directory)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


# ------------------------------------------------------------------------------------------------- case 7


def test_fusion_weights_that_overflow_fp32_are_refused(tiny_lm_dir: Path, tmp_path: Path):
    export_model(trained_lm(tiny_lm_dir, scale=1.0), tmp_path / "a")
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    multi = MultiDelta(model).load("a", tmp_path / "a").load("b", tmp_path / "a")
    with pytest.raises(ValueError, match=r"within fp32's range .*got \[1e\+39, 1.0\]"):
        multi.fuse(["a", "b"], as_name="ab", weights=[1e39, 1.0])
    with pytest.raises(ValueError, match=r"would make \d+ entries of .* non-finite in float32: use smaller weights"):
        multi.fuse(["a", "b"], as_name="ab", weights=[3e38, 3e38])  # each finite, their sum is not
    assert multi.names == ["a", "b"]


# ------------------------------------------------------------------------------------------------- case 8


@pytest.fixture(scope="module")
def init_run(tiny_lm_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """A 2-step fit started from an init_delta, its checkpoint and both its exports."""
    from datamodules.reasoning import MathDataModule
    from sparse_lightning import CausalLMModule

    root = tmp_path_factory.mktemp("init-run")
    export_model(trained_lm(tiny_lm_dir, scale=0.2), root / "init")
    records = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}."}
               for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    (root / "train.json").write_text(json.dumps(records * 4))
    (root / "dataset" / "AddSub").mkdir(parents=True)
    (root / "dataset" / "AddSub" / "test.json").write_text(json.dumps([{**records[0], "answer": "3"}]))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                         enable_checkpointing=False, callbacks=[RandomMaskCallback(density=0.05)])
    data = MathDataModule(data_dir=str(root), train_files="train.json", tokenizer_name_or_path=str(tiny_lm_dir),
                          eval_datasets=["AddSub"], max_length=64, batch_size=4, val_fraction=0.0)
    trainer.fit(CausalLMModule(str(tiny_lm_dir), init_delta=str(root / "init"),
                               optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2)), datamodule=data)
    trainer.save_checkpoint(root / "run.ckpt")
    from sparse_lightning.export import export_checkpoint

    export_checkpoint(root / "run.ckpt", root / "out", merged=True)
    return {"root": root, "ckpt": root / "run.ckpt", "out": root / "out", "init": root / "init"}


def test_apply_delta_of_a_run_from_init_delta_carries_it(init_run, tiny_lm_dir: Path):
    ids = torch.tensor([[5, 17, 33, 90, 120, 7, 64, 201]])
    merged = AutoModelForCausalLM.from_pretrained(init_run["out"] / "merged").eval()
    applied = apply_delta(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), init_run["out"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(applied(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_a_missing_init_delta_is_refused_in_one_line(init_run, tiny_lm_dir: Path, tmp_path: Path):
    config = json.loads((init_run["out"] / DELTA_CONFIG).read_text())
    directory = tmp_path / "moved"
    directory.mkdir()
    (directory / DELTA_WEIGHTS).write_bytes((init_run["out"] / DELTA_WEIGHTS).read_bytes())
    (directory / DELTA_CONFIG).write_text(json.dumps({**config, "init_delta": str(tmp_path / "gone")}))
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(DeltaFileError, match="trained from init_delta .*gone .*not a directory here"):
        apply_delta(model, directory)
    with pytest.raises(ValueError, match="was trained from init_delta .*load that too and fuse them"):
        MultiDelta(model).load("run", init_run["out"])
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_peft_export_of_a_run_from_init_delta_is_refused(init_run, tmp_path: Path):
    from sparse_lightning.peft_interop import export_checkpoint_peft

    with pytest.raises(PeftExportError, match="started from init_delta .*cannot carry"):
        export_checkpoint_peft(init_run["ckpt"], tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------------------------- case 12


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_quantized_runs_delta_records_it_and_warns_when_applied(tiny_bert_dir: Path, tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    from datamodules.glue import GLUEDataModule

    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(tiny_bert_dir), quantize="nf4",
                                          optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    data = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(tiny_bert_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=16, max_length=32)
    pl.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
               callbacks=[RandomMaskCallback(density=0.05)], enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=str(tmp_path)).fit(module, data)
    written = export_model(module, tmp_path / "out")
    assert json.loads((written["delta"] / DELTA_CONFIG).read_text())["quantize"] == "nf4"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_delta(base, written["delta"])
    assert any("trained on a nf4-quantized base" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="trained on a nf4-quantized base, which a PEFT adapter cannot record"):
        export_peft(module, tmp_path / "peft")
