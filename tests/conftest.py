import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small models run fastest on one thread; two OpenMP threads per process crawl when pytest and
# its subprocesses share two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts (or `-m module`) in a subprocess from the repo root."""
    cmd = [sys.executable, *(script.split() if script.startswith("-m ") else [os.path.join(ROOT, script)]),
           *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def script():
    return run_script
