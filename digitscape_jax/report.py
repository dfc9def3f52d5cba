"""The docs' tables and plots, generated from the result records in docs/results/.

    python -m digitscape_jax.report           # rewrite every table and plot
    python -m digitscape_jax.report --check   # exit 1 if a committed table is stale

A table lives in README.md or docs/*.md between `<!-- report:NAME -->` and
`<!-- /report:NAME -->`; NAME picks its generator in `TABLES`. Changing a recipe
means: train it, record it (`evaluate --record docs/results/`), run this. No figure
in the docs is typed by hand.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digitscape_jax import cli, provenance, records
from digitscape_jax.config import DEFAULT_ARCH, Config, flag_words
from digitscape_jax.evaluator import REAL_TRAIN
from digitscape_jax.errors import UserError
from digitscape_jax.files import write_atomically

REPO = provenance.REPO
DOCS = ("README.md", "docs/quality.md", "docs/performance.md", "docs/spaces.md")
FD_PLOT = "docs/fd_over_time.png"
MARKER = re.compile(r"(<!-- report:(?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)",
                    re.DOTALL)
HELD_OUT, SELECTION = "held_out", "selection"
FULL_RUN = 20_000  # steps of `python train.py --steps 20000`, the runs the targets are about


@dataclass(frozen=True)
class Target:
    """A goal for the default's trained model: `value(record, reference)` against `goal`."""

    name: str
    goal: str
    value: Callable[[dict[str, Any], dict[str, Any]], float | None]
    met: Callable[[float], bool]
    digits: int = 3


def space_of(metrics: dict[str, Any], name: str = HELD_OUT) -> dict[str, Any]:
    """One feature space's figures of an evaluation (`Evaluator.evaluate`'s dict)."""
    return metrics["spaces"][name]


def space(record: dict[str, Any], name: str = HELD_OUT) -> dict[str, Any]:
    """One feature space's figures of a record."""
    return space_of(record["metrics"], name)


def real_vs_real(calibration: dict[str, Any], name: str = HELD_OUT) -> float:
    """Real train digits' FD against the test digits in a space: the scale of every FD."""
    return space_of(calibration["metrics"][REAL_TRAIN], name)["fd"]


TARGETS = (
    Target("FD / real train digits' FD, held-out space", "<= 2",
           lambda r, c: space(r)["fd"] / real_vs_real(c), lambda v: v <= 2.0, 2),
    Target("precision, held-out space", ">= 0.85", lambda r, c: space(r)["precision"],
           lambda v: v >= 0.85),
    Target("recall, held-out space", ">= 0.85", lambda r, c: space(r)["recall"],
           lambda v: v >= 0.85),
    Target("inception score, held-out classifier", ">= 9.75",
           lambda r, c: space(r)["inception_score"], lambda v: v >= 9.75, 2),
    Target("smallest class share, %", ">= 8", lambda r, c: 100 * min(space(r)["class_fractions"]),
           lambda v: v >= 8.0, 1),
    Target("largest class share, %", "<= 12", lambda r, c: 100 * max(space(r)["class_fractions"]),
           lambda v: v <= 12.0, 1),
    Target("memorization", "<= 0.010", lambda r, c: r["metrics"]["memorization_rate"],
           lambda v: v <= 0.010, 4),
    Target("label accuracy (--conditional)", ">= 0.99",
           lambda r, c: r["metrics"].get("label_accuracy"), lambda v: v >= 0.99, 4),
    Target("minutes to train 20,000 steps", "<= 25",
           lambda r, c: r["training"]["wall_s"] / 60, lambda v: v <= 25.0, 1),
)


# --- What a record says, as table cells. ---


def machine_of(record: dict[str, Any]) -> str:
    """The machine that set a record's speed: a training record's first start's, else the
    measurement's own."""
    machine = (record["training"]["provenance"][0]["machine"] if record["kind"] == "training"
               else record["machine"])
    accelerator, cpu = machine["accelerator"], machine["cpu"]
    if accelerator["platform"] != "cpu":
        return f"{accelerator['count']}x {accelerator['kind']}"
    return f"{cpu['model']} ({cpu['instruction_set']}), {cpu['cores']} core{'s' * (cpu['cores'] > 1)}"


