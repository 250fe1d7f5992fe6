"""The figures of `sparse_lightning.plots` (`sparse-lightning plot ...`): each writes a non-empty PNG whose drawn
data is what was measured, the quasi-sparsity shares match a hand computation and the dense gradient, the
selection map matches S2FT's own selection, and a missing matplotlib is one line naming the pip command."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from sparse_lightning.cli import main
from sparse_lightning.methods.s2ft import S2FT
from sparse_lightning.plots import (
    gradient_magnitudes,
    mass_shares,
    plot_curves,
    plot_quasi_sparsity,
    plot_selection_map,
    quasi_sparsity,
    read_metrics,
    selection_from_file,
    selection_matrices,
    weight_type,
)
from sparse_lightning.plots.curves import running_mean
from sparse_lightning.plots.pyplot import MissingMatplotlib, pyplot
from sparse_lightning.plots.selection_map import display_matrix
from sparse_lightning.sparse import SparseDeltaLinear

pytest.importorskip("matplotlib")

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"
BERT_TYPES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]


def write_metrics(path: Path, losses: list[float], accuracies: list[float]) -> Path:
    """A CSVLogger-style metrics.csv: a train row every 10 steps, a validation row every 20."""
    path.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,step,train/loss,val/accuracy,val/loss"]
    for i, loss in enumerate(losses):
        rows.append(f"0,{10 * i + 9},{loss},,")
        if i % 2 == 1:
            rows.append(f"0,{10 * i + 9},,{accuracies[i // 2]},{1 - accuracies[i // 2]}")
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    return path


def png_written(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_draw_every_run_on_every_metric(tmp_path: Path) -> None:
    a = write_metrics(tmp_path / "a", [0.9, 0.7, 0.6, 0.4], [0.6, 0.8])
    write_metrics(tmp_path / "b" / "version_0", [0.8, 0.8, 0.5, 0.5], [0.7, 0.75])
    runs = [read_metrics(a, "sift"), read_metrics(tmp_path / "b")]  # b: the metrics.csv below the folder
    assert runs[1].label == "b" and runs[0].metrics["val/accuracy"] == [(19, 0.6), (39, 0.8)]
    figure = plot_curves(runs, tmp_path / "curves.png", smooth=2)
    assert png_written(tmp_path / "curves.png")
    panels = {ax.get_title().split(" ")[0]: ax for ax in figure.axes if ax.get_visible()}
    assert list(panels) == ["train/loss", "val/accuracy", "val/loss"]
    assert all(len(ax.lines) == 2 for ax in panels.values())
    assert [line.get_label() for line in panels["val/accuracy"].lines] == ["sift", "b"]
    assert list(panels["val/accuracy"].lines[1].get_ydata()) == [0.7, 0.75]
    assert list(panels["train/loss"].lines[0].get_ydata()) == pytest.approx([0.9, 0.8, 0.65, 0.5])  # mean of 2
    assert running_mean([1.0, 2.0, 3.0, 4.0], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0])


def test_curves_command(tmp_path: Path, capsys) -> None:
    write_metrics(tmp_path / "run", [0.9, 0.7], [0.6])
    main(["plot", "curves", "LoRA r=5=" + str(tmp_path / "run" / "metrics.csv"), str(tmp_path / "run"),
          "--output", str(tmp_path / "out" / "c.png")])
    assert png_written(tmp_path / "out" / "c.png") and "wrote" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        main(["plot", "curves", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")])


def test_mass_shares_match_a_hand_computation() -> None:
    magnitudes = torch.tensor([[1.0, -4.0], [2.0, 3.0]])  # sorted |.|: 4 3 2 1, total 10
    shares = mass_shares(magnitudes, [0.25, 0.3, 0.5, 1.0])  # top 1, ceil(1.2) = 2, 2, 4 entries
    assert shares.tolist() == pytest.approx([0.4, 0.7, 0.7, 1.0])
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        mass_shares(magnitudes, [0.0])
    assert weight_type("bert.encoder.layer.11.attention.self.query") == "attention.self.query"
    assert weight_type("model.layers.0.mlp.down_proj") == "mlp.down_proj"


def batches(tokens: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1000, 2000, (4, tokens), generator=generator),
             "attention_mask": torch.ones(4, tokens, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}
            for _ in range(2)]


def test_gradient_magnitudes_are_the_summed_dense_gradient(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).train()
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    for batch in batches():
        reference(**batch).loss.backward()
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    magnitudes = gradient_magnitudes(model, batches(), lambda batch: model(**batch).loss)

    assert len(magnitudes) == 2 * len(BERT_TYPES)
    for name, values in magnitudes.items():
        dense = reference.get_submodule(name).weight.grad.abs()
        torch.testing.assert_close(values, dense, rtol=1e-4, atol=1e-7)
    assert not any(isinstance(m, SparseDeltaLinear) for m in model.modules())  # the model comes back as it was
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training

    fractions = [0.001, 0.01, 0.1, 0.5, 1.0]
    shares = quasi_sparsity(magnitudes, fractions)
    assert list(shares) == BERT_TYPES
    for kind, values in shares.items():
        assert bool((values[1:] >= values[:-1]).all()) and float(values[-1]) == pytest.approx(1.0)
        pooled = torch.cat([v.flatten() for n, v in magnitudes.items() if weight_type(n) == kind])
        top = pooled.sort(descending=True).values[: len(pooled) // 2].sum() / pooled.sum()
        assert float(values[3]) == pytest.approx(float(top), rel=1e-6)  # the top half
    figure = plot_quasi_sparsity(shares, tmp_path / "q.png", fractions)
    assert png_written(tmp_path / "q.png")
    lines = figure.axes[0].lines
    assert [line.get_label() for line in lines] == BERT_TYPES + ["uniform (share = x)"]
    assert list(lines[0].get_ydata()) == pytest.approx(shares[BERT_TYPES[0]].tolist())
    assert list(lines[0].get_xdata()) == pytest.approx([100 * f for f in fractions])


def test_llama_weight_types_are_the_seven_projections(tiny_lm_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    magnitudes = gradient_magnitudes(model, [{"input_ids": ids, "labels": ids}], lambda batch: model(**batch).loss)
    shares = quasi_sparsity(magnitudes, [0.01, 1.0])
    assert list(shares) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert all(float(v[1]) == pytest.approx(1.0) and 0 < float(v[0]) < 1 for v in shares.values())


def config_args(model_dir: Path) -> list[str]:
    return ["--model.class_path", "sparse_lightning.modules.SequenceClassificationModule",
            "--model.init_args.model_name_or_path", str(model_dir),
            "--data.class_path", "datamodules.glue.GLUEDataModule", "--data.init_args.task", "sst2",
            "--data.init_args.train_file", str(DATA / "train.tsv"),
            "--data.init_args.validation_files", json.dumps([str(DATA / "dev.tsv")]),
            "--data.init_args.batch_size", "8", "--data.init_args.max_length", "32"]


def test_quasi_sparsity_command_prints_the_shares(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    main(["plot", "quasi-sparsity", *config_args(tiny_bert_dir), "--batches", "2",
          "--target_modules", "query", "output.dense", "--output", str(tmp_path / "q.png")])
    out = capsys.readouterr().out
    assert png_written(tmp_path / "q.png")
    rows = [line for line in out.splitlines() if line.startswith("| attention") or line.startswith("| output")]
    assert [row.split(" | ")[0] for row in rows] == ["| attention.self.query", "| attention.output.dense",
                                                     "| output.dense"]
    shares = [float(x) for x in rows[0].strip(" |").split(" | ")[2:]]  # top 0.1%, 1%, 5%, 10%
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] <= 1


def test_selection_map_matches_the_s2ft_selection(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    saved = tmp_path / "selection.json"
    S2FT(train=["o", "down"], num_heads=1, num_channels=3, save_selection=str(saved)).attach(model)
    groups = json.loads(saved.read_text())["groups"]
    matrices = selection_matrices(model)
    assert {kind: tuple(m.shape) for kind, m in matrices.items()} == {"heads": (2, 4), "channels": (2, 64)}
    for kind, matrix in matrices.items():
        expected = [sorted(entry["units"]) for entry in groups.values() if entry["kind"] == kind]
        assert [row.nonzero().flatten().tolist() for row in matrix] == expected
    from_file = selection_from_file(saved, str(tiny_bert_dir))
    assert all(torch.equal(from_file[kind], matrices[kind]) for kind in matrices)

    figure = plot_selection_map(matrices, tmp_path / "map.png")
    assert png_written(tmp_path / "map.png")
    drawn = [ax.images[0].get_array() for ax in figure.axes]
    assert [d.shape for d in drawn] == [(2, 4), (2, 64)] and [float(d.sum()) for d in drawn] == [2.0, 6.0]
    binned, size = display_matrix(torch.zeros(2, 3201, dtype=torch.bool).index_fill_(1, torch.tensor([3200]), True))
    assert size == 3 and binned.shape == (2, 1067) and binned[0, -1] == pytest.approx(1 / 3)


def test_selection_map_of_a_value_block_under_gqa(tiny_lm_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    S2FT(train=["v"], num_heads=2, seed=1).attach(model)  # one whole KV group of 2 query heads per layer
    heads = selection_matrices(model)["heads"]
    assert heads.shape == (2, 4) and heads.sum(dim=1).tolist() == [2, 2]
    assert all(row.nonzero().flatten().tolist() in ([0, 1], [2, 3]) for row in heads)


def test_selection_map_command_from_configs_and_from_a_file(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "sel.json"
    main(["plot", "selection-map", *config_args(tiny_bert_dir),
          "--trainer.callbacks+=sparse_lightning.callbacks.S2FTStructureCallback",
          "--trainer.callbacks.num_channels=5", "--trainer.callbacks.train=[down]",
          "--trainer.callbacks.select_by=gradient", f"--trainer.callbacks.save_selection={saved}",
          "--output", str(tmp_path / "a.png")])
    printed = capsys.readouterr().out
    assert png_written(tmp_path / "a.png") and "channels: layer 0: [" in printed and "heads" not in printed
    main(["plot", "selection-map", "--selection", str(saved), "--model", str(tiny_bert_dir),
          "--output", str(tmp_path / "b.png")])
    assert png_written(tmp_path / "b.png")
    assert capsys.readouterr().out.splitlines()[0] == printed.splitlines()[0]
    with pytest.raises(ValueError, match="needs --model"):
        main(["plot", "selection-map", "--selection", str(saved), "--output", str(tmp_path / "c.png")])


def test_selection_map_command_from_a_checkpoint(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    """A trained and reloaded S2FT model (weights co-permuted, blocks at original positions) maps to the units the
    callback selected."""
    import lightning.pytorch as pl

    from datamodules.glue import GLUEDataModule
    from sparse_lightning.callbacks import S2FTStructureCallback
    from sparse_lightning.modules import SequenceClassificationModule

    saved = tmp_path / "sel.json"
    callback = S2FTStructureCallback(train=["o", "v", "down"], num_heads=2, num_channels=4, select_by="activation",
                                     calibration_batches=1, save_selection=str(saved))
    data = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(tiny_bert_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=16, max_length=32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(SequenceClassificationModule(str(tiny_bert_dir)), data)
    trainer.save_checkpoint(tmp_path / "s2ft.ckpt")
    main(["plot", "selection-map", "--ckpt_path", str(tmp_path / "s2ft.ckpt"), "--output", str(tmp_path / "m.png")])
    printed = capsys.readouterr().out
    assert png_written(tmp_path / "m.png")
    groups = list(json.loads(saved.read_text())["groups"].values())
    for kind in ("heads", "channels"):
        of_kind = [entry for entry in groups if entry["kind"] == kind]
        expected = "; ".join(f"layer {i}: {sorted(entry['units'])}" for i, entry in enumerate(of_kind))
        assert f"{kind}: {expected}" in printed


def test_missing_matplotlib_is_one_line_with_the_pip_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingMatplotlib, match=r"pip install 'sparse-lightning\[plot\]'"):
        pyplot("the curves")
    write_metrics(tmp_path / "run", [0.9], [])
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "curves", str(tmp_path / "run"), "--output", str(tmp_path / "c.png")])
    message = str(exit_info.value.code)
    assert "\n" not in message and message.endswith("needs matplotlib: pip install 'sparse-lightning[plot]'")
