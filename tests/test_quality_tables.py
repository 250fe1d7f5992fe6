"""benchmarks/quality.py's GLUE summary: LoRA at the sparse count is its own row and its own reference column, the
gaps are means over the tasks every row has, and the matched plan really trains LoRA r=1 with the pooler. Every run
is its method's shipped MiniLM config plus its overrides, and runs that spelt the same recipe as overrides of the
older base group with the new ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparse_lightning import registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = pytest.importorskip("quality")
CALIBRATION = "trainer.callbacks.0.init_args.calibration_batches"


def result(method: str, task: str, seed: int, value: float, tag: str = "chosen", trainable: int = 1000,
           lr: float | None = None, overrides: dict | None = None) -> dict:
    """A finished run's record as load_results gives it, with the recipe its config trained."""
    spec = quality.RunSpec(task, method, seed, lr=lr, tag=tag, overrides=overrides or {})
    return {"method": method, "task": task, "seed": seed, "tag": tag, "lr": spec.learning_rate,
            "final": {quality.TASKS[task].main: value}, "trainable_params": trainable, "cpu_seconds": 60.0,
            "wall_seconds": 90.0, "recipe": quality.method_recipe(quality.build_config(spec))}


def test_matched_lora_is_a_row_and_a_reference() -> None:
    results = [result("full", t, 42, 0.90) for t in ("mrpc", "rte")]
    results += [result("lora", t, 42, 0.80) for t in ("mrpc", "rte")]
    results += [result("lora", t, 42, 0.70, tag="matched", trainable=190_082) for t in ("mrpc", "rte")]
    results += [result("sift", "mrpc", s, v) for s, v in ((42, 0.74), (43, 0.76))] + [result("sift", "rte", 42, 0.75)]
    table = quality.glue_summary(results, "python benchmarks/quality.py table")
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header.endswith("| vs LoRA | vs LoRA r=1 | vs full |")
    main_table = table.split(header)[1].split("\n\n")[0].splitlines()[2:]
    rows = {line.split(" | ")[0][2:]: line for line in main_table}
    assert rows["lora_matched"].startswith("| lora_matched | 190,082 | 70.0 | 70.0 | 70.0 | -10.0 | +0.0 | -20.0 |")
    assert rows["sift"].endswith("| 75.0 ± 1.4 | 75.0 | 75.0 | -5.0 | +5.0 | -15.0 |")
    assert "glue-lora-matched" in table
    assert "(9 runs, 0.15 core-hours; wall time summed over runs 0.23 h," in table


def test_glue_table_takes_only_the_tables_schedule() -> None:
    plain, longer = result("sift", "cola", 44, 0.05), result("sift", "cola", 44, 0.2)
    tuned = result("sift", "cola", 44, 0.1, tag="calib4", overrides={CALIBRATION: 4})
    longer["max_steps"] = 600
    assert quality.glue_results([plain, longer, tuned]) == [plain]


def test_lora_ranks_plan_gives_rows_r8_and_r16() -> None:
    specs = quality.plan_runs("glue-lora-ranks")
    assert len(specs) == 30 and {s.tag for s in specs} == {"r8", "r16"} and specs[0].task == "cola"
    lora = quality.build_config(specs[1])["model"]["init_args"]["lora"]
    assert (lora["r"], lora["alpha"], lora["modules_to_save"]) == (16, 32, ["classifier", "pooler"])
    rows = quality.glue_results([result("lora", "cola", 42, 0.3, tag="r16", overrides=quality.LORA_RANKS["r16"]),
                                 result("lora", "cola", 42, 0.1, tag="x", overrides={"model.init_args.lora.r": 2})])
    assert [quality.glue_row(r) for r in rows] == ["lora_r16"]
    # a rank under way (CoLA only) is a row without a mean; it does not shrink the others' mean to CoLA
    results = [result(m, t, 42, v) for m, v in (("full", 0.9), ("lora", 0.8)) for t in ("mrpc", "cola")]
    table = quality.glue_summary(results + [result("lora", "cola", 42, 0.5, tag="r16")], "table")
    assert "| lora | 1000 | 80.0 | 80.0 | 80.0 | +0.0 | -10.0 |" in table.replace("1,000", "1000")
    assert "| lora_r16 | 1000 | - | 50.0 | - | - | - |" in table.replace("1,000", "1000")


