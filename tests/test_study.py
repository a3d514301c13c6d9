"""The study: engine (keys, resume, failures, pruning), config, unit graph, plan, report, kill and resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sftlens.errors import SftlensError
from sftlens.study.engine.commands import plan, run_study
from sftlens.study.engine.config import load_study_config
from sftlens.study.engine.db import StudyDB
from sftlens.study.engine.executors import LocalExecutor
from sftlens.study.engine.scheduler import Unit, run_units, unit_dir
from sftlens.study.engine.units import build_units
from sftlens.study.report.results import load_results

from assets import assert_same_results, comparable, tiny_study_file, write_config

# --- the engine on a small graph of arithmetic units ------------------------------------------


def add_unit(params, out: Path, deps) -> dict:
    """value = x + the dependencies' values; logs each execution; writes a droppable artefact."""
    if params.get("fail"):
        raise SftlensError(f"unit {params['name']} was told to fail")
    with open(params["log"], "a") as f:
        f.write(params["name"] + "\n")
    value = params["x"] + sum(d["result"]["value"] for d in deps.values())
    for d in deps.values():
        assert (Path(d["dir"]) / "weights.bin").is_file(), "a dependency's artefact must exist while it is read"
    (out / "weights.bin").write_bytes(b"w" * 8)
    return {"value": value}


def diamond(log: Path, b_x: int = 2, fail_c: bool = False, extra: bool = False) -> list[Unit]:
    def unit(name, x, deps=None, fail=False):
        params = {"name": name, "x": x, "log": str(log), **({"fail": True} if fail else {})}
        return Unit("add", name, "test_study:add_unit", params, deps or {}, prune=("weights.bin",))

    a = unit("a", 1)
    b = unit("b", b_x, {"up": a.key})
    c = unit("c", 3, {"up": a.key}, fail=fail_c)
    d = unit("d", 4, {"left": b.key, "right": c.key})
    units = [a, b, c, d]
    if extra:
        units.append(unit("e", 5, {"up": b.key}))
    return units


