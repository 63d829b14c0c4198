"""Issue #7: bad input gives one clear line and changes nothing; faults never cost a run.

Where each failure mode is tested (checks that already live elsewhere are referenced, not repeated):

  bad input                               where
  unknown flag (closest name)             here, real script (unknown-flag)
  unknown YAML key (closest name)         test_config.py::test_bad_yaml_keys_and_types
  wrong type (flag / YAML)                test_config.py::test_bad_command_line_is_one_clear_error,
                                          ::test_bad_yaml_keys_and_types
  lambda negative / NaN / inf             test_config.py::test_bad_command_line_is_one_clear_error;
                                          here lambda nan through cnn_nsr.py (lambda-nan)
  lambda count != NSR layers              test_config.py::test_bad_command_line_is_one_clear_error
  unknown model / data set                test_config.py::test_bad_command_line_is_one_clear_error
  unknown NSR layer (closest names)       here, real script (nsr-layer)
  --data-dir missing, download impossible here, real script, offline and timed (offline)
  --data-dir incomplete                   test_data.py::test_incomplete_folder_names_the_missing_files;
                                          here through main() (incomplete-data-dir)
  idx file truncated / wrong magic        test_data.py::test_read_idx_rejects_bad_magic_truncation_and_broken_gzip;
                                          here both through main() (wrong-magic-idx, truncated-idx)
  labels outside the classes              test_data.py::test_labels_outside_the_classes_and_oversized_batches_are_rejected
  batch size > training set               same test_data test; here through main() (batch-too-large)
  finished run in --out                   here, real script, files byte-for-byte untouched (finished-run);
                                          --overwrite that cannot start leaves it intact too
  --out not writable                      here, real script (out-under-a-file), /proc through main()
                                          (out-in-proc)
  YAML that is not YAML                   test_config.py::test_bad_yaml_keys_and_types; here real script
  nesterov without momentum, huge         here, real scripts (nesterov-no-momentum, threads-huge,
  --threads / --fake-size                 fake-size-huge); the rest in test_config.py
  --per-channel on N x D outputs, NSR     here, real script (per-channel-2d, nsr-on-input)
  on the input (flatten)
  model that cannot take the data         test_engine.py::test_a_model_that_cannot_take_the_data_fails_before_training
  crafted last.pt (right marker)          here, real script (crafted-position, crafted-shape)
  --resume with no / a lost checkpoint    here: a warning line even with --quiet; results without
                                          last.pt is an error (resume-without-last.pt)
  faults                                  here: atomic + complete checkpoints, truncated / foreign /
                                          malicious last.pt, SIGKILL, SIGINT and --max-steps then
                                          --resume (identical metrics), NaN loss, resume with other
                                          settings, stale temporaries removed; --overwrite that fails
                                          (NaN, exception, Ctrl-C, SIGKILL) before its first
                                          checkpoint keeps the finished run
"""

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import nsr.train.checkpoint as checkpoint
from nsr.train.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from nsr.train.config import parse_args
from nsr.train.datasets import IDX_FILES, offline_reason
from nsr.train.engine import main, train
from nsr.train.fileio import WriteError
from nsr.train.outdir import LOCK_NAME
from tests.conftest import ROOT
from tests.test_data import write_mnist_like

MLP4 = os.path.join(ROOT, "configs", "mlp4.yaml")  # fdnn_nsr.py's default config
EPOCHS = 10
RUN = ["--dataset", "digits", "--batch-size", "32", "--quiet"]  # ~36 steps of ~2 ms per epoch
TIMES = {"epoch_time_s", "train_time_s"}


def outcome(m: dict) -> dict:
    """What a run must reproduce exactly: its history without timings, best epoch, accuracies."""
    return {"history": [{k: v for k, v in row.items() if k not in TIMES} for row in m["history"]],
            "best_epoch": m["best_epoch"], "best_val_acc": m["best_val_acc"], "test_acc": m["test_acc"],
            "global_steps": m["global_steps"]}


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def fingerprint(folder) -> dict:
    """Bytes and mtime of every file: proof that nothing was touched."""
    result = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            result[name] = (f.read(), os.stat(path).st_mtime_ns)
    return result