def test_sparse_rows_are_measured_against_loras_best_rank_task_by_task() -> None:
    """Issue 28's bar: the LoRA row with the highest mean (here r=16) is a reference column, and a second table gives
    every other row's gap to it per task."""
    values = {"lora": (0.80, 0.20), "lora_r16": (0.82, 0.30), "sift": (0.81, 0.24)}
    results = [result(m, t, 42, v) if not m.startswith("lora_") else result("lora", t, 42, v, tag=m[5:])
               for m, pair in values.items() for t, v in zip(("mrpc", "cola"), pair)]
    table = quality.glue_summary(results, "table", {"cola": 600})
    assert "| vs LoRA | vs LoRA's best (lora_r16) |" in table
    assert "| sift | 1,000 | 81.0 | 24.0 | 52.5 | +2.5 | -3.5 |" in table
    gaps = table.split("Per task, points from LoRA's best row (lora_r16;")[1]
    assert "| sift | -1.0 | -6.0 | -3.5 |" in gaps and "| lora | -2.0 | -10.0 | -6.0 |" in gaps
    assert [spec.max_steps for spec in quality.plan_runs("glue-lora-ranks")[:3]] == [600, 600, 300]
    table = quality.glue_summary(results + [result("sift", "cola", 43, 0.26)], "table", {"cola": 600})
    assert "Cells on other than 2 seeds (task, seeds): lora (mrpc 1, cola 1); lora_r16 (mrpc 1, cola 1); sift (mrpc 1)." \
        in table


def test_rows_follow_the_recipe_a_run_trained_not_its_tag() -> None:
    """A recipe tried under a tag and then made the default is its method's row; a run tagged "chosen" under an older
    default is '<method>_before'; one recipe run under two names counts once, the plan's own run first."""
    shipped = quality.fragment("sift")["trainer"]["callbacks"][0]["init_args"]
    tried = result("sift", "mrpc", 42, 0.8, tag="lcount", overrides={CALIBRATION: shipped["calibration_batches"]})
    older = result("sift", "mrpc", 42, 0.7, lr=2 * quality.fragment_lr("sift"))
    again = result("sift", "mrpc", 42, 0.9)
    other = result("sift", "mrpc", 43, 0.6, tag="calib4", overrides={CALIBRATION: 4})
    assert [quality.glue_row(r) for r in (tried, older, again)] == ["sift", "sift_before", "sift"]
    assert quality.glue_results([tried, older, other, again]) == [older, again]
    assert quality.glue_results([tried, older, other]) == [older, tried]
    table = quality.glue_summary([tried, older, result("lora", "mrpc", 42, 0.8)], "table")
    assert "| sift_before | 1,000 | 70.0 | 70.0 | -10.0 |" in table and "`<method>_before` is a method's default" in table
    assert "made under a tag by an earlier plan (the same configs plan `glue` writes now): sift (lcount)." in table


def test_an_argument_left_out_is_the_same_recipe_as_its_default() -> None:
    spelt = result("sift", "rte", 42, 0.5, tag="spelt", overrides={"trainer.callbacks.0.init_args.allocation": "per_weight"})
    assert spelt["recipe"] == result("sift", "rte", 42, 0.5)["recipe"] and quality.at_default(spelt)
    with pytest.raises(SystemExit, match="plan glue-candidates is done and retired"):
        quality.plan_runs("glue-candidates")


def test_matched_plan_trains_rank_one_lora_with_the_pooler() -> None:
    specs = quality.plan_runs("glue-lora-matched")
    assert len(specs) == 15 and {s.method for s in specs} == {"lora"} and {s.tag for s in specs} == {"matched"}
    lora = quality.build_config(specs[0])["model"]["init_args"]["lora"]
    assert (lora["r"], lora["alpha"]) == (1, 2)
    assert lora["modules_to_save"] == ["classifier", "pooler"]


def test_every_plan_run_is_the_shipped_method_config(tmp_path: Path) -> None:
    seeds = {spec.method: spec for spec in quality.plan_runs("glue") if spec.task == "rte" and spec.seed == 43}
    assert list(seeds) == list(quality.METHODS)
    for method, spec in seeds.items():
        shipped = yaml.safe_load(registry.method(method).fragment("minilm").read_text())
        config = quality.build_config(spec, tmp_path)
        assert spec.name == f"rte-{method}-lr{shipped['model']['init_args']['optimizer']['init_args']['lr']:g}-chosen-s43"
        optimizer = config["model"]["init_args"]["optimizer"]
        assert optimizer["init_args"] == {**shipped["model"]["init_args"]["optimizer"]["init_args"], "weight_decay": 0.0}
        assert optimizer["class_path"] == registry.method(method).optimizer
        callbacks = [c for c in config["trainer"]["callbacks"] if c["class_path"].startswith("sparse_lightning")]
        expected = shipped.get("trainer", {}).get("callbacks", [])
        assert [c["class_path"] for c in callbacks] == [c["class_path"] for c in expected]
        for built, recipe in zip(callbacks, expected):
            assert built["init_args"] == {**recipe["init_args"], **({"seed": 43} if "seed" in built["init_args"]
                                                                      else {})}
        assert config["model"]["init_args"].get("lora") == shipped["model"]["init_args"].get("lora")
    assert seeds["s2ft"].overrides == {} and "seed" in quality.build_config(seeds["s2ft"])["trainer"]["callbacks"][0][
        "init_args"]


