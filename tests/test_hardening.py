"""Bad input gives one clear line and changes nothing; faults never cost a run.

Where each failure mode is tested (checks that already live elsewhere are referenced, not repeated):

  bad input                               where
  unknown flag (closest name)             here (unknown-flag); in a real process: test_entry_points.py
  unknown YAML key (closest name)         test_config.py::test_bad_yaml_keys_and_types
  wrong type (flag / YAML)                test_config.py::test_bad_command_line_is_one_clear_error,
                                          ::test_bad_yaml_keys_and_types
  lambda negative / NaN / inf             test_config.py::test_bad_command_line_is_one_clear_error;
                                          here lambda nan through cnn_nsr.py (lambda-nan)
  lambda count != regularized layers      test_config.py::test_bad_command_line_is_one_clear_error
  unknown model / data set                test_config.py::test_bad_command_line_is_one_clear_error
  unknown NSR layer (closest names)       here (unknown-layer)
  a layer named twice                     here (layer-twice), refused by the library
  --data-dir missing, download impossible here (offline), nothing created in --data-dir
  --data-dir incomplete                   test_data.py::test_incomplete_folder_names_the_missing_files;
                                          here (incomplete-data-dir)
  idx file truncated / wrong magic        test_data.py::test_read_idx_rejects_bad_magic_truncation_and_broken_gzip;
                                          here (wrong-magic-idx, truncated-idx); more in test_data_errors.py
  labels outside the classes              test_data.py::test_labels_outside_the_classes_and_oversized_batches_are_rejected
  batch size > training set               same test_data test; here (batch-too-large)
  finished run in --out                   here, files byte-for-byte untouched (finished-run);
                                          --overwrite that cannot start leaves it intact too
  --out not writable                      here (out-under-a-file, out-in-proc)
  YAML that is not YAML                   test_config.py::test_bad_yaml_keys_and_types; here (invalid-yaml)
  nesterov without momentum, huge         here (nesterov-no-momentum, threads-huge, fake-size-huge);
  --threads / --fake-size                 the rest in test_config.py
  --per-channel on N x D outputs, NSR     here (per-channel-2d, nsr-on-input)
  on the input (flatten)
  model that cannot take the data         test_engine.py::test_a_model_that_cannot_take_the_data_fails_before_training
  crafted last.pt (right marker)          here (crafted-position, crafted-shape, malicious-last.pt)
  --resume with no / a lost checkpoint    here: a warning line even with --quiet; results without
                                          last.pt is an error (resume-without-last.pt)
  faults                                  here: atomic + complete checkpoints, truncated / foreign /
                                          malicious last.pt, SIGKILL while last.pt is written, SIGINT
                                          then --resume (identical metrics; --max-steps then --resume
                                          in test_engine.py), NaN loss, resume with other settings,
                                          stale temporaries removed; --overwrite that fails (NaN,
                                          exception, Ctrl-C, SIGKILL) before its first checkpoint
                                          keeps the finished run

Every bad-input case runs the real script file in-process (tests/helpers.run_in_process: the same
main() and run_cli, so the same exit code and line); test_entry_points.py proves for each script
that a real process exits 2 with one such line. Signals arrive at a chosen step or inside a chosen
checkpoint write (tests/signal_at.py), never after a timed wait.
"""

import json
import os
import shlex
import shutil
import signal

import pytest
import torch

import nsr.train.checkpoint as checkpoint
import nsr.train.engine as engine
from nsr.train.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from nsr.train.datasets import IDX_FILES, offline_reason
from nsr.train.fileio import WriteError
from nsr.train.outdir import LOCK_NAME
from tests.helpers import (
    DIGITS,
    DIGITS_EPOCHS,
    STEPS_PER_EPOCH,
    assert_error,
    fingerprint,
    outcome,
    run_in_process,
    run_script,
    step_then_signal,
)
from tests.test_data import write_mnist_like

REF = [*DIGITS, "--epochs", str(DIGITS_EPOCHS)]  # the reference run's settings: --resume accepts them


