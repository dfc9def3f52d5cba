"""Result records and the docs' generated tables: provenance, names and commands, the
record files, and that every committed table is what `python -m digitscape_jax.report`
generates from docs/results/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from digitscape_jax import provenance, records, report
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.evaluator import REAL_TRAIN
from digitscape_jax.metrics import RUNS_FILE, MetricsLog

REPO = Path(__file__).resolve().parents[1]


def test_provenance_names_the_commit_the_libraries_and_the_machine():
    described = provenance.describe()
    assert re.fullmatch(r"[0-9a-f]{40}", described["commit"])
    assert isinstance(described["dirty"], bool)
    assert described["versions"]["jax"] and described["versions"]["flax"]
    cpu = described["machine"]["cpu"]
    assert cpu["cores"] >= 1 and cpu["model"]
    assert cpu["instruction_set"] in {name for _, name in provenance.INSTRUCTION_SETS} | {"unknown"}
    assert described["machine"]["accelerator"]["count"] >= 1


def test_source_outside_a_git_checkout_is_unknown(tmp_path):
    assert provenance.source(tmp_path) == {"commit": None, "dirty": None}


@pytest.mark.parametrize("config, name, command", [
    (Config(), "fast-20k-seed0", "python train.py --steps 20000"),
    (Config(arch="seed", steps=12_000, seed=1), "seed-12k-seed1",
     "python train.py --steps 12000 --arch seed --seed 1"),
    (Config(conditional=True, steps=2500, lr_half_life=100), "fast-conditional-2500steps-lr-half-life-100-seed0",
     "python train.py --steps 2500 --conditional --lr-half-life 100"),
])
def test_a_record_is_named_by_its_preset_and_changed_settings(config, name, command):
    assert records.record_name(config) == name
    assert records.record_name(config, raw=True) == name + "-raw"
    assert records.train_command(config) == command


@pytest.mark.parametrize("config", [
    Config(), Config(arch="dcgan", conditional=True, seed=7, beta1=0.0, loss="hinge"),
    Config(arch="small", clusters=50, mode_seeking=0.3, eval_every=500, ema_decay=0.0,
           data_on_device=True, learning_rate=1.2345678e-4),
])
def test_a_records_command_trains_its_config_again(config):
    import train

    words = records.train_command(config).split()[2:]  # less "python train.py"
    assert train.config_from_args(train.parse_args(words)) == config


def write_run(ckpt: Path) -> None:
    log = MetricsLog(ckpt)
    log.append({"step": 100, "steps_per_s": 3.0, "wall_s": 40.0, "first_call_s": 9.5, "d_loss": 1})
    log.append({"step": 200, "steps_per_s": 20.0, "wall_s": 45.0, "fd": 30.0, "is": 8.0})
    log.append({"step": 300, "steps_per_s": 22.0, "wall_s": 50.0, "d_loss": 0.5})
    log.append({"step": 400, "steps_per_s": 24.0, "wall_s": 60.0, "first_call_s": 1.5,
                "fd": 20.0, "is": 9.0})
    runs = MetricsLog(ckpt, RUNS_FILE)
    runs.append({"start_step": 0, **provenance.describe()})
    runs.append({"start_step": 300, **provenance.describe()})


def test_the_training_summary_reads_speed_curve_and_restarts(tmp_path):
    write_run(tmp_path)
    summary = records.training_summary(tmp_path)
    assert summary["steps"] == 400 and summary["wall_s"] == 60.0
    assert summary["median_steps_per_s"] == 21.0  # the first calls' intervals left out
    assert summary["first_call_s"] == [9.5, 1.5]
    assert summary["restarts"] == 1
    assert summary["curve"] == [{"step": 200, "wall_s": 45.0, "fd": 30.0, "is": 8.0},
                                {"step": 400, "wall_s": 60.0, "fd": 20.0, "is": 9.0}]
    assert [p["start_step"] for p in summary["provenance"]] == [0, 300]


def test_a_run_without_its_runs_log_cannot_be_recorded(tmp_path):
    MetricsLog(tmp_path).append({"step": 1, "steps_per_s": 1.0, "wall_s": 1.0})
    with pytest.raises(UserError, match="runs.jsonl"):
        records.training_summary(tmp_path)


def test_a_record_round_trips_and_a_foreign_file_is_refused(tmp_path):
    write_run(tmp_path / "ckpt")
    record = records.training_record(Config(arch="seed"), tmp_path / "ckpt", {"n": 5},
                                     evaluate_flags=" --n 5")
    path = records.write(tmp_path / "results", record)
    assert path.name == "seed-20k-seed0.json"
    assert records.read_all(tmp_path / "results") == {"seed-20k-seed0": record}
    assert record["command"].startswith("python train.py --steps 20000 --arch seed && ")
    assert record["config"] == Config(arch="seed").to_json()
    (tmp_path / "results" / "other.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(UserError, match="not a schema-1 result record"):
        records.read_all(tmp_path / "results")
    (tmp_path / "results" / "other.json").write_text("{")
    with pytest.raises(UserError, match="not a readable record"):
        records.read_all(tmp_path / "results")


def test_every_committed_table_is_what_the_records_generate():
    assert report.stale() == [], "run: python -m digitscape_jax.report"


def test_a_changed_record_makes_its_tables_stale(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "docs" / "results", results)
    calibration = results / "calibration.json"
    data = json.loads(calibration.read_text())
    data["metrics"][REAL_TRAIN]["spaces"][report.HELD_OUT]["fd"] *= 2
    calibration.write_text(json.dumps(data))
    assert REPO / "docs" / "quality.md" in report.stale(REPO, results)


def test_render_fills_marked_tables_and_refuses_unknown_ones(tmp_path):
    all_records = records.read_all()
    doc = tmp_path / "doc.md"
    text = "before\n<!-- report:recipes -->\nold\n<!-- /report:recipes -->\nafter\n"
    rendered = report.render(text, all_records, doc)
    assert rendered.startswith("before\n<!-- report:recipes -->\n| recipe |")
    assert "old" not in rendered and rendered.endswith("<!-- /report:recipes -->\nafter\n")
    assert report.render(rendered, all_records, doc) == rendered
    with pytest.raises(UserError, match="unknown table 'nope'"):
        report.render("<!-- report:nope -->\n<!-- /report:nope -->", all_records, doc)


def test_report_check_exits_zero_on_the_committed_docs():
    result = subprocess.run([sys.executable, "-m", "digitscape_jax.report", "--check"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "every table matches" in result.stdout


@pytest.mark.slow
def test_evaluate_records_a_trained_run(trained_run, mnist_idx, tmp_path):
    workdir, _ = trained_run
    result = subprocess.run(
        [sys.executable, "-m", "digitscape_jax.evaluate", "--ckpt", str(workdir / "ckpt"),
         "--n", "200", "--mnist-idx", str(mnist_idx), "--record", str(tmp_path)],
        cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (record,) = records.read_all(tmp_path).values()
    assert record["kind"] == "training" and record["name"] == "seed-30steps-seed0"
    assert Config.from_json(record["config"]).arch == "seed"
    assert record["command"].endswith(" --n 200 --record docs/results/")
    assert [point["step"] for point in record["training"]["curve"]] == [20, 30]
    assert record["training"]["steps"] == 30 and record["training"]["restarts"] == 0
    assert record["training"]["provenance"][0]["commit"] == provenance.source()["commit"]
    assert set(record["metrics"]["spaces"]) == {report.SELECTION, report.HELD_OUT}
    assert record["metrics"]["n"] == 200
