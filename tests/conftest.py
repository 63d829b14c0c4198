import json
import os

import pytest
import torch

from nsr.train.config import parse_args
from nsr.train.engine import train
from tests.helpers import DIGITS, DIGITS_EPOCHS, MLP4, STEPS_PER_EPOCH, run_in_process

# Small models run fastest on one thread; two OpenMP threads per process crawl when pytest and
# its subprocesses share two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def digits_reference(tmp_path_factory):
    """`python fdnn_nsr.py DIGITS --epochs 4` run once per session, uninterrupted: the result every
    stopped-and-resumed run must reproduce, a finished run later runs must leave untouched, and a
    small trained checkpoint (best.pt, last.pt). Returns (folder, metrics, stdout); a test that
    changes the folder works on a copy."""
    out = str(tmp_path_factory.mktemp("digits-reference") / "run")
    result = run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", str(DIGITS_EPOCHS), "--out", out)
    assert result.code == 0 and result.err == "", result.err
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["finished"] and len(metrics["history"]) == DIGITS_EPOCHS
    assert metrics["global_steps"] == DIGITS_EPOCHS * STEPS_PER_EPOCH
    return out, metrics, result.out


@pytest.fixture(scope="session")
def mid_epoch(tmp_path_factory):
    """A run stopped by --max-steps 50 (epoch 2, step 14): history, best epoch, momentum buffers,
    NSR memory and the open epoch's sums all hold something. Returns (folder, metrics); tests
    work on a copy (helpers.copy_of)."""
    out = str(tmp_path_factory.mktemp("mid") / "run")
    metrics = train(parse_args([*DIGITS, "--epochs", "3", "--max-steps", "50", "--out", out], default_config=MLP4))
    return out, metrics
