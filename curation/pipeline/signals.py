"""Ctrl-C reaches our commands: a process started from a background shell job (``cmd &`` in a script, a test
suite run with ``make test &``) inherits SIGINT *ignored*, so Python never raises KeyboardInterrupt and a
``kill -INT`` or Ctrl-C is lost.  The command-line entry points call :func:`ctrl_c_stops` first."""

from __future__ import annotations

import signal
import threading


def ctrl_c_stops() -> None:
    """Raise KeyboardInterrupt on SIGINT in this process, whatever its parent left the signal set to (only the
    main thread may set a handler; elsewhere this does nothing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