def run_main(capsys, argv):
    """fdnn_nsr.py's main() in-process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(default_config=MLP4, argv=argv)
    return exit_info.value.code, capsys.readouterr().err


def popen(script, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, in-process: the finished run later tests must not touch, and the
    result that interrupted-and-resumed runs must reproduce."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    metrics = train(parse_args([*RUN, "--epochs", str(EPOCHS), "--out", out], default_config=MLP4))
    assert metrics["finished"] and len(metrics["history"]) == EPOCHS
    return out, metrics


# ---------------------------------------------------------------------------------- bad input

def _script_cases(tmp, ref_out):
    """name -> (script, args, fragments the one error line must hold)."""
    os.makedirs(tmp, exist_ok=True)
    bad_yaml = os.path.join(tmp, "bad.yaml")
    with open(bad_yaml, "w") as f:
        f.write("lr: 0.1\nepochs: [1, 2\n")
    a_file = os.path.join(tmp, "a-file.txt")
    with open(a_file, "w") as f:
        f.write("not a folder")
    evil = os.path.join(tmp, "evil")
    shutil.copytree(ref_out, evil)
    marker = os.path.join(tmp, "pwned")
    torch.save({"format": FORMAT, "model": _Payload(marker)}, os.path.join(evil, "last.pt"))
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    ref = [*RUN, "--epochs", str(EPOCHS)]
    cases = {
        "unknown-flag": ("fdnn_nsr.py", [*RUN, "--lamda", "3"],
                         ["unknown option --lamda; did you mean --lambda?"]),
        "lambda-nan": ("cnn_nsr.py", ["--lambda", "nan"], ["lambda must be finite and >= 0, got nan"]),
        "invalid-yaml": ("fdnn_vanilla.py", ["--config", bad_yaml], ["is not valid YAML at line 3"]),
        "nsr-layer": ("fdnn_nsr.py", [*RUN, "--nsr-layers", "outt", "--out", os.path.join(tmp, "o1")],
                      ["NSR layer 'outt' is not a module of the model", "closest valid names: out"]),
        "offline": ("fdnn_nsr.py", ["--dataset", "mnist", "--data-dir", empty, "--quiet",
                                    "--out", os.path.join(tmp, "o2")],
                    ["mnist not found", "cannot be downloaded: no network", "--dataset digits"]),
        "out-under-a-file": ("fdnn_nsr.py", [*RUN, "--out", os.path.join(a_file, "sub")],
                             ["cannot write to output folder", "Not a directory", "choose another --out"]),
        "finished-run": ("fdnn_nsr.py", [*ref, "--out", ref_out],
                         ["already holds a finished run; pass --overwrite"]),
        "malicious-last.pt": ("fdnn_nsr.py", [*ref, "--out", evil, "--resume"],
                              ["refusing to load", "only load checkpoints you trust"]),
        "nesterov-no-momentum": ("cnn_nsr.py", ["--momentum", "0", "--out", os.path.join(tmp, "o3")],
                                 ["nesterov needs momentum > 0"]),
        "threads-huge": ("fdnn_nsr.py", [*RUN, "--threads", "1000000", "--out", os.path.join(tmp, "o4")],
                         ["threads must lie in 0..", "got 1000000"]),
        "fake-size-huge": ("fdnn_vanilla.py", [*RUN, "--dataset", "fake", "--fake-size", "1000000000000",
                                               "--out", os.path.join(tmp, "o5")],
                           ["not enough memory", "lower --batch-size, --eval-batch-size, --queue-batches or --fake-size"]),
        "per-channel-2d": ("fdnn_nsr.py", [*RUN, "--per-channel", "--out", os.path.join(tmp, "o6")],
                           ["per_channel averages N x C x H x W outputs", "(out) give N x D"]),
        "nsr-on-input": ("fdnn_nsr.py", [*RUN, "--nsr-layers", "flatten", "--out", os.path.join(tmp, "o7")],
                         ["NSR layer 'flatten' has no trainable parameters before it"]),
        "crafted-position": ("fdnn_nsr.py", [*ref, "--out", _crafted(tmp, ref_out, "position"), "--resume"],
                             ["does not fit this run", "position epoch must be an int, got 'x'"]),
        "crafted-shape": ("fdnn_nsr.py", [*ref, "--out", _crafted(tmp, ref_out, "shape"), "--resume"],
                          ["does not fit this run", "size mismatch for fc1.weight"]),
        "resume-without-last.pt": ("fdnn_nsr.py", [*ref, "--out", _crafted(tmp, ref_out, "no-last"), "--resume"],
                                   ["holds a run (metrics.json, history.csv, best.pt) but no last.pt",
                                    "--overwrite"]),
    }
    if offline_reason("mnist") is None:
        del cases["offline"]  # this machine can download MNIST: the case cannot happen here
    return cases


_CRAFTED = {"crafted-position": "crafted-position", "crafted-shape": "crafted-shape",
            "resume-without-last.pt": "crafted-no-last"}


def _crafted(tmp, ref_out, damage):
    """A copy of the finished run whose last.pt carries the format marker but bad contents."""
    out = os.path.join(tmp, f"crafted-{damage}")
    shutil.copytree(ref_out, out)
    last = os.path.join(out, "last.pt")
    if damage == "no-last":
        os.remove(last)
        return out
    state = torch.load(last, weights_only=True)
    if damage == "position":
        state["position"]["epoch"] = "x"
    else:
        state["model"]["fc1.weight"] = torch.zeros(3)
    torch.save(state, last)
    return out


class _Payload:
    """Unpickling this runs os.system: what a booby-trapped checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture(scope="module")
