"""When a run's periodic actions fall: the one place for every `step % every` test."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from digitscape_jax.config import Config

# What a step can do besides updating: each at the multiples of its period and at the last step.
EVALUATE, LOG, SAVE, SAMPLE = "evaluate", "log", "save", "sample"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The periods of a run's actions (0: never) and its last step."""

    end: int
    every: Mapping[str, int]

    @classmethod
    def of(cls, config: Config) -> Schedule:
        return cls(config.steps, {EVALUATE: config.eval_every, LOG: config.log_every,
                                  SAVE: config.ckpt_every, SAMPLE: config.sample_every})

    def due(self, step: int, stopping: bool = False) -> frozenset[str]:
        """The actions at `step`. An evaluation is always logged, and a stop always saves."""
        due = {name for name, every in self.every.items()
               if every and (step % every == 0 or step == self.end)}
        if EVALUATE in due:
            due.add(LOG)
        if stopping:
            due.add(SAVE)
        return frozenset(due)

    def call_plan(self, start: int, steps_per_call: int) -> Iterator[int]:
        """How many updates each device call runs from `start` to the end (`call_plan`)."""
        return call_plan(start, self.end, steps_per_call,
                         tuple(every for every in self.every.values() if every))


def call_plan(start: int, end: int, steps_per_call: int,
              every: tuple[int, ...]) -> Iterator[int]:
    """How many updates each device call runs, from step `start` to `end`: `steps_per_call`,
    or single steps where a call would pass over a step that logs, samples or saves (a
    multiple of one of `every`), since those happen between calls."""
    step = start
    while step < end:
        k = steps_per_call
        if step + k > end or any((step + i) % e == 0 for i in range(1, k) for e in every):
            k = 1
        step += k
        yield k
