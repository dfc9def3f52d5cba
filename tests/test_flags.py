"""Property test: any command line gets either accepted or one line of error with exit code 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


import sample
import train
from digitscape_jax import config

TRAIN_FLAGS = ["--steps", "--arch", "--batch-size", "--lr", "--beta1", "--beta2", "--latent-dim",
               "--seed", "--ckpt-dir", "--samples-dir", "--log-every", "--sample-every",
               "--ckpt-every", "--eval-every", "--eval-samples", "--ema-decay", "--dtype",
               "--steps-per-call", "--conditional", "--data-on-device", "--mnist-idx", "--data-dir",
               "--coordinator", "--num-processes", "--process-id", "--compile-cache"]
SAMPLE_FLAGS = ["--ckpt", "--step", "--n", "--grid", "--digit", "--raw", "--seed", "--out", "--npz",
                "--save-individual", "--interpolate", "--export", "--export-savedmodel",
                "--export-onnx"]

values = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1e309", "nan", "inf", "-inf", "1_000", " 7", "0x10", "seed",
                     "dcgan", "", "--steps", "\x00", "１２", "3x4", "0x5", "10x10", "s.png", "s.gif",
                     "50", "100", "0.5", "bfloat16", "host:1234", str(2**32), str(2**32 - 1)]),
)


def command_lines(flags: list[str]):
    pair = st.tuples(st.sampled_from(flags + ["--bogus", "-x"]), values)
    return st.lists(pair, max_size=5).map(lambda pairs: [t for p in pairs for t in p])


def check(parse, argv: list[str], capsys) -> object | None:
    """Parses `argv`; a rejection must be exit code 2 with exactly one line on stderr."""
    try:
        return parse(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert "error:" in err
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines(TRAIN_FLAGS))
def test_train_flags_are_accepted_or_refused_in_one_line(argv, capsys):
    args = check(train.parse_args, argv, capsys)
    if args is not None:  # an accepted command line always makes a valid Config
        config = train.config_from_args(args)
        assert config.steps > 0 and config.batch_size > 0 and config.learning_rate > 0
        assert 0 <= config.beta1 < 1 and 0 <= config.beta2 < 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines(SAMPLE_FLAGS).map(lambda a: ["--ckpt", "c"] + a))
def test_sample_flags_are_accepted_or_refused_in_one_line(argv, capsys):
    args = check(sample.parse_args, argv, capsys)
    if args is not None:
        assert args.n is None or args.n > 0
        assert 0 <= args.seed < 2**32 and (args.step is None or args.step > 0)
        if args.grid is not None:
            assert args.grid[0] > 0 and args.grid[1] > 0
            assert args.n is None or args.n == args.grid[0] * args.grid[1]
        assert args.out.suffix == ".png"


@pytest.mark.parametrize("parse", [train.parse_args, sample.parse_args])
def test_help_answers_without_error(parse, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out


def readme_flag_rows() -> list[tuple[str, str, str]]:
    """(flag, default, meaning) of each row of README.md's train.py flag table."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Main flags", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `--([a-z0-9-]+)` \| ([^|]*) \| ([^|]*) \|$", section, re.M)
    return [(flag, default.strip(), meaning.strip()) for flag, default, meaning in rows]


def test_the_readme_flag_table_is_true_to_the_flags_and_config():
    actions = {a.option_strings[0]: a for a in train.build_parser()._actions if a.option_strings}
    fields = {f.name: f for f in config.flags()}
    rows = readme_flag_rows()
    assert len(rows) >= 10, "README.md's flag table is missing"
    for flag, default, meaning in rows:
        assert f"--{flag}" in actions, f"README.md lists --{flag}, which train.py does not have"
        value = fields[flag].default if flag in fields else actions[f"--{flag}"].default
        if value is None:
            expected = "the arch's" if flag in fields else "None"
        elif isinstance(value, bool):
            expected = "on" if value else "off"
        elif isinstance(value, Path):
            expected = f"{value}/"
        else:
            expected = str(value)
        assert default == expected, f"README.md says --{flag} defaults to {default}, not {expected}"
        assert meaning
