"""Result records: one small JSON file per measurement, behind every figure the docs show.

    python -m digitscape_jax.evaluate --ckpt ckpt/ --record docs/results/   # a trained model
    python -m digitscape_jax.evaluate --calibrate --record docs/results/    # the evaluator
    python bench/bench.py --record docs/results/                            # the update's speed

A record names what it measured and how to measure it again (`command`), the code
(`commit`, `dirty`), the libraries (`versions`) and the machine (`machine`). A
training record adds the run's full `config`, its `training` (wall time, steps/s,
the first call's time and the quality curve against wall time) and `metrics`, the
evaluator's JSON, whose per-space figures sit under `metrics["spaces"]`.
`python -m digitscape_jax.report` turns the records into the docs' tables.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from digitscape_jax import config as config_lib
from digitscape_jax import provenance
from digitscape_jax.config import Config
from digitscape_jax.errors import UserError
from digitscape_jax.files import write_atomically
from digitscape_jax.metrics import RUNS_FILE, MetricsLog

SCHEMA = 1
RESULTS_DIR = provenance.REPO / "docs" / "results"
KINDS = ("training", "calibration", "samples", "bench", "analysis")
# The quality curve's fields, of each metrics.jsonl record that has an evaluation.
CURVE_FIELDS = ("step", "wall_s", "fd", "fd_held_out", "is", "label_accuracy")


def changed_settings(config: Config) -> dict[str, Any]:
    """The settings that differ from the preset that `config` names (its arch, with or
    without --conditional): what a command line must spell out to repeat the run."""
    preset = Config(arch=config.arch, conditional=config.conditional)
    return {name: value for name, value in config.to_json().items()
            if name not in ("arch", "conditional") and value != getattr(preset, name)}


def train_command(config: Config) -> str:
    """The train.py command that trains `config` (the preset's settings left out)."""
    words = ["python", "train.py", "--steps", str(config.steps)]
    if config.arch != config_lib.DEFAULT_ARCH:
        words += ["--arch", config.arch]
    if config.conditional:
        words.append("--conditional")
    return " ".join(words + config_lib.flag_words({k: v for k, v in changed_settings(config).items()
                                                   if k != "steps"}))


def recipe_changes(config: Config) -> dict[str, Any]:
    """The changed settings that change the model, not how long or how often it reports:
    what an ablation varies."""
    skip = {"seed", *Config.fields_with("schedule")}
    return {k: v for k, v in changed_settings(config).items() if k not in skip}


def record_name(config: Config, raw: bool = False) -> str:
    """A record's file stem: the preset, the steps, each changed recipe setting and the
    seed."""
    settings = recipe_changes(config)
    parts = [config.arch, *(["conditional"] if config.conditional else []),
             f"{config.steps // 1000}k" if config.steps % 1000 == 0 else f"{config.steps}steps",
             *(f"{name.replace('_', '-')}-{value}" for name, value in settings.items()),
             f"seed{config.seed}", *(["raw"] if raw else [])]
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", "-".join(parts))


def training_summary(ckpt_dir: Path) -> dict[str, Any]:
    """What a run's metrics.jsonl and runs.jsonl say of its training: wall time, median
    steps/s, each (re)start's first call, the quality curve, and the provenance of its first
    start (the code and machine that set its speed)."""
    records = MetricsLog(ckpt_dir).read()
    starts = MetricsLog(ckpt_dir, RUNS_FILE).read()
    if not records or not starts:
        raise UserError(f"{ckpt_dir} has no metrics.jsonl or runs.jsonl of a run to record "
                        "(runs trained before runs.jsonl existed cannot be recorded)")
    speeds = [r["steps_per_s"] for r in records if "first_call_s" not in r]
    return {
        "steps": records[-1]["step"],
        "wall_s": records[-1]["wall_s"],
        "median_steps_per_s": round(statistics.median(speeds), 3) if speeds else None,
        "first_call_s": [r["first_call_s"] for r in records if "first_call_s" in r],
        "restarts": len(starts) - 1,
        "curve": [{k: r[k] for k in CURVE_FIELDS if k in r} for r in records if "fd" in r],
        "provenance": [{k: start[k] for k in ("start_step", "commit", "dirty", "machine")}
                       for start in starts],
    }


def make(kind: str, name: str, command: str, metrics: Any, **fields: Any) -> dict[str, Any]:
    """A record of `kind`, measured now, on this machine and code."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    return {"schema": SCHEMA, "kind": kind, "name": name, "command": command,
            **provenance.describe(), **fields, "metrics": metrics}


def training_record(config: Config, ckpt_dir: Path, metrics: dict[str, Any], *,
                    evaluate_flags: str, raw: bool = False) -> dict[str, Any]:
    """The record of a trained model: its config, training and evaluation."""
    training = training_summary(ckpt_dir)
    command = (f"{train_command(config)} && python -m digitscape_jax.evaluate --ckpt ckpt/"
               f"{evaluate_flags} --record docs/results/")
    return make("training", record_name(config, raw), command, metrics,
                config=config.to_json(), training=training)


def write(directory: Path, record: dict[str, Any]) -> Path:
    """Writes `record` to `directory/<name>.json`, atomically."""
    path = Path(directory) / f"{record['name']}.json"
    write_atomically(path, (json.dumps(record, indent=1) + "\n").encode())
    return path


def read(path: Path) -> dict[str, Any]:
    """One record, checked for the fields every record has."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable record: {e}") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a schema-{SCHEMA} result record")
    missing = [k for k in ("kind", "name", "command", "commit", "machine", "metrics")
               if k not in record]
    if missing or record["kind"] not in KINDS:
        raise UserError(f"{path} lacks {missing or ['a known kind']}")
    return record


def read_all(directory: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Every record in `directory`, by name, in name order."""
    return {record["name"]: record for record in
            (read(path) for path in sorted(Path(directory).glob("*.json")))}