def recipe_of(record: dict[str, Any]) -> str:
    config = Config.from_json(record["config"])
    return f"`{config.arch}{' --conditional' if config.conditional else ''}`"


def link(record: dict[str, Any], doc: Path) -> str:
    target = os.path.relpath(records.RESULTS_DIR / f"{record['name']}.json", doc.parent)
    return f"[{record['name']}]({target})"


def number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f"*{empty}*\n"
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


# --- The records a table is about. ---


def by_kind(all_records: dict[str, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in all_records.values() if r["kind"] == kind]


def calibration(all_records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    found = by_kind(all_records, "calibration")
    if not found:
        raise UserError("docs/results/ has no calibration record: python -m "
                        "digitscape_jax.evaluate --calibrate --record docs/results/")
    return found[0]


def is_preset(record: dict[str, Any]) -> bool:
    """Whether a training record is a named preset as declared (only its length, seed and
    reporting changed)."""
    return not records.recipe_changes(Config.from_json(record["config"]))


def presets(all_records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Training records of named presets, the default first, then by name."""
    found = [r for r in by_kind(all_records, "training") if is_preset(r)]
    return sorted(found, key=lambda r: (r["config"]["arch"] != DEFAULT_ARCH,
                                        r["config"]["conditional"], r["name"]))


def defaults(all_records: dict[str, dict[str, Any]], conditional: bool) -> list[dict[str, Any]]:
    """Records of `python train.py --steps 20000` (with or without --conditional)."""
    return [r for r in presets(all_records) if r["config"]["arch"] == DEFAULT_ARCH
            and r["config"]["conditional"] == conditional and r["config"]["steps"] == FULL_RUN]


# --- The tables. ---


def quality_row(record: dict[str, Any], reference: dict[str, Any], doc: Path) -> list[str]:
    held_out = space(record)
    return [recipe_of(record), f"{record['config']['steps']:,}", str(record["config"]["seed"]),
            machine_of(record), number(record["training"]["wall_s"] / 60, 1),
            number(held_out["fd"], 2), number(held_out["fd"] / real_vs_real(reference), 1),
            number(held_out["inception_score"], 2), number(held_out["precision"]),
            number(held_out["recall"]), number(record["metrics"].get("label_accuracy"), 4),
            number(space(record, SELECTION)["fd"], 2), link(record, doc)]


QUALITY_HEADER = ("recipe", "steps", "seed", "machine", "minutes", "FD", "FD / real",
                  "IS", "precision", "recall", "label accuracy", "selection FD", "record")


def reference_row(reference: dict[str, Any], doc: Path) -> list[str]:
    real = reference["metrics"][REAL_TRAIN]
    return ["real train digits against test", "", "", "", "", number(space_of(real)["fd"], 2),
            "1.0", number(space_of(real)["inception_score"], 2),
            number(space_of(real)["precision"]), number(space_of(real)["recall"]), "",
            number(space_of(real, SELECTION)["fd"], 2), link(reference, doc)]


def space_of(metrics: dict[str, Any], name: str = HELD_OUT) -> dict[str, Any]:
    return metrics["spaces"][name]


README_COLUMNS = ("recipe", "seed", "FD", "FD / real", "IS", "precision", "recall",
                  "label accuracy", "record")


def readme_quality(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """The default (and its --conditional form) at 20,000 steps, beside real digits: the
    held-out space's figures only."""
    reference = calibration(all_records)
    rows = [reference_row(reference, doc)] + [
        quality_row(r, reference, doc)
        for conditional in (False, True) for r in defaults(all_records, conditional)]
    keep = [QUALITY_HEADER.index(column) for column in README_COLUMNS]
    return table(README_COLUMNS, [[row[i] for i in keep] for row in rows],
                 "no run of the default is recorded")


def readme_time(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """How long `python train.py --steps 20000` took, with and without --conditional."""
    rows = [[recipe_of(r), machine_of(r), number(r["training"]["wall_s"] / 60, 1), link(r, doc)]
            for conditional in (False, True) for r in defaults(all_records, conditional)]
    return table(("recipe", "machine", "minutes", "record"), rows, "no run of the default is recorded")


def recipes(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """Every named preset that has a record."""
    reference = calibration(all_records)
    rows = [reference_row(reference, doc)] + [quality_row(r, reference, doc)
                                              for r in presets(all_records)]
    return table(QUALITY_HEADER, rows, "no preset is recorded")


def ablations(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """One row per lever: a preset with settings changed, beside that preset's own record of
    the same length and seed where there is one."""
    reference = calibration(all_records)
    rows = []
    for record in sorted(by_kind(all_records, "training"), key=lambda r: r["name"]):
        config = Config.from_json(record["config"])
        lever = records.recipe_changes(config)
        if not lever:
            continue
        held_out = space(record)
        rows.append([recipe_of(record), f"`{' '.join(flag_words(lever))}`",
                     f"{config.steps:,}", str(config.seed), number(space(record, SELECTION)["fd"], 2),
                     number(held_out["fd"] / real_vs_real(reference), 1),
                     number(held_out["precision"]), number(held_out["recall"]), link(record, doc)])
    return table(("preset", "lever", "steps", "seed", "selection FD", "held-out FD / real",
                  "precision", "recall", "record"), rows, "no ablation is recorded")


def targets(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """Each target against the default and its --conditional form: the mean over their
    recorded seeds, and whether it is met."""
    reference = calibration(all_records)
    forms = {"`fast`": defaults(all_records, False),
             "`fast --conditional`": defaults(all_records, True)}
    rows = []
    for target in TARGETS:
        cells = [target.name, target.goal]
        for runs in forms.values():
            values = [v for r in runs if (v := target.value(r, reference)) is not None]
            if not values:
                cells.append("")
                continue
            mean = statistics.mean(values)
            cells.append(f"{mean:.{target.digits}f} {'met' if target.met(mean) else 'missed'}")
        rows.append(cells)
    seeds = {name: len(runs) for name, runs in forms.items()}
    header = ["target", "goal", *(f"{name} ({n} seed{'s' * (n != 1)})" for name, n in seeds.items())]
    return table(header, rows, "no target")


def calibration_tables(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """The evaluator's calibration, one table per feature space."""
    reference = calibration(all_records)
    parts = []
    for name in (HELD_OUT, SELECTION):
        rows = [[set_name, f"{m['n']:,}", number(space_of(m, name)["fd"], 2),
                 number(space_of(m, name)["fd"] / real_vs_real(reference, name), 1),
                 number(space_of(m, name)["inception_score"], 2),
                 number(space_of(m, name)["precision"]), number(space_of(m, name)["recall"])]
                for set_name, m in reference["metrics"].items()]
        parts.append(f"**{name.replace('_', '-')} space** ({link(reference, doc)})\n\n" + table(
            ("digits", "n", "FD", "FD / real", "IS", "precision", "recall"), rows, ""))
    return "\n".join(parts)


def scored_sets(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """Digits read from .npz files, in both spaces."""
    rows = [[f"`{r['name'].removeprefix('samples-')}`", f"{r['metrics']['n']:,}",
             number(space(r)["fd"], 2), number(space(r)["precision"]), number(space(r)["recall"]),
             number(space(r, SELECTION)["fd"], 2), number(space(r, SELECTION)["precision"]),
             number(space(r, SELECTION)["recall"]), link(r, doc)]
            for r in sorted(by_kind(all_records, "samples"), key=lambda r: r["name"])]
    return table(("digits", "n", "held-out FD", "precision", "recall", "selection FD",
                  "precision", "recall", "record"), rows, "no scored set is recorded")


def training_time(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """How long each recorded preset trained, and how fast."""
    rows = [[recipe_of(r), f"{r['config']['steps']:,}", machine_of(r),
             number(r["training"]["wall_s"] / 60, 1), number(r["training"]["median_steps_per_s"], 1),
             number(r["training"]["first_call_s"][0], 1), link(r, doc)]
            for r in presets(all_records)]
    return table(("recipe", "steps", "machine", "minutes, evaluations included",
                  "median steps/s", "first call s", "record"), rows, "no run is recorded")


def bench(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """`bench/bench.py`'s update times, a row per (machine, arch, batch, framework); each
    record names the command that made it."""
    rows = [[machine_of(record), f"`{row['arch']}`", str(row["batch"]),
             f"{row['framework']} {row['version']}", number(row["median_step_s"], 4),
             number(row["iqr_pct"], 0), number(row["first_step_s"], 2), number(row["vs_ours"], 2),
             link(record, doc)]
            for record in sorted(by_kind(all_records, "bench"), key=lambda r: r["name"])
            for row in record["metrics"]["results"]]
    return table(("machine", "arch", "batch", "framework", "s/step", "iqr %", "first step s",
                  "vs ours", "record"), rows, "no bench run is recorded")


def analysis(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """The tables of the analysis records (`bench/spaces.py --record`), each under its title."""
    parts = []
    for record in sorted(by_kind(all_records, "analysis"), key=lambda r: r["name"]):
        parts.append(f"From `{record['command']}` ({link(record, doc)}).\n")
        for kept in record["metrics"]["tables"]:
            parts.append(f"#### {kept['title']}\n\n" + table(kept["header"], kept["rows"], ""))
    return "\n".join(parts) or "*no analysis is recorded*\n"


def calibration_criterion(all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """How many times real digits' FD each degraded calibration set sits in each space: the
    held-out space must separate each at least as clearly as the selection space."""
    reference = calibration(all_records)
    ratios = {name: {s: space_of(m, s)["fd"] / real_vs_real(reference, s)
                     for s in (SELECTION, HELD_OUT)}
              for name, m in reference["metrics"].items() if not name.startswith("real")}
    rows = [[name, number(r[SELECTION], 1), number(r[HELD_OUT], 1),
             number(r[HELD_OUT] / r[SELECTION], 2), "yes" if r[HELD_OUT] >= r[SELECTION] else "no"]
            for name, r in ratios.items()]
    return table(("degraded set", "selection FD / real", "held-out FD / real",
                  "held-out over selection", "at least as clear"), rows, "")


TABLES: dict[str, Callable[[dict[str, dict[str, Any]], Path], str]] = {
    "readme-quality": readme_quality, "readme-time": readme_time, "recipes": recipes, "ablations": ablations,
    "targets": targets, "calibration": calibration_tables, "scored-sets": scored_sets,
    "training-time": training_time, "bench": bench, "analysis": analysis,
    "calibration-criterion": calibration_criterion,
}


# --- Writing them. ---


def render(text: str, all_records: dict[str, dict[str, Any]], doc: Path) -> str:
    """`text` with every marked table regenerated."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise UserError(f"{doc}: unknown table {name!r}; known: {sorted(TABLES)}")
        return f"{match.group(1)}{TABLES[name](all_records, doc)}{match.group(4)}"

    return MARKER.sub(fill, text)


def plot_fd_over_time(all_records: dict[str, dict[str, Any]], path: Path) -> Path:
    """Selection-space FD against wall-clock minutes, one line per full-length preset run."""
    from digitscape_jax.plots import plot_fd_over_time as plot

    runs = {f"{recipe_of(r).strip('`')}, seed {r['config']['seed']} ({machine_of(r)})":
            r["training"]["curve"] for r in presets(all_records)
            if r["config"]["steps"] == FULL_RUN and r["training"]["curve"]}
    return plot(runs, path)


def stale(repo: Path = REPO, results: Path | None = None) -> list[Path]:
    """The docs whose tables differ from what the records generate."""
    all_records = records.read_all(results or repo / "docs" / "results")
    docs = {repo / name: (repo / name).read_text() for name in DOCS if (repo / name).exists()}
    return [doc for doc, text in docs.items() if render(text, all_records, doc) != text]


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m digitscape_jax.report",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a table differs from the records'")
    args = parser.parse_args(argv)
    if args.check:
        if outdated := stale():
            raise UserError(f"stale tables in {', '.join(str(p.relative_to(REPO)) for p in outdated)}: "
                            "run python -m digitscape_jax.report")
        print("every table matches docs/results/")
        return
    all_records = records.read_all()
    for name in DOCS:
        doc = REPO / name
        if doc.exists():
            text = doc.read_text()
            if (new := render(text, all_records, doc)) != text:
                write_atomically(doc, new.encode())
                print(f"updated {name}")
    print(f"drew {plot_fd_over_time(all_records, REPO / FD_PLOT)}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
