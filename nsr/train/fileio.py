"""The one way this project writes files: atomically (a temporary file next to the target, then
os.replace), so a crash or a kill never leaves a half-written file under the final name; and a
failed write (disk full, permission denied, ...) is one WriteError line that names the file and
the cause, with the file that was there before left as it was.

    write_atomic("out/metrics.json", text)
    with atomic_open("out/last.pt") as f: torch.save(state, f)

Temporaries are named `<target>.tmp.<pid>`; `remove_stale_temporaries(folder, names)` deletes
those a killed process left behind (its caller must own the folder: nsr/train/outdir.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from typing import IO, Any, Iterator

from .errors import UserError

# What torch's zip writer (torch.save to a path) raises when the OS refuses a write: a
# RuntimeError whose text names no cause.
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "iostream error", "cannot be opened")


class WriteError(UserError):
    """Writing a file failed for a reason of the machine's (full disk, permissions, ...)."""


def temporary_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path; when the block succeeds it replaces `path`, else it is removed.
    An OS error while writing becomes a WriteError; any other exception passes unchanged."""
    path = os.fspath(path)
    tmp = temporary_name(path)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except Exception as e:
            cause = _os_cause(e, path)
            if cause is None:
                raise
            raise WriteError(_write_message(path, cause)) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """An open file that replaces `path` when the block succeeds. Writers such as torch.save
    given this file object raise the OS's own error (ENOSPC, EACCES, ...), which a path would hide."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def json_ready(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Strict JSON, readable by any parser: a non-finite number is written as null."""
    write_atomic(path, json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, or {} if it is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...]) -> list[str]:
    """Delete the temporaries `<name>.tmp.<pid>` of the given file names in `folder`; return what
    was removed. Any other file, whatever its name, stays. Only the folder's owner knows that no
    writer is still at work there: call this while holding the folder's lock."""
    pattern = re.compile(rf"^(?:{'|'.join(re.escape(n) for n in names)})\.tmp\.\d+$")
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if pattern.match(name) and os.path.isfile(path) and not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.remove(path)
                    removed.append(name)
    return removed


# ---------------------------------------------------------------------------------- failures

def write_failure(path: str, cause: OSError) -> WriteError:
    """The one message of a write the machine refused (full disk, permissions, ...), for writers
    that cannot go through atomic_path (a log appended to as the run trains)."""
    return WriteError(_write_message(path, cause))


def _os_cause(exc: BaseException, path: str) -> OSError | None:
    """The OS error behind a failed write: `exc` itself, one it was raised from, or, for torch's
    zip writer, which keeps no cause, the full disk or a generic I/O error. None: not a write failure."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
        folder = os.path.dirname(os.path.abspath(path))
        with contextlib.suppress(OSError):
            fs = os.statvfs(folder)
            if fs.f_bavail == 0 or fs.f_bfree == 0:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        return OSError(errno.EIO, f"the write failed ({first})")
    return None


def _write_message(path: str, cause: OSError) -> str:
    what = cause.strerror or str(cause) or type(cause).__name__
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space there (or choose another --out)"
    elif cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the folder writable (or choose another --out)"
    else:
        hint = "check the disk (or choose another --out)"
    kept = f"the {os.path.basename(path)} there before is unchanged" if os.path.exists(path) else \
        "nothing was written under that name"
    return f"cannot write {path}: {what}; {kept}; {hint}"
