"""Progress of long work, as users expect it: a bar with rate and ETA on a terminal, and on a log
(Vertex AI, CI, a file) one plain line every few seconds — no carriage returns to garble it.

    progress = Progress(len(shards), "download", unit="shard")
    for shard in shards:
        fetch(shard)
        progress.advance()          # log: "download shard 3/10 (0.52 shards/s, ETA 13 s)" every 30 s
    progress.done()
"""

from __future__ import annotations

import logging
import sys
import time

import tf_keras

log = logging.getLogger(__name__)
LOG_SECONDS = 30.0  # between progress lines in a log


class Progress:
    """`advance(n, **values)` after each piece of work; `done()` at the end.

    `initial`: work already done before (a resumed epoch); the rate counts only what is done here.
    `bar`: None picks a bar exactly when stdout is a terminal.
    """

    def __init__(
        self,
        total: int | None,
        what: str,
        unit: str = "item",
        seconds: float | None = None,
        initial: int = 0,
        bar: bool | None = None,
    ) -> None:
        self.total, self.what, self.unit = total, what, unit
        self.seconds = LOG_SECONDS if seconds is None else seconds
        self.count = self.initial = initial
        self.started = self.last = time.monotonic()
        use_bar = sys.stdout.isatty() if bar is None else bar
        self.bar = tf_keras.utils.Progbar(total, unit_name=unit) if use_bar else None

    def advance(self, n: int = 1, **values: float) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(self.count, values=list(values.items()) or None)
        elif time.monotonic() - self.last >= self.seconds:
            self.line(**values)

    def line(self, **values: float) -> None:
        """One log line: what, count/total, the given values, rate and ETA."""
        self.last = now = time.monotonic()
        done = self.count - self.initial
        rate = done / (now - self.started) if done and now > self.started else 0.0
        of = f"/{self.total}" if self.total else ""
        extra = "".join(f" {k} {v:.4f}" for k, v in values.items())
        eta = f", ETA {(self.total - self.count) / rate:.0f} s" if rate and self.total else ""
        log.info("%s %s %d%s%s (%.2f %s/s%s)", self.what, self.unit, self.count, of, extra, rate, self.units, eta)

    def done(self) -> None:
        if self.bar is None and self.count > self.initial:
            seconds = time.monotonic() - self.started
            log.info("%s: %d %s in %.1f s", self.what, self.count - self.initial, self.units, seconds)

    @property
    def units(self) -> str:
        return self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
