"""A clean stop on SIGTERM or SIGINT: announced at once, acted on within a step or two."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from digitscape_jax import cli


class StopRequest:
    """Turns the first SIGTERM or SIGINT into a request to stop, save and exit at the step in
    flight, and says so at once through `announce`.

    The training loop keeps `step` current and waits on the step before last, so the
    request is acted on within two steps. A second signal interrupts at once (as
    KeyboardInterrupt); checkpoints are written atomically, so even that loses nothing
    but the steps since the last.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: Callable[[str], None] = cli.warn) -> None:
        self.announce = announce  # The run's progress output, once it has one.
        self.signal_name: str | None = None
        self.step = 0  # The step that a stop asked for now would happen at, kept by the loop.
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self.announce(f"{self.signal_name}: stopping at step {self.step}, once it is computed, "
                      "and saving a checkpoint there (signal again to exit at once)")
