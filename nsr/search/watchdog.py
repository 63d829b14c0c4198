"""Stop an NNI experiment's manager and trials when the python -m nsr search process that started it dies.

    python nsr/search/watchdog.py LAUNCHER_PID EXPERIMENT_ID

NNI 3.0 starts its manager (Node.js) in a process group of its own, with the tuner and every
trial inside that group, and nothing ties that group to the Python process that started it: a
launcher killed with SIGKILL leaves the manager and its trials running. python -m nsr search starts this
script next to the manager (see nsr/search/workarounds.start_watchdog); when its parent is gone it sends
SIGTERM, then SIGKILL, to each process group of a manager started with `--experiment-id ID`.

Run by its path, not as `nsr.search.watchdog`: importing the nsr package would load torch for
nothing. Needs only the standard library and psutil (an NNI dependency).
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.5
TERM_GRACE_S = 10  # the manager stops its trials on SIGTERM; SIGKILL whatever is left after this


def manager_groups(exp_id: str) -> set[int]:
    """Process groups of the NNI managers started for this experiment (found by command line)."""
    import psutil

    groups = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "--experiment-id" in cmd and exp_id in cmd and "main.js" in " ".join(cmd):
            try:
                groups.add(os.getpgid(p.pid))
            except OSError:
                continue
    return groups


def group_members(pgid: int) -> list:
    """Live (non-zombie) processes of a process group."""
    import psutil

    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (OSError, psutil.Error):
            continue
    return members


def end_groups(pgids: set[int], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM every member of the groups, then SIGKILL those still alive after grace_s."""
    import psutil

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        members = [p for g in pgids for p in group_members(g)]
        if not members:
            return
        for p in members:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(members, timeout=wait_s)


def watch(launcher_pid: int, exp_id: str) -> None:
    # A dead parent hands its children to another process at once (even before it is reaped).
    while os.getppid() == launcher_pid:
        time.sleep(POLL_S)
    end_groups(manager_groups(exp_id))


if __name__ == "__main__":  # started in a session of its own: the terminal's Ctrl-C is not for it
    watch(int(sys.argv[1]), sys.argv[2])
