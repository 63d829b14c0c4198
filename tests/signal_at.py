"""Run a training script with a signal sent to it at a chosen point (not a test: test_resume.py,
test_overwrite.py and test_tensorboard.py start it):

    python tests/signal_at.py SIGNAL step:N     SCRIPT ARGS...   # right after global step N
    python tests/signal_at.py SIGNAL last.pt:E  SCRIPT ARGS...   # while epoch E's last.pt is written

The script runs as `python SCRIPT ARGS...` would (runpy, as __main__), so its exit code and stderr
are the real ones; the signal comes from os.kill in this process, at the same point on any machine.
"""

import os
import runpy
import signal
import sys

import torch

import nsr.train.engine as engine
from tests.helpers import ROOT, save_then_signal, step_then_signal

if __name__ == "__main__":
    sig_name, when, script, *args = sys.argv[1:]
    sig = getattr(signal, sig_name)
    kind, _, n = when.partition(":")
    if kind == "step":
        engine.Trainer.train_step = step_then_signal(engine.Trainer.train_step, int(n), sig)
    elif kind == "last.pt":
        torch.save = save_then_signal(torch.save, int(n), sig)
    else:
        sys.exit(f"signal_at.py: unknown point {when!r}")
    path = os.path.join(ROOT, script)
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")
