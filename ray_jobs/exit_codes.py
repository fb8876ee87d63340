"""One way every entrypoint ends: user mistakes as one line + exit 2, ^C as exit 130, bugs keep their traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from core.errors import SuperweightsError


def run_guarded(call: Callable[[], int]) -> int:
    try:
        return call()
    except SuperweightsError as e:
        print(f"superweights: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("superweights: interrupted", file=sys.stderr)
        return 130
