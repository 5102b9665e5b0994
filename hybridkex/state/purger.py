"""A server's own purge of its shared state: expired rows deleted in a background thread (docs/fleet.md).

Expired tickets and held IDs accept nothing (every read checks the expiry); they only take space, so
a purge is housekeeping and never on a connection's path.  One thread per state object per process,
however many servers of the process use it (a tunnel's reload builds a new server on the same state
before closing the old one), so purges of one state never overlap; a failure is one log line and
the next round tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import SharedState

__all__ = ["PurgeHandle", "auto_purge"]

_log = logging.getLogger("hybridkex.state")
_lock = threading.Lock()
_purgers: dict[int, _Purger] = {}


class _Purger:
    def __init__(self, state: SharedState, every: float, spent_older_than: float | None) -> None:
        self.state, self.every, self.spent_older_than = state, every, spent_older_than
        self.refs = 0
        self.rounds = 0  # purges attempted, for tests and metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hybridkex-state-purge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # The first round after one interval, not at start: a fleet starting together does not
        # purge together, and a server that only briefly runs never purges.
        while not self._stop.wait(self.every):
            older = self.spent_older_than
            try:
                n = self.state.purge(spent_before=None if older is None else time.time() - older)
            except Exception as exc:  # never fatal: the rows wait for the next round
                why = " ".join(str(exc).split())  # one line, whatever the error's text
                _log.warning("cannot purge the shared state (retried in %g s): %s: %s", self.every,
                             type(exc).__name__, why, extra={"event": "state_purge_failed"})
            else:
                _log.log(logging.INFO if n else logging.DEBUG, "purged %d expired rows from the shared state", n,
                         extra={"event": "state_purged"})
            self.rounds += 1

    def stop(self) -> None:
        self._stop.set()
        # A purge in progress finishes on its own (daemon thread); a closing server does not wait for it.
        self._thread.join(timeout=1.0)


class PurgeHandle:
    """One server's use of its state's purger; :meth:`release` when the server closes."""

    __slots__ = ("_key", "_purger")

    def __init__(self, key: int, purger: _Purger) -> None:
        self._key: int | None = key
        self._purger = purger

    @property
    def rounds(self) -> int:
        return self._purger.rounds

    def release(self) -> None:
        with _lock:
            if self._key is None:
                return
            key, self._key = self._key, None
            self._purger.refs -= 1
            if self._purger.refs:
                return
            del _purgers[key]
        self._purger.stop()


def auto_purge(state: SharedState, every: float, spent_older_than: float | None = None) -> PurgeHandle:
    """Purge ``state`` every ``every`` seconds in a background thread (shared by every caller of this
    process on the same state object, the latest caller's settings winning) until each handle is
    released.  ``spent_older_than``: also delete spent IDs older than that many seconds."""
    with _lock:
        key = id(state)
        purger = _purgers.get(key)
        if purger is None:  # (the state outlives its purger, so its id is not reused meanwhile)
            purger = _purgers[key] = _Purger(state, every, spent_older_than)
        else:  # a reload may change them; the next round uses them
            purger.every, purger.spent_older_than = every, spent_older_than
        purger.refs += 1
        return PurgeHandle(key, purger)
