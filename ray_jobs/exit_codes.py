"""One way every entrypoint ends: user mistakes as one line + exit 2, ^C as exit 130, bugs keep their traceback."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from core.errors import SuperweightsError


def run_guarded(call: Callable[[], int]) -> int:
    try:
        return call()
    except SuperweightsError as e:
        print(f"superweights: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the raiser may say what was stopped and how to resume
        print("superweights: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


def end_process(code: int) -> None:
    """Leave the process with `code` (the console script's and `python -m`'s last step, never an in-process call).

    After ^C / SIGTERM the daemon thread that ran Ray Train's `fit()` may still be inside Ray's C++ client when
    the interpreter tears down, and that teardown can segfault (seen in CI: exit -11 right after our one line,
    the MLflow run already KILLED). By then everything that matters is done: the run is closed, `ray.shutdown()`
    has run, the line is printed. So an interrupted process flushes and leaves without the teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 130:
        os._exit(code)
    sys.exit(code)


_sigterm_ours = False  # interrupt_on_sigterm() was called in this process


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """`kill` and `ray job stop` send SIGTERM: unwind as ^C does, so runs end KILLED with a line saying how to
    resume, never RUNNING. (Signal handlers can only be set from the main thread.)"""
    global _sigterm_ours
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
        _sigterm_ours = True


def reinstall_sigterm() -> None:
    """`ray.init` replaces our SIGTERM handler with its own (which ends the process with a C++ stack dump and
    exit -6, the run left FAILED): after it, set ours again where we had one."""
    if _sigterm_ours and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