def test_old_spellings_of_the_chosen_recipe_group_with_the_new() -> None:
    old = {**result("sift", "mrpc", 42, 0.8), "overrides": {"trainer.callbacks.0.init_args.calibration_batches": 8}}
    new = {**result("sift", "mrpc", 43, 0.9), "overrides": {}}
    other = {**result("sift", "mrpc", 44, 0.7, tag="calib4"),
             "overrides": {"trainer.callbacks.0.init_args.calibration_batches": 4}}
    assert quality.recipe_overrides(old) == quality.recipe_overrides(new) == {}
    assert quality.recipe_overrides(other) == other["overrides"]
    lora = {**result("lora", "cola", 42, 0.3, tag="r16"),
            "overrides": {"model.init_args.lora.modules_to_save": ["classifier", "pooler"], **quality.LORA_RANKS["r16"]}}
    assert quality.recipe_overrides(lora) == quality.LORA_RANKS["r16"]


def test_retired_plans_and_unnamed_overrides_say_what_to_do() -> None:
    with pytest.raises(SystemExit, match="plan mrpc-sweep is done and retired: it ran with the recipes of commit"):
        quality.plan_runs("mrpc-sweep")
    with pytest.raises(SystemExit, match="--set changes the recipe: name the change with --tag"):
        quality.main(["list", "--methods", "sift", "--set", "trainer.max_steps=3"])


def test_a_run_records_the_library_it_trains(tmp_path: Path, monkeypatch) -> None:
    """The code id a run resumes with moves with the library only: not with commits to docs or benchmarks."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "sparse_lightning").mkdir()
    (tmp_path / "sparse_lightning" / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "library")
    library = git("rev-parse", "HEAD")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", ".")
    git("commit", "-qm", "docs")
    monkeypatch.setattr(quality, "REPO", tmp_path)
    assert quality.code_snapshot("worktree") == (tmp_path, library)
    (tmp_path / "sparse_lightning" / "a.py").write_text("x = 2\n")
    changed = quality.worktree_code()
    assert changed.startswith(library + "+")
    (tmp_path / "sparse_lightning" / "a.py").write_text("x = 3\n")
    assert quality.worktree_code() not in (library, changed)


def test_the_per_task_schedule_table_takes_each_tasks_own_length() -> None:
    short, long_ = result("sift", "cola", 42, 0.10), result("sift", "cola", 42, 0.20)
    long_["max_steps"] = 600
    mrpc, mrpc_long = result("sift", "mrpc", 42, 0.80), result("sift", "mrpc", 42, 0.70)
    mrpc_long["max_steps"] = 600
    assert quality.glue_results([short, long_, mrpc, mrpc_long], {"cola": 600}) == [long_, mrpc]
    table = quality.glue_summary([long_, mrpc], "table", {"cola": 600})
    assert "300 steps of 32 (cola 600 steps: a per-task schedule, the same for every method; issue 28)" in table
    assert "python benchmarks/quality.py run --plan cola-long" in table


def test_a_plan_does_not_retrain_a_default_done_under_another_name(monkeypatch) -> None:
    shipped = quality.fragment("sift")["trainer"]["callbacks"][0]["init_args"]
    tried = result("sift", "mrpc", 42, 0.8, tag="lcount", overrides={CALIBRATION: shipped["calibration_batches"]})
    other = result("sift", "mrpc", 43, 0.6, tag="calib4", overrides={CALIBRATION: 4})
    monkeypatch.setattr(quality, "load_results", lambda: [{**r, "name": n, "max_steps": 300}
                                                          for r, n in ((tried, "mrpc-sift-tried-s42"),
                                                                       (other, "mrpc-sift-calib4-s43"))])
    specs = [s for s in quality.plan_runs("glue") if s.task == "mrpc" and s.method == "sift"]
    assert quality.done_under_another_name(specs) == {specs[0].name: "mrpc-sift-tried-s42"}


def test_a_cell_with_extra_seeds_says_so() -> None:
    """RTE's extra seeds (issue 28) are named, as a cell with fewer is: the usual count is the plans' seeds."""
    results = [result(m, t, s, 0.5) for m in ("lora", "sift") for t in ("mrpc", "rte") for s in quality.PLAN_SEEDS]
    results += [result(m, "rte", 45, 0.6) for m in ("lora", "sift")]
    table = quality.glue_summary(results, "table")
    assert "Cells on other than 3 seeds (task, seeds): lora (rte 4); sift (rte 4)." in table
    assert "| sift | 1,000 | 50.0 ± 0.0 | 52.5 ± 5.0 | 51.2 |" in table