def script_runs(reference, tmp_path_factory):
    """Every bad-input case through its real script, one after the other (running them side by
    side on two busy cores measured slower)."""
    tmp = str(tmp_path_factory.mktemp("bad-input"))
    ref_out = reference[0]
    before = fingerprint(ref_out)
    results = {}
    cases = _script_cases(tmp, ref_out)
    crafted_before = {case: fingerprint(os.path.join(tmp, folder)) for case, folder in _CRAFTED.items()}
    for name, (script, args, fragments) in cases.items():
        start = time.monotonic()
        proc = popen(script, *args)
        _, stderr = proc.communicate(timeout=180)
        results[name] = (proc.returncode, stderr, fragments, time.monotonic() - start)
    return {"results": results, "tmp": tmp, "ref_before": before, "crafted_before": crafted_before}


@pytest.mark.parametrize("case", ["unknown-flag", "lambda-nan", "invalid-yaml", "nsr-layer", "offline",
                                  "out-under-a-file", "finished-run", "malicious-last.pt",
                                  "nesterov-no-momentum", "threads-huge", "fake-size-huge", "per-channel-2d",
                                  "nsr-on-input", "crafted-position", "crafted-shape", "resume-without-last.pt"])
def test_bad_input_through_the_real_scripts(script_runs, reference, case):
    if case not in script_runs["results"]:
        pytest.skip("this machine reaches the MNIST mirrors")
    code, stderr, fragments, seconds = script_runs["results"][case]
    assert code == 2, (code, stderr)
    assert_one_error_line(stderr, *fragments)
    tmp = script_runs["tmp"]
    if case == "offline":
        # no retry loop: start-up (torch import, under load) plus a probe of a few seconds at most
        assert seconds < 60, seconds
        assert os.listdir(os.path.join(tmp, "empty")) == [], "nothing created in --data-dir"
    new_out = {"nsr-layer": "o1", "offline": "o2", "nesterov-no-momentum": "o3", "threads-huge": "o4",
               "fake-size-huge": "o5", "per-channel-2d": "o6", "nsr-on-input": "o7"}
    if case in new_out:
        assert not os.path.exists(os.path.join(tmp, new_out[case])), "a run that cannot start leaves no output folder"
    if case.startswith("crafted") or case == "resume-without-last.pt":
        assert script_runs["crafted_before"][case] == fingerprint(os.path.join(tmp, _CRAFTED[case]))
    if case == "finished-run":
        assert fingerprint(reference[0]) == script_runs["ref_before"]
    if case == "malicious-last.pt":
        marker = os.path.join(tmp, "pwned")
        assert not os.path.exists(marker), "the payload ran"
        # ... and the payload is live: an unsafe load would have run it
        torch.load(os.path.join(tmp, "evil", "last.pt"), weights_only=False)
        assert os.path.exists(marker)