def copy_of(reference, tmp_path, name="run"):
    out = str(tmp_path / name)
    shutil.copytree(reference[0], out)
    return out


# ---------------------------------------------------------------------------------- bad input

class _Payload:
    """Unpickling this runs os.system: what a booby-trapped checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _crafted(reference, tmp_path, damage):
    """A copy of the finished run whose last.pt carries the format marker but bad contents."""
    out = copy_of(reference, tmp_path, f"crafted-{damage}")
    last = os.path.join(out, "last.pt")
    if damage == "no-last":
        os.remove(last)
    elif damage == "malicious":
        torch.save({"format": FORMAT, "model": _Payload(str(tmp_path / "pwned"))}, last)
    else:
        state = torch.load(last, weights_only=True)
        if damage == "position":
            state["position"]["epoch"] = "x"
        else:
            state["model"]["fc1.weight"] = torch.zeros(3)
        torch.save(state, last)
    return out


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


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# name -> (script, args given (tmp_path, reference), fragments of the one error line). Each case's
# --out is tmp_path/out unless its args name one; a case that cannot start must not create it.
CASES = {
    "unknown-flag": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--lamda", "3"],
                     ["unknown option --lamda; did you mean --lambda?"]),
    "lambda-nan": ("cnn_nsr.py", lambda t, r: ["--lambda", "nan"], ["lambda for NSR layer 'fc' must be a finite number >= 0, got nan"]),
    "invalid-yaml": ("fdnn_vanilla.py", lambda t, r: ["--config", _file(t, "bad.yaml", "lr: 0.1\nepochs: [1, 2\n")],
                     ["is not valid YAML at line 3"]),
    "unknown-layer": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--regularized-layers", "outt"],
                  ["NSR layer 'outt' is not a module of the model", "closest valid names: out"]),
    "layer-twice": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--regularizer", "center", "--regularized-layers", "out",
                                                 "fc3", "out", "--lambda", "1", "2", "3"],
                    ["center-loss layer 'out' is named twice; name each layer once",
                     "(regularized_layers in the config, or --regularized-layers)"]),
    "offline": ("fdnn_nsr.py", lambda t, r: ["--dataset", "mnist", "--data-dir", str(t / "empty"), "--quiet"],
                ["mnist not found", "cannot be downloaded: no network", "--dataset digits"]),
    "out-under-a-file": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--out", os.path.join(_file(t, "a-file", "x"), "sub")],
                         ["cannot write to output folder", "Not a directory", "choose another --out"]),
    "out-in-proc": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--out", "/proc/nsr-run"],
                    ["cannot write to output folder /proc/nsr-run"]),
    "finished-run": ("fdnn_nsr.py", lambda t, r: [*REF, "--out", r[0]],
                     ["already holds a finished run; pass --overwrite"]),
    "malicious-last.pt": ("fdnn_nsr.py", lambda t, r: [*REF, "--out", _crafted(r, t, "malicious"), "--resume"],
                          ["refusing to load", "only load checkpoints you trust"]),
    "crafted-position": ("fdnn_nsr.py", lambda t, r: [*REF, "--out", _crafted(r, t, "position"), "--resume"],
                         ["does not fit this run", "position epoch must be an int, got 'x'"]),
    "crafted-shape": ("fdnn_nsr.py", lambda t, r: [*REF, "--out", _crafted(r, t, "shape"), "--resume"],
                      ["does not fit this run", "size mismatch for fc1.weight"]),
    "resume-without-last.pt": ("fdnn_nsr.py", lambda t, r: [*REF, "--out", _crafted(r, t, "no-last"), "--resume"],
                               ["holds a run (metrics.json, history.csv, best.pt) but no last.pt", "--overwrite"]),
    "nesterov-no-momentum": ("cnn_nsr.py", lambda t, r: ["--momentum", "0"], ["nesterov needs momentum > 0"]),
    "threads-huge": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--threads", "1000000"],
                     ["threads must lie in 0..", "got 1000000"]),
    "fake-size-huge": ("fdnn_vanilla.py", lambda t, r: [*DIGITS, "--dataset", "fake", "--fake-size", "1000000000000"],
                       ["not enough memory", "lower --batch-size, --eval-batch-size, --queue-batches or --fake-size"]),
    "per-channel-2d": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--per-channel"],
                       ["per_channel averages N x C x H x W outputs", "(out) give N x D"]),
    "nsr-on-input": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--regularized-layers", "flatten"],
                     ["NSR layer 'flatten' has no trainable parameters before it"]),
    "incomplete-data-dir": ("fdnn_nsr.py", lambda t, r: ["--dataset", "mnist", "--data-dir", _idx_folder(t, "incomplete"),
                                                         "--quiet"],
                            ["holds only part of mnist: missing t10k-images-idx3-ubyte"]),
    "wrong-magic-idx": ("fdnn_nsr.py", lambda t, r: ["--dataset", "mnist", "--data-dir", _idx_folder(t, "magic"), "--quiet"],
                        ["train-images-idx3-ubyte is not an idx file of unsigned bytes (bad magic number 00000d03)"]),
    "truncated-idx": ("fdnn_nsr.py", lambda t, r: ["--dataset", "mnist", "--data-dir", _idx_folder(t, "truncated"),
                                                   "--quiet"],
                      ["train-labels-idx1-ubyte is truncated or padded: 45 bytes for shape (40,), expected 48"]),
    "batch-too-large": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--batch-size", "5000"],
                        ["batch_size 5000 is larger than the training set (1150 samples"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(digits_reference, tmp_path, case):
    script, make_args, fragments = CASES[case]
    if case == "offline":
        if offline_reason("mnist") is None:
            pytest.skip("this machine reaches the MNIST mirrors")
        (tmp_path / "empty").mkdir()
    args = make_args(tmp_path, digits_reference)
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    out = args[args.index("--out") + 1]
    before = fingerprint(out) if os.path.isdir(out) else None
    assert_error(run_in_process(script, *args), *fragments)
    if before is None:
        assert not os.path.exists(out), "a run that cannot start leaves no output folder"
    else:
        assert fingerprint(out) == before, "the run in --out is untouched"
    if case == "offline":
        assert os.listdir(tmp_path / "empty") == [], "nothing created in --data-dir"
    if case == "malicious-last.pt":
        marker = str(tmp_path / "pwned")
        assert not os.path.exists(marker), "the payload ran"
        # ... and the payload is live: an unsafe load would have run it
        torch.load(os.path.join(out, "last.pt"), weights_only=False)
        assert os.path.exists(marker)


def test_overwrite_that_cannot_start_keeps_the_finished_run(digits_reference):
    out = digits_reference[0]
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REF, "--out", out, "--overwrite", "--regularized-layers", "outt"),
                 "NSR layer 'outt'")
    assert fingerprint(out) == before


def test_resume_with_other_settings_is_refused_naming_the_key(digits_reference):
    out = digits_reference[0]
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REF, "--out", out, "--resume", "--lr", "0.1"),
                 "cannot resume", "settings differ", "lr: 0.05 -> 0.1")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- checkpoints

def test_checkpoint_holds_everything_a_resume_needs(digits_reference):
    out, metrics, _ = digits_reference
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert state["format"] == FORMAT
    assert {"model", "optimizer", "scheduler", "regularizer", "rng", "config", "position", "meter"} <= set(state)
    assert state["model"] and state["optimizer"]["param_groups"] and "last_epoch" in state["scheduler"]
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in state["optimizer"]["state"].values())
    assert any(torch.is_tensor(v) and v.abs().sum() > 0 for v in state["regularizer"].values()), "NSR memory"
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["position"]["epoch"] == DIGITS_EPOCHS and state["position"]["step"] == 0
    assert state["position"]["history"] == metrics["history"]
    assert state["config"]["lr"] == 0.05 and state["config"]["dataset"] == "digits"


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
def test_truncated_or_foreign_checkpoint_is_refused(tmp_path, digits_reference, damage, message):
    out = copy_of(digits_reference, tmp_path)
    last = os.path.join(out, "last.pt")
    if damage == "truncate":
        with open(last, "r+b") as f:
            f.truncate(os.path.getsize(last) // 2)
    else:
        torch.save({"model": {}, "epoch": 3}, last)  # a plain torch.save'd dict
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REF, "--out", out, "--resume"), message)
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------- faults

def resume(out):
    """--resume of the reference's settings in `out`, in-process: the run's final metrics."""
    result = run_in_process("fdnn_nsr.py", *REF, "--out", out, "--resume")
    assert result.code == 0 and result.err == "", result.err
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_while_last_pt_is_written_then_resume_gives_identical_metrics(tmp_path, digits_reference):
    """The worst moment for a kill: epoch 3's last.pt is complete in its temporary file, not yet
    renamed. last.pt must still be epoch 2's, whole; --resume removes the temporary and finishes
    with the metrics of the uninterrupted run."""
    out = str(tmp_path / "run")
    proc = run_script("tests/signal_at.py", "SIGKILL", "last.pt:3", "fdnn_nsr.py", *REF, "--out", out, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [n for n in os.listdir(out) if n.startswith("last.pt.tmp.")]
    assert len(leftovers) == 1, "the kill landed inside the write (the test would prove nothing otherwise)"
    state = load_checkpoint(os.path.join(out, "last.pt"))  # a kill never leaves a broken last.pt
    assert (state["position"]["epoch"], state["position"]["step"]) == (2, 0)
    assert not json.load(open(os.path.join(out, "metrics.json")))["finished"]
    assert outcome(resume(out)) == outcome(digits_reference[1])
    assert not [n for n in os.listdir(out) if ".tmp." in n], "the stale temporary is removed"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigint_saves_a_mid_epoch_checkpoint_and_resume_gives_identical_metrics(tmp_path, digits_reference):
    """Ctrl-C through the real script in a real process, in the middle of epoch 3: exit code 130,
    one line saying how to continue, no traceback; --resume gives the uninterrupted metrics."""
    out = str(tmp_path / "run")
    at = 2 * STEPS_PER_EPOCH + 17
    proc = run_script("tests/signal_at.py", "SIGINT", f"step:{at}", "fdnn_nsr.py", *REF, "--out", out, check=False)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == (f"interrupted in epoch 3 at step 17; saved {os.path.join(out, 'last.pt')}; "
                                   "continue with --resume")
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert (state["position"]["epoch"], state["position"]["step"], state["position"]["global_step"]) == (2, 17, at)
    assert state["meter"]["seen"] == 32 * 17, "the epoch's running sums are saved with the position"
    assert outcome(resume(out)) == outcome(digits_reference[1])


def test_sigint_after_the_last_batch_before_validation_then_resume_gives_identical_metrics(
        tmp_path, digits_reference, monkeypatch):
    """SIGINT (through the real handler) right after epoch 3's last batch, before its validation:
    the checkpoint holds a complete epoch that has not been validated yet."""
    at = 3 * STEPS_PER_EPOCH
    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal(engine.Trainer.train_step, at))
    out = str(tmp_path / "run")
    result = run_in_process("fdnn_nsr.py", *REF, "--out", out)
    assert result.code == 130 and "continue with --resume" in result.err, result.err
    position = load_checkpoint(os.path.join(out, "last.pt"))["position"]
    assert (position["epoch"], position["step"]) == (2, STEPS_PER_EPOCH)
    monkeypatch.undo()
    assert outcome(resume(out)) == outcome(digits_reference[1])


def test_nonfinite_loss_stops_naming_epoch_step_and_the_kept_checkpoint(tmp_path):
    # lr x 1e8 after the first epoch: epoch 1 finishes, epoch 2 diverges within a few steps.
    out = str(tmp_path / "run")
    line = assert_error(run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "3", "--out", out, "--scheduler",
                                       "multistep", "--milestones", "1", "--gamma", "1e8"),
                        "loss became NaN or infinite in epoch 2, step ",
                        f"last good checkpoint {os.path.join(out, 'last.pt')} (end of epoch 1) is kept")
    assert "--overwrite" in line
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert (state["position"]["epoch"], state["position"]["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert not metrics["finished"] and len(metrics["history"]) == 1


# ---------------------------------------------------------------------------------- --overwrite

def test_overwrite_that_diverges_before_its_first_checkpoint_keeps_the_finished_run(digits_reference, tmp_path):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    assert_error(run_in_process("fdnn_nsr.py", *REF, "--out", out, "--overwrite", "--lambda", "1e30"),
                 "loss became NaN or infinite in epoch 1", "no checkpoint of this run",
                 f"the previous run in {out} is kept as it was")
    assert fingerprint(out) == before, "best.pt, last.pt, metrics.json, history.csv, config.yaml untouched"


def test_overwrite_that_raises_before_its_first_checkpoint_keeps_the_finished_run(digits_reference, tmp_path,
                                                                                   monkeypatch):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    step = engine.Trainer.train_step

    def fails_at_step_3(self, xb, yb):
        if self.pos.step == 2:
            # tb/: the new run's; the old one is set aside with the other files
            assert set(os.listdir(out)) == {"config.yaml", f".previous-{os.getpid()}", LOCK_NAME, "tb"}, \
                "the old run is set aside"
            raise RuntimeError("a bug in the training step")
        step(self, xb, yb)

    monkeypatch.setattr(engine.Trainer, "train_step", fails_at_step_3)
    with pytest.raises(RuntimeError, match="a bug in the training step"):
        run_in_process("fdnn_nsr.py", *REF, "--out", out, "--overwrite")
    assert fingerprint(out) == before


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(digits_reference, tmp_path):
    out = copy_of(digits_reference, tmp_path)
    result = run_in_process("fdnn_nsr.py", *DIGITS, "--epochs", "1", "--lr", "0.02", "--out", out, "--overwrite")
    assert result.code == 0, result.err
    assert sorted(os.listdir(out)) == ["best.pt", "config.yaml", "history.csv", "last.pt", "metrics.json", "tb"]
    assert len(json.load(open(os.path.join(out, "metrics.json")))["history"]) == 1
    assert load_checkpoint(os.path.join(out, "last.pt"))["config"]["lr"] == 0.02


def test_ctrl_c_before_the_first_checkpoint_of_an_overwrite_keeps_the_finished_run(digits_reference, tmp_path,
                                                                                    monkeypatch):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    monkeypatch.setattr(engine.Trainer, "train_step", step_then_signal(engine.Trainer.train_step, 3))
    result = run_in_process("fdnn_nsr.py", *REF, "--out", out, "--overwrite")
    assert result.code == 130, result.err
    assert result.err.strip() == (f"interrupted in epoch 1 at step 3, before the first checkpoint; the previous "
                                  f"run in {out} is kept as it was")
    assert fingerprint(out) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_during_an_overwrite_then_the_next_start_restores_the_finished_run(digits_reference, tmp_path):
    out = copy_of(digits_reference, tmp_path)
    before = fingerprint(out)
    proc = run_script("tests/signal_at.py", "SIGKILL", "step:3", "fdnn_nsr.py", *REF, "--out", out, "--overwrite",
                      check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    aside = [n for n in os.listdir(out) if n.startswith(".previous-")]
    assert len(aside) == 1 and not os.path.exists(os.path.join(out, "last.pt")), "the old run survives the kill"
    result = run_in_process("fdnn_nsr.py", *REF, "--out", out)
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: restored the run in {out}"), result.err
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
    result = run_in_process("fdnn_nsr.py", *DIGITS, "--max-steps", "2", "--out", str(out), "--resume")
    assert result.code == 0, result.err
    assert result.err.strip() == f"warning: --resume: no checkpoint in {out}; starting a new run there"
    assert sorted(os.listdir(out)) == ["config.yaml", "history.csv", "last.pt", "metrics.json", "tb"]


def test_resume_without_a_checkpoint_and_a_bad_setting_is_one_error_line(tmp_path):
    assert_error(run_in_process("fdnn_nsr.py", *DIGITS, "--out", str(tmp_path / "new"), "--resume",
                                "--regularized-layers", "outt"), "NSR layer 'outt'")
    assert not (tmp_path / "new").exists()
