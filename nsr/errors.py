"""User-facing errors: one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, ...). The message says how."""


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a resumable checkpoint (the message says where)."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); turn UserError into `error: <message>` and an exit code."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