def _idx_folder(tmp_path, damage):
    folder = tmp_path / damage
    write_mnist_like(folder, n_train=40, n_test=10, gz=False)
    if damage == "incomplete":
        os.remove(folder / IDX_FILES["test_images"])
    elif damage == "magic":
        with open(folder / IDX_FILES["train_images"], "r+b") as f:
            f.write(b"\x00\x00\x0d\x03")  # type code 0x0d (float): not an idx file of bytes
    elif damage == "truncated":
        labels = folder / IDX_FILES["train_labels"]
        labels.write_bytes(labels.read_bytes()[:-3])
    return str(folder)


@pytest.mark.parametrize("argv, fragment", [
    (["--dataset", "mnist", "--data-dir", "incomplete"], "holds only part of mnist: missing t10k-images-idx3-ubyte"),
    (["--dataset", "mnist", "--data-dir", "magic"],
     "train-images-idx3-ubyte is not an idx file of unsigned bytes (bad magic number 00000d03)"),
    (["--dataset", "mnist", "--data-dir", "truncated"],
     "train-labels-idx1-ubyte is truncated or padded: 45 bytes for shape (40,), expected 48"),
    ([*RUN, "--batch-size", "5000"], "batch_size 5000 is larger than the training set (1150 samples"),
    ([*RUN, "--out", "/proc/nsr-run"], "cannot write to output folder /proc/nsr-run"),
], ids=["incomplete-data-dir", "wrong-magic-idx", "truncated-idx", "batch-too-large", "out-in-proc"])
def test_more_bad_input_through_main(tmp_path, capsys, argv, fragment):
    """Cases whose subprocess would add nothing: the same main() and run_cli, in-process."""
    if "--data-dir" in argv:
        argv = [*argv[:-1], _idx_folder(tmp_path, argv[-1]), "--quiet"]
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    code, err = run_main(capsys, argv)
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "out").exists()


def test_overwrite_that_cannot_start_keeps_the_finished_run(reference, capsys):
    out = reference[0]
    before = fingerprint(out)
    code, err = run_main(capsys, [*RUN, "--epochs", str(EPOCHS), "--out", out, "--overwrite",
                                  "--nsr-layers", "outt"])
    assert code == 2
    assert_one_error_line(err, "NSR layer 'outt'")
    assert fingerprint(out) == before


def test_resume_with_other_settings_is_refused_naming_the_key(reference, capsys):
    out = reference[0]
    before = fingerprint(out)
    code, err = run_main(capsys, [*RUN, "--epochs", str(EPOCHS), "--out", out, "--resume", "--lr", "0.1"])
    assert code == 2
    assert_one_error_line(err, "cannot resume", "settings differ", "lr: 0.01 -> 0.1")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- checkpoints

