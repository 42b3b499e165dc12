"""SIGTERM and SIGINT as KeyboardInterrupt, held back while a tracking-store write runs.

An interrupt raised inside an SQLite write leaves that connection holding the database lock;
the KILLED status could then not be written ("database is locked") and the stage would die
with a traceback. Inside `deferred()` the signal is recorded and raised as soon as the
write is done.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

_pending: str | None = None
_depth = 0


def _handler(signum, frame) -> None:
    global _pending
    name = signal.Signals(signum).name
    if _depth:
        _pending = name
        return
    raise KeyboardInterrupt(name)


def install() -> None:
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if not _depth and _pending:
        name, _pending = _pending, None
        raise KeyboardInterrupt(name)
