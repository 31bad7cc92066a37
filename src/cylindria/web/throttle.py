"""Wrong keys counted per client address: past a limit, that address waits to try again."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Ten wrong keys a minute is plenty for a person mistyping, and puts guessing a key of
# even a few random characters out of reach.
ATTEMPTS = 10
WINDOW_SECONDS = 60.0
# Addresses followed at once; past this the one that failed least recently is
# forgotten, so a flood of addresses cannot grow memory without bound.
MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class _Record:
    failures: deque[float]
    # Until when nothing more about this address is logged at INFO or above.
    quiet_until: float = -math.inf
    quiet_block_until: float = -math.inf


@dataclass(slots=True)
class Throttle:
    """Wrong keys per client address, in a sliding window.

    An address with `limit` wrong keys within `window` seconds has its keys refused,
    right or wrong, until the oldest of them is `window` seconds old: were a right key
    let through, a guesser would still learn when it found one. Other addresses are
    never affected. The clock is injectable, so tests need no sleeps.
    """

    limit: int = ATTEMPTS
    window: float = WINDOW_SECONDS
    capacity: int = MAX_ADDRESSES
    clock: Callable[[], float] = time.monotonic
    _records: dict[str, _Record] = field(default_factory=dict)

    def wait(self, address: str) -> float:
        """Seconds before `address` may have a key checked again; 0 when it may now."""
        record = self._records.get(address)
        if record is None or len(record.failures) < self.limit:
            return 0.0
        return max(record.failures[0] + self.window - self.clock(), 0.0)

    def fail(self, address: str, via: str) -> None:
        """Count a wrong key from `address`; `via` says where it was given, for the log.

        Logs the first wrong key from an address and its being held back, each at
        most once per window; every other one at DEBUG only, so a guesser cannot fill
        the log.
        """
        now = self.clock()
        # Re-inserted on every failure: the dict's order is then least recent first.
        record = self._records.pop(address, None) or _Record(deque(maxlen=self.limit))
        while record.failures and record.failures[0] <= now - self.window:
            record.failures.popleft()
        record.failures.append(now)
        while len(self._records) >= self.capacity:
            del self._records[next(iter(self._records))]
        self._records[address] = record
        if len(record.failures) >= self.limit and now >= record.quiet_block_until:
            record.quiet_block_until = now + self.window
            log.warning("%d wrong keys from %s within %g s: its keys are refused for %d s",
                        self.limit, address, self.window, self.retry_after(address))
        elif now >= record.quiet_until:
            record.quiet_until = now + self.window
            log.warning("a wrong key from %s (%s)", address, via)
        else:
            log.debug("a wrong key from %s (%s)", address, via)

    def failures(self, address: str) -> int:
        """Wrong keys from `address` within the window (at most `limit` are kept)."""
        record = self._records.get(address)
        cutoff = self.clock() - self.window
        return 0 if record is None else sum(1 for t in record.failures if t > cutoff)

    def retry_after(self, address: str) -> int:
        """`wait` as whole seconds for a Retry-After header: never 0 while waiting."""
        return max(math.ceil(self.wait(address)), 1)

    def __len__(self) -> int:
        return len(self._records)
