"""The one error convention of every entry point (the three scripts, python -m nsr search, python -m nsr reproduce,
python -m nsr report, python -m nsr analyze): a problem the user can fix raises UserError, and run_cli turns it into
one line `error: <message>` on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, ...). The message says how."""


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a resumable checkpoint (the message says where)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors become one-line UserErrors that name the closest flag."""

    def error(self, message):
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0]
            options = [o for a in self._actions if a.help != argparse.SUPPRESS  # not the hidden old names
                       for o in a.option_strings if o.startswith("--")]
            match = closest(flag.split("=")[0], options)
            hint = f"; did you mean {match}?" if match else "; see --help"
            raise UserError(f"unknown option {flag}{hint}")
        raise UserError(message)


def closest(name: str, valid: list[str]) -> str | None:
    """The valid flag or key that `name` most likely meant: one its words abbreviate or that
    abbreviates it (--learning-rate -> --lr, --wd -> --weight-decay), the only one it begins
    (--queue -> --queue-batches), else the closest spelling; None when nothing is close."""
    def words(text: str) -> list[str]:
        return [w for w in text.lstrip("-").lower().replace("_", "-").split("-") if w]

    def initials(text: str) -> str:
        return "".join(w[0] for w in words(text))

    given = "-".join(words(name))
    spelled = {"-".join(words(v)): v for v in valid}
    for key, v in spelled.items():
        if (len(words(v)) > 1 and initials(v) == given) or (len(words(name)) > 1 and initials(name) == key):
            return v
    begun = [v for key, v in spelled.items() if len(given) >= 3 and key.startswith(given)]
    if len(begun) == 1:
        return begun[0]
    match = difflib.get_close_matches(given, list(spelled), n=1, cutoff=0.6)
    return spelled[match[0]] if match else None


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if it has none), at most `limit` chars."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point's main(); UserError -> `error: <message>`, exit 2; Ctrl-C -> exit 130.
    A non-zero int returned by main() becomes the exit code."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(code, int) and code:
        sys.exit(code)