def executions(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def values(study: Path) -> dict[str, int]:
    with StudyDB(study) as db:
        return {u["label"]: u["result"]["value"] for u in db.planned_units() if u["result"]}


def test_engine_runs_in_dependency_order_and_skips_done_units(tmp_path):
    log = tmp_path / "log"
    summary = run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    assert summary.ran == ["a", "b", "c", "d"] and not summary.failed
    assert values(tmp_path / "s") == {"a": 1, "b": 3, "c": 4, "d": 4 + 3 + 4}
    again = run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    assert again.ran == [] and again.skipped == 4
    assert executions(log) == ["a", "b", "c", "d"]


def test_edited_settings_recompute_only_the_affected_units(tmp_path):
    log = tmp_path / "log"
    run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    summary = run_units(diamond(log, b_x=10), tmp_path / "s", LocalExecutor(1), progress=False)
    assert summary.ran == ["b", "d"]
    assert values(tmp_path / "s") == {"a": 1, "b": 11, "c": 4, "d": 19}


def test_a_failed_unit_blocks_its_dependents_and_is_retried_next_run(tmp_path):
    log = tmp_path / "log"
    units = diamond(log, fail_c=True)
    summary = run_units(units, tmp_path / "s", LocalExecutor(1), progress=False)
    error_log = unit_dir(tmp_path / "s", units[2]) / "error.log"
    assert summary.failed == {"c": f"c (add stage): unit c was told to fail [traceback: {error_log}]"}
    assert "Traceback" in error_log.read_text() and "add_unit" in error_log.read_text()
    assert summary.ran == ["a", "b"]
    with StudyDB(tmp_path / "s") as db:
        states = {u["label"]: u["state"] for u in db.planned_units()}
    assert states == {"a": "done", "b": "done", "c": "failed", "d": "pending"}
    fixed = run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    assert fixed.ran == ["c", "d"] and not fixed.failed


def test_pruning_drops_artefacts_once_dependents_are_done_and_recomputes_when_needed(tmp_path):
    log = tmp_path / "log"
    units = diamond(log)
    summary = run_units(units, tmp_path / "s", LocalExecutor(1), prune=True, progress=False)
    assert set(summary.pruned) == {"a", "b", "c", "d"}
    assert not any((unit_dir(tmp_path / "s", u) / "weights.bin").exists() for u in units)
    assert values(tmp_path / "s")["d"] == 11  # results stay
    # a new dependent of b needs b's artefact again, and b needs a's: both are recomputed, c and d not
    more = run_units(diamond(log, extra=True), tmp_path / "s", LocalExecutor(1), prune=True, progress=False)
    assert more.ran == ["a", "b", "e"]
    assert values(tmp_path / "s")["e"] == 5 + 3


def test_a_process_pool_gives_the_same_results(tmp_path):
    log = tmp_path / "log"
    executor = LocalExecutor(2)
    try:
        summary = run_units(diamond(log), tmp_path / "pool", executor, progress=False)
    finally:
        executor.close()
    run_units(diamond(tmp_path / "log2"), tmp_path / "seq", LocalExecutor(1), progress=False)
    assert sorted(summary.ran) == ["a", "b", "c", "d"]
    assert values(tmp_path / "pool") == values(tmp_path / "seq")
    assert sorted(executions(log)) == ["a", "b", "c", "d"]


# --- config and plan ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('[study]\nmodle = "x"\n', "unknown setting study.modle"),
    ('[train]\nlearning_rate = "fast"\n', "train.learning_rate: expected a number, got 'fast'"),
    ('[probe]\nsamples = 1.5\n', "probe.samples: expected an integer"),
    ('[trian]\nepochs = 1\n', "unknown section or key 'trian'"),
    ('[study]\nsizes = [16]\nanalysis_sizes = [32]\n', "analysis_sizes [32] are not among sizes [16]"),
    ('[study]\nkl_test_set = "level4"\n', "kl_test_set must be in, out or"),
    ('[split]\nsizes = [8]\n', "split.sizes has no effect in a study"),
    ('[study]\nlora_learning_rates = [1e-4, 0]\n', "lora_learning_rates must be positive, got [0.0001, 0.0]"),
    ('[study]\nlora_learning_rates = [1e-4]\n[train]\nmethod = "lora"\n', "train.method is already 'lora'"),
    ('[study]\nlora_learning_rates = [1e-4]\n[repairs]\nwise = { values = [0.5, 0.7] }\n',
     "study.lora_learning_rates: 1 values, but repairs.wise.values has 2"),
])
def test_bad_study_files_name_the_key(tmp_path, text, message):
    with pytest.raises(SftlensError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_study_config(str(write_config(tmp_path / "s.toml", 'extends = "demo"\n' + text)))


def test_extends_names_an_existing_preset_or_file(tmp_path):
    with pytest.raises(SftlensError, match="nope: no such study file"):
        load_study_config(str(write_config(tmp_path / "s.toml", 'extends = "nope"\n')))


def test_a_study_file_extends_a_preset_and_overrides_single_keys(tmp_path):
    config = load_study_config(str(write_config(tmp_path / "s.toml", 'extends = "demo"\n[train]\nepochs = 2\n')))
    demo = load_study_config("demo")
    assert config.stages["train"].epochs == 2.0
    assert config.stages["train"].batch_size == demo.stages["train"].batch_size
    assert config.study == demo.study


def test_the_paper_plan_lists_the_full_grid_without_running_anything(shared_data_dir, tmp_path):
    units = build_units(load_study_config("paper"), shared_data_dir)
    kinds = {}
    for unit in units:
        kinds[unit.kind] = kinds.get(unit.kind, 0) + 1
    trained = (5 + 1) * 7 * 5  # (5 levels + mixed) x (6 sizes + All) x 5 seeds
    analysed = 5 * 2 * 5  # levels x {240, 1920} x seeds
    assert kinds == {"probe": 1, "split": 1, "eval": 1 + trained, "train": trained, "kl": trained,
                     "deltas": analysed, "restore": analysed, "control": analysed}
    text = plan(load_study_config("paper"), tmp_path / "paper", str(shared_data_dir))
    assert f"{len(units)} units, {len(units)} to run" in text
    assert not (tmp_path / "paper").exists()


# --- a tiny-model study, end to end ----------------------------------------------------------

def test_a_tiny_study_runs_every_unit_once(tiny_study):
    _, study = tiny_study
    units = load_results(study).units
    assert {u["state"] for u in units} == {"done"}
    assert {u["runs"] for u in units} == {1}
    kinds = sorted({u["kind"] for u in units})
    assert kinds == ["control", "deltas", "eval", "kl", "lora", "lora-eval", "probe", "repair", "repaired", "restore",
                     "split", "train"]
    assert not list(study.glob("units/train/*/model")), "prune_checkpoints drops fine-tuned weights"
    assert not list(study.glob("units/lora/*/model")), "and the LoRA models once scored"
    controls = [u["result"] for u in units if u["kind"] == "control"]
    assert controls and all(c["ratio"] in (10.0, 50.0) and c["records"] for c in controls), "random control ran"


def test_the_eval_batch_size_is_a_runtime_value_outside_every_key(tiny_study, tmp_path):
    config_file, study = tiny_study
    edited = write_config(tmp_path / "batch.toml", config_file.read_text().replace(
        "[eval]\nmax_new_tokens = 4", "[eval]\nmax_new_tokens = 4\nbatch_size = 3"))
    assert "0 to run" in plan(load_study_config(str(edited)), study)


def test_an_edited_config_recomputes_only_what_changed(tiny_study, tmp_path):
    config_file, study = tiny_study
    edited = write_config(tmp_path / "edited.toml", config_file.read_text().replace(
        "[eval]\nmax_new_tokens = 4", "[eval]\nmax_new_tokens = 3"))
    text = plan(load_study_config(str(edited)), study, listing=True)
    to_run = {line.split()[0] for line in text.splitlines() if line.startswith(("eval ", "restore ", "control ", "train "))}
    # evaluation changed: evaluations and sweeps re-run, and the pruned models they read are retrained
    assert to_run == {"eval", "restore", "control", "train"}
    assert "| probe | 1 | 0 |" in text and "| kl | 4 | 0 |" in text and "| deltas | 2 | 0 |" in text


def test_the_report_regenerates_from_the_database_alone(tiny_study, tmp_path):
    import shutil

    from sftlens.study.report.page import write_report

    _, study = tiny_study
    copy = tmp_path / "only-db"
    copy.mkdir()
    shutil.copy(study / "study.db", copy / "study.db")
    paths = write_report(copy)
    markdown = paths["markdown"].read_text()
    for title in ("Findings", "Table 1:", "Figure 2:", "Table 2:", "Figure 4:", "Figure 5:", "Table 3:", "Table 4:",
                  "Table 5:", "Table 6:", "Restoration ratio chosen on dev"):
        assert f"\n## {title}" in markdown, title
    assert markdown.index("## Findings") < markdown.index("## Table 1")
    for claim in ("C1", "C2", "C3", "C4", "C5", "C6"):
        assert f"| {claim} |" in markdown
    assert "| n (test facts) |" in markdown and "artefact check" in markdown
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 5  # figures 2, 4, 5, the restoration curve, the repairs
    repairs = markdown[markdown.index("## Repair methods"):]
    assert "2 per model" in repairs  # the tuning budget is stated
    for row in ("| plain SFT |", "| wise | alpha = ", "| dare | p = "):
        assert row in repairs
    assert " ± " in markdown
    assert "D_train-0" in markdown and "mixed" in markdown


def test_the_lora_arm_trains_on_the_same_sets_and_its_rate_is_chosen_on_dev(tiny_study):
    from sftlens.evaluate import acc_of
    from sftlens.study.report.page import write_report

    _, study = tiny_study
    results = load_results(study)
    keys = results.by_key()
    loras = [u for u in results.units if u["kind"] == "lora"]
    full = {(u["spec"]["params"]["set"], u["spec"]["params"]["seed"]): u for u in results.units if u["kind"] == "train"}
    assert len(loras) == 4  # 2 seeds x 2 rates
    for unit in loras:
        recipe = unit["spec"]["params"]["train"]
        twin = full[unit["spec"]["params"]["set"], unit["spec"]["params"]["seed"]]
        assert recipe["method"] == "lora" and recipe["lora_rank"] == 16
        assert "method" not in twin["spec"]["params"]["train"]  # full-SFT keys are those from before LoRA
        assert unit["result"]["train_set"] == twin["result"]["train_set"]
    dev_acc: dict[float, list[float]] = {}
    for unit in results.done("lora-eval"):
        rate = keys[unit["spec"]["deps"]["model"]]["spec"]["params"]["train"]["learning_rate"]
        dev = [r for r in unit["result"]["records"] if r["split"] == "dev" and r["domain"] == "in"]
        dev_acc.setdefault(rate, []).append(acc_of(dev, "in"))
    assert sorted(dev_acc) == [1e-3, 1e-2] and all(len(v) == 2 for v in dev_acc.values())
    best = max(sorted(dev_acc), key=lambda rate: sum(dev_acc[rate]) / 2)
    markdown = write_report(study)["markdown"].read_text()
    rows = [line for line in markdown.splitlines() if "| LoRA SFT (r=16, alpha=32) |" in line]
    assert len(rows) == 1 and f"| lr = {best:g} (tuned on dev among 0.001 / 0.01) | 2 |" in rows[0]
    assert "| plain SFT | lr = 0.001 (fixed: [train]'s, not tuned) |" in markdown  # full SFT's rate, untuned
    assert rows[0].count(" [") == 3, "gains over plain SFT with intervals, in- and out-of-domain and training set"


def _run_until(config_file: Path, out: Path, stop_after: int) -> dict[str, int]:
    """Start `study run` in a subprocess, SIGKILL it once `stop_after` units are done (or it ends);
    return the units done by then, with the number of times each was started."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "sftlens", "study", "run", str(config_file), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done: set[str] = set()
    while time.time() < deadline and len(done) < stop_after and proc.poll() is None:
        time.sleep(0.1)
        if (out / "study.db").is_file():
            with StudyDB(out) as db:
                done = {k for k, s in db.states().items() if s["state"] == "done"}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with StudyDB(out) as db:
        return {k: s["runs"] for k, s in db.states().items() if s["state"] == "done"}


def test_a_study_killed_at_random_points_ends_as_an_uninterrupted_run(tiny_study, tmp_path):
    import random

    from sftlens.study.report.page import write_report

    config_file, reference = tiny_study
    out = tmp_path / "killed"
    total = len(load_results(reference).units)
    # Kills land in the first two thirds: the last units take milliseconds, and a kill aimed near the end,
    # sent a poll (0.1 s) after its point, finds the whole study done.
    kill_points = sorted(random.Random(12).sample(range(2, 2 * total // 3), 3))
    done_before: dict[str, int] = {}  # finished unit -> times it was started (> 1: killed in flight before)
    for point in kill_points:
        done = _run_until(config_file, out, point)
        assert all(done.get(k) == runs for k, runs in done_before.items()), "a finished unit was redone"
        done_before = done
    assert 0 < len(done_before) < total, "the kills must land midway"
    summary = run_study(load_study_config(str(config_file)), out, progress=False)
    assert len(summary.ran) == total - len(done_before)
    with StudyDB(out) as db:
        states = db.states()
    assert all(states[k]["runs"] == runs for k, runs in done_before.items()), "a finished unit was redone"
    assert_same_results(comparable(out), comparable(reference))
    assert write_report(out)["markdown"].read_text() == write_report(reference)["markdown"].read_text()


def test_unit_params_round_trip_and_leave_unset_optional_settings_out_of_the_key():
    from sftlens.study.engine.params import FactSelection, KLParams, Runtime, TrainParams

    selection = FactSelection(data="abc", relations={"test": ["P17"]}, train_facts_per_relation=None,
                              eval_facts_per_relation=5)
    assert "dev_facts_per_relation" not in selection.to_params()
    assert FactSelection(**{**selection.to_params(), "dev_facts_per_relation": 2}).limit("dev") == 2
    assert selection.limit("dev") == 5 and selection.limit("train") is None
    kl = KLParams(kl={"top_k": 10}, test_set="in", **selection.to_params())
    runtime = Runtime(model="m", data_dir="d", device="auto", eval_batch_size=64)
    received = {**kl.to_params(), **runtime.to_params()}  # what a unit function gets
    assert KLParams.of(received) == kl and Runtime.of(received) == runtime
    assert runtime.device_or_none is None
    with pytest.raises(TypeError):
        TrainParams.of({"set": "level0", "size": "8", "seed": 0})  # a missing setting is never guessed


def test_the_ray_executor_runs_each_unit_once_with_the_local_results(tiny_study, tmp_path):
    """On a local Ray instance (CPU): every unit runs exactly once and the results equal the local executor's."""
    ray = pytest.importorskip("ray")
    config_file, reference = tiny_study
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_study(load_study_config(str(config_file)), tmp_path / "ray", executor="ray", progress=False)
    finally:
        ray.shutdown()
    with StudyDB(tmp_path / "ray") as db:
        units = db.planned_units()
    assert len(summary.ran) == len(units) and not summary.failed
    assert {u["runs"] for u in units} == {1}
    assert_same_results(comparable(tmp_path / "ray"), comparable(reference))


# Every unit of the tiny study's plan (TINY_STUDY on `tiny_model(seed=0)` and `write_tiny_data`), keyed by
# the code before `learning_rates` existed: a study without the setting keeps every key. The LoRA units were
# re-keyed once, on purpose, when unset `lora_targets` came to mean "found in the model" (issue 20). The model's
# fingerprint is fixed: the tiny model's config.json is written by whatever transformers is installed, and
# its defaults are not what this pins.
TINY_KEYS = {
    "probe": "ff098812c73b2dfb",
    "split": "ac4bcb488fa56e87",
    "eval base": "b2e56158311de5de",
    "train level0-n8-seed0": "2926822f84dc6f37",
    "train level0-n8-seed1": "23bf1484fba927f0",
    "train mixed-n8-seed0": "5b5f599b18daa994",
    "train mixed-n8-seed1": "d07ff4fb79f54a35",
    "eval level0-n8-seed0": "93f9a75abfcddddd",
    "kl level0-n8-seed0": "8031618fd551bf5d",
    "deltas level0-n8-seed0": "57ca8b32599e12af",
    "restore level0-n8-seed0": "0f6040053cd0d3be",
    "repair wise level0-n8-seed0": "18b0a8e192162ef5",
    "repair dare level0-n8-seed0": "4848a9f130bb5531",
    "lora level0-n8-seed0 lr0.001": "72fa06694e3e1e9c",
    "lora-eval level0-n8-seed0 lr0.001": "1ac7f9b0430171d3",
    "lora level0-n8-seed0 lr0.01": "b10207cfdcfcb5e4",
    "lora-eval level0-n8-seed0 lr0.01": "1803576483b03067",
    "eval level0-n8-seed1": "b3a51be4e5bec0b3",
    "kl level0-n8-seed1": "d4a311977788b786",
    "deltas level0-n8-seed1": "63a0dc0657c214d7",
    "restore level0-n8-seed1": "54b737a273dab9e4",
    "repair wise level0-n8-seed1": "a88a2c4a1dc54e6c",
    "repair dare level0-n8-seed1": "cc60c306cf181315",
    "lora level0-n8-seed1 lr0.001": "06ee85acf3bc296a",
    "lora-eval level0-n8-seed1 lr0.001": "f060c7d62df2d301",
    "lora level0-n8-seed1 lr0.01": "6ad23041615dd139",
    "lora-eval level0-n8-seed1 lr0.01": "47e1626e8c39b510",
    "eval mixed-n8-seed0": "1b9d40156b4f48e6",
    "kl mixed-n8-seed0": "0986ccb35fcf272d",
    "eval mixed-n8-seed1": "539f0e4c644783c4",
    "kl mixed-n8-seed1": "a87ed49421a53b96",
    "control level0-n8-seed0": "8a7a5916e97d7f9c",
    "control level0-n8-seed1": "9191feb242746a94",
    "repaired wise level0-n8-seed0": "e6a01f0fb19e9ddf",
    "repaired dare level0-n8-seed0": "00276ac2596703b2",
    "repaired wise level0-n8-seed1": "e1cee55d37862347",
    "repaired dare level0-n8-seed1": "d7046bd4a7839e52"
}


def test_unit_keys_are_unchanged_without_learning_rates(tmp_path, monkeypatch):
    from sftlens.study.engine import units

    from tiny import save_model, tiny_model, write_tiny_data

    monkeypatch.setattr(units, "model_fingerprint", lambda model: "f" * 16)

    model, tokenizer = tiny_model(seed=0)
    config = tiny_study_file(tmp_path, save_model(model, tokenizer, tmp_path / "model"), write_tiny_data(tmp_path / "eq"))
    assert {u.label: u.key for u in build_units(load_study_config(str(config)))} == TINY_KEYS


def test_the_engine_imports_no_report_module():
    """The engine/report seam: every engine module imports without the report (the demo imports it to write its report)."""
    code = ("import importlib, pkgutil, sys\nimport sftlens.study.engine as engine\n"
            "for m in pkgutil.iter_modules(engine.__path__): importlib.import_module(f'sftlens.study.engine.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m.startswith('sftlens.study.report')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_every_unit_kind_is_declared_once_with_a_function_its_parameters_and_its_costs():
    import importlib

    from sftlens.reporting.costs import DEFAULT_RATES, FIXED_SECONDS
    from sftlens.study.engine.kinds import KINDS
    from sftlens.study.engine.params import UnitParams

    assert set(KINDS) == set(DEFAULT_RATES) == set(FIXED_SECONDS)
    for kind, declared in KINDS.items():
        module, name = declared.fn.split(":")
        assert callable(getattr(importlib.import_module(module), name)), kind
        assert issubclass(declared.params, UnitParams) and declared.work, kind
    # a result with a field its kind does not declare is refused, naming it: the declaration owns the names
    with pytest.raises(ValueError, match="a RepairedOutcome has no field 'restore_ratio'"):
        KINDS["repaired"].result.of({"method": "wise", "restore_ratio": 0.5})