def test_checkpoint_holds_everything_a_resume_needs(reference):
    out, metrics = reference
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["format"] == FORMAT
    assert {"model", "optimizer", "scheduler", "nsr", "rng", "config", "position", "meter"} <= set(state)
    assert state["model"] and state["optimizer"]["param_groups"] and "last_epoch" in state["scheduler"]
    assert any(torch.is_tensor(v) and v.abs().sum() > 0 for v in state["nsr"].values()), "NSR memory"
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["position"]["epoch"] == EPOCHS and state["position"]["step"] == 0
    assert state["position"]["history"] == metrics["history"]
    assert state["config"]["lr"] == 0.01 and state["config"]["dataset"] == "digits"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    good = open(path, "rb").read()

    def dies_halfway(obj, f):  # save_checkpoint hands torch.save an open file
        f.write(good[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(WriteError, match="No space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "last.pt is truncated or not a PyTorch checkpoint"),
    ("foreign", f"last.pt is not a checkpoint written by this project (no '{FORMAT}' marker)"),
])
def test_truncated_or_foreign_checkpoint_is_refused(tmp_path, reference, capsys, damage, message):
    out = str(tmp_path / "run")
    shutil.copytree(reference[0], out)
    last = os.path.join(out, "last.pt")
    if damage == "truncate":
        with open(last, "r+b") as f:
            f.truncate(os.path.getsize(last) // 2)
    else:
        torch.save({"model": {}, "epoch": 3}, last)  # a plain torch.save'd dict
    before = fingerprint(out)
    code, err = run_main(capsys, [*RUN, "--epochs", str(EPOCHS), "--out", out, "--resume"])
    assert code == 2
    assert_one_error_line(err, message)
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- faults

def _start_then_wait(out, seed):
    """Start the real script; once it has written last.pt twice (so one epoch's duration is
    known), wait a seeded random part of the next epochs and return the still running process."""
    proc = popen("fdnn_nsr.py", *RUN, "--epochs", str(EPOCHS), "--out", out)
    last, inodes, deadline = os.path.join(out, "last.pt"), [], time.monotonic() + 120
    while len(inodes) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoints after 120 s"
        try:
            inode = os.stat(last).st_ino  # os.replace: every save is a new inode
        except FileNotFoundError:
            inode = None
        if inode is not None and (not inodes or inodes[-1][0] != inode):
            inodes.append((inode, time.monotonic()))
        time.sleep(0.001)
    epoch_s = inodes[1][1] - inodes[0][1]
    time.sleep(random.Random(seed).uniform(0.1, 3.0) * epoch_s)  # within epochs 3..5 of 10
    assert proc.poll() is None, "the run ended before the signal; the test would prove nothing"
    return proc


def test_sigkill_at_a_random_moment_then_resume_gives_identical_metrics(tmp_path, reference):
    out = str(tmp_path / "run")
    proc = _start_then_wait(out, seed=7)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(os.path.join(out, "last.pt"))  # a kill never leaves a broken last.pt
    assert 2 <= state["position"]["epoch"] < EPOCHS and state["position"]["step"] == 0
    assert not json.load(open(os.path.join(out, "metrics.json")))["finished"]
    resumed = train(parse_args([*RUN, "--epochs", str(EPOCHS), "--out", out, "--resume"], default_config=MLP4))
    assert outcome(resumed) == outcome(reference[1])


def test_sigint_saves_a_mid_epoch_checkpoint_and_resume_gives_identical_metrics(tmp_path, reference):
    out = str(tmp_path / "run")
    proc = _start_then_wait(out, seed=11)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "continue with --resume" in stderr
    state = load_checkpoint(os.path.join(out, "last.pt"))
    position = state["position"]
    assert position["step"] > 0, "a Ctrl-C checkpoint holds the position inside the epoch"
    assert 2 <= position["epoch"] < EPOCHS
    # Every batch holds 32 samples but an epoch's last one, which the signal may follow at once.
    assert 32 * (position["step"] - 1) < state["meter"]["seen"] <= 32 * position["step"]
    resumed = train(parse_args([*RUN, "--epochs", str(EPOCHS), "--out", out, "--resume"], default_config=MLP4))
    assert outcome(resumed) == outcome(reference[1])


@pytest.mark.parametrize("where", ["last", "middle"])
def test_sigint_at_a_chosen_step_then_resume_gives_identical_metrics(tmp_path, reference, capsys, monkeypatch, where):
    """The timed test above lands wherever the machine's speed puts it; this one sends SIGINT
    (through the real handler) right after epoch 3's last batch, before its validation, or in
    its middle."""
    import nsr.train.engine as engine
    steps_per_epoch = reference[1]["global_steps"] // EPOCHS
    at = 3 * steps_per_epoch if where == "last" else 2 * steps_per_epoch + steps_per_epoch // 2
    calls, plain_step = [0], engine.Trainer.train_step

    def step_then_signal(self, xb, yb):
        plain_step(self, xb, yb)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal)
    out = str(tmp_path / "run")
    code, err = run_main(capsys, [*RUN, "--epochs", str(EPOCHS), "--out", out])
    assert code == 130 and "continue with --resume" in err
    position = load_checkpoint(os.path.join(out, "last.pt"))["position"]
    assert (position["epoch"], position["step"]) == (2, at - 2 * steps_per_epoch)
    monkeypatch.setattr(engine.Trainer, "train_step", plain_step)
    resumed = train(parse_args([*RUN, "--epochs", str(EPOCHS), "--out", out, "--resume"], default_config=MLP4))
    assert outcome(resumed) == outcome(reference[1])


def test_nonfinite_loss_stops_naming_epoch_step_and_the_kept_checkpoint(tmp_path, capsys):
    # lr x 1e8 after the first epoch: epoch 1 finishes, epoch 2 diverges within a few steps.
    out = str(tmp_path / "run")
    code, err = run_main(capsys, [*RUN, "--epochs", "3", "--out", out, "--scheduler", "multistep",
                                  "--milestones", "1", "--gamma", "1e8"])
    assert code == 2
    line = assert_one_error_line(err, "loss became NaN or infinite in epoch 2, step ",
                                 f"last good checkpoint {os.path.join(out, 'last.pt')} (end of epoch 1) is kept")
    assert "--overwrite" in line
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert (state["position"]["epoch"], state["position"]["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert not metrics["finished"] and len(metrics["history"]) == 1


# ---------------------------------------------------------------------------------- --overwrite

def _finished_copy(reference, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference[0], out)
    return out, fingerprint(out)


def _wait_for(path, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def test_overwrite_that_diverges_before_its_first_checkpoint_keeps_the_finished_run(reference, tmp_path):
    out, before = _finished_copy(reference, tmp_path)
    proc = popen("fdnn_nsr.py", *RUN, "--epochs", str(EPOCHS), "--out", out, "--overwrite", "--lambda", "1e30")
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2
    assert_one_error_line(stderr, "loss became NaN or infinite in epoch 1", "no checkpoint of this run",
                          f"the previous run in {out} is kept as it was")
    assert fingerprint(out) == before, "best.pt, last.pt, metrics.json, history.csv, config.yaml untouched"


def test_overwrite_that_raises_before_its_first_checkpoint_keeps_the_finished_run(reference, tmp_path,
                                                                                   monkeypatch):
    import nsr.train.engine as engine

    out, before = _finished_copy(reference, tmp_path)
    step = engine.Trainer.train_step

    def fails_at_step_3(self, xb, yb):
        if self.pos.step == 2:
            assert set(os.listdir(out)) == {"config.yaml", f".previous-{os.getpid()}", LOCK_NAME}, \
                "the old run is set aside"
            raise RuntimeError("a bug in the training step")
        step(self, xb, yb)

    monkeypatch.setattr(engine.Trainer, "train_step", fails_at_step_3)
    with pytest.raises(RuntimeError, match="a bug in the training step"):
        train(parse_args([*RUN, "--epochs", str(EPOCHS), "--out", out, "--overwrite"], default_config=MLP4))
    assert fingerprint(out) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(reference, tmp_path):
    out, _ = _finished_copy(reference, tmp_path)
    m = train(parse_args([*RUN, "--epochs", "1", "--lr", "0.02", "--out", out, "--overwrite"], default_config=MLP4))
    assert sorted(os.listdir(out)) == ["best.pt", "config.yaml", "history.csv", "last.pt", "metrics.json"]
    assert len(m["history"]) == 1 and load_checkpoint(os.path.join(out, "last.pt"))["config"]["lr"] == 0.02


def _overwrite_with_long_epochs(out):
    """An --overwrite run whose first epoch takes seconds (batch 1: 1,150 steps); returns it once
    it has set the old run aside."""
    proc = popen("fdnn_nsr.py", *RUN, "--batch-size", "1", "--epochs", str(EPOCHS), "--out", out, "--overwrite")
    _wait_for(os.path.join(out, f".previous-{proc.pid}"), proc)
    _wait_for(os.path.join(out, "config.yaml"), proc)
    time.sleep(0.3)
    assert not os.path.exists(os.path.join(out, "last.pt")), "still before the first checkpoint"
    return proc


def test_ctrl_c_before_the_first_checkpoint_of_an_overwrite_keeps_the_finished_run(reference, tmp_path):
    out, before = _finished_copy(reference, tmp_path)
    proc = _overwrite_with_long_epochs(out)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "before the first checkpoint" in stderr and "is kept as it was" in stderr
    assert fingerprint(out) == before


def test_sigkill_during_an_overwrite_then_the_next_start_restores_the_finished_run(reference, tmp_path):
    out, before = _finished_copy(reference, tmp_path)
    proc = _overwrite_with_long_epochs(out)
    proc.kill()
    proc.communicate(timeout=60)
    assert os.path.isdir(os.path.join(out, f".previous-{proc.pid}")), "the old run survives the kill"
    again = popen("fdnn_nsr.py", *RUN, "--epochs", str(EPOCHS), "--out", out)
    _, stderr = again.communicate(timeout=180)
    assert again.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: restored the run in {out}"), stderr
    assert lines[1] == f"error: {out} already holds a finished run; pass --overwrite to replace it, " \
                       "or choose another --out"
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- resume

def test_resume_without_a_checkpoint_says_so_even_when_quiet_and_stale_temporaries_go(tmp_path):
    out = tmp_path / "new"
    out.mkdir()
    dead = 2 ** 22 + 11  # above Linux's largest pid: no such process
    for name in (f"last.pt.tmp.{dead}", f"best.pt.tmp.{dead}"):
        (out / name).write_bytes(b"half a checkpoint")
    proc = popen("fdnn_nsr.py", *RUN, "--max-steps", "2", "--out", str(out), "--resume")
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert stderr.strip() == f"warning: --resume: no checkpoint in {out}; starting a new run there"
    assert sorted(os.listdir(out)) == ["config.yaml", "history.csv", "last.pt", "metrics.json"]


def test_resume_without_a_checkpoint_and_a_bad_setting_is_one_error_line(tmp_path, capsys):
    code, err = run_main(capsys, [*RUN, "--out", str(tmp_path / "new"), "--resume", "--nsr-layers", "outt"])
    assert code == 2
    assert_one_error_line(err, "NSR layer 'outt'")
    assert not (tmp_path / "new").exists()


def test_max_steps_stop_then_resume_gives_identical_metrics(tmp_path, reference):
    """digits at batch 32 has 36 steps per epoch: --max-steps 50 stops inside epoch 2."""
    out = str(tmp_path / "run")
    proc = popen("fdnn_nsr.py", *RUN, "--epochs", str(EPOCHS), "--max-steps", "50", "--out", out)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert "stopped by --max-steps in epoch 2 at step 14/36" in stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert len(metrics["history"]) == 1 and metrics["partial_epoch"]["step"] == 14
    resumed = train(parse_args([*RUN, "--epochs", str(EPOCHS), "--out", out, "--resume"], default_config=MLP4))
    assert resumed["partial_epoch"] is None
    assert outcome(resumed) == outcome(reference[1])
