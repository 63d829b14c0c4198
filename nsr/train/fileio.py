"""The one way this project writes files: atomically (a temporary file next to the target, then
os.replace), so a crash or a kill never leaves a half-written file under the final name.

    write_atomic("out/metrics.json", text)
    with atomic_path("out/last.pt") as tmp: torch.save(state, tmp)

Temporaries are named `<target>.tmp.<pid>`; `remove_stale_temporaries(folder)` deletes those a
killed process left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Iterator

_TMP = re.compile(r"\.tmp\.(\d+)$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path; when the block succeeds it replaces `path`, else it is removed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, or {} if it is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete `*.tmp.<pid>` files in `folder` whose writer is no longer running; return their names."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = _TMP.search(name)
            if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
                    removed.append(name)
    return removed


def save_png(fig, path) -> None:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
