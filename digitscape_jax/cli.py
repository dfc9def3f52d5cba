"""What train.py and sample.py share: one-line errors and checked flag types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from digitscape_jax.config import NON_NEGATIVE, POSITIVE, SEED, Bound
from digitscape_jax.errors import UserError

T = TypeVar("T")


def one_line(text: str) -> str:
    """`text` with control characters (newlines among them) escaped, so it prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.required:
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (exit 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def parse_number(parse: Callable[[str], T], bound: Bound | None = None, *,
                 check: bool = True) -> Callable[[str], T]:
    """An argparse `type`: `parse` the text (int or float), then require `bound` where `check`.

    Config's flags pass check=False: Config checks their bounds itself, once, and
    train.py reports its error against the flag; the bound still names what a
    valid value looks like when the text is no number at all.
    """
    kind = "an integer" if parse is int else "a number"

    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {bound and bound.noun or kind}, got {text!r}") from None
        if check and bound is not None and (reason := bound.error(value)):
            raise argparse.ArgumentTypeError(reason)
        return value

    return convert


positive_int = parse_number(int, POSITIVE)
non_negative_int = parse_number(int, NON_NEGATIVE)
seed = parse_number(int, SEED)  # A random seed: what JAX and TensorFlow accept.


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Runs a command's `main`: a UserError becomes one line on stderr and exit code 1."""
    from absl import logging  # tfds and orbax log routine warnings through absl

    logging.set_verbosity(logging.ERROR)
    try:
        main(argv)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:  # a path the user gave that cannot be read or written
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {one_line(e.strerror or str(e))}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, after the first asked for a clean stop
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
