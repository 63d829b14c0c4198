"""Bad input gives one clear line and changes nothing: exit code 2, one `error:` line naming the
fix, no traceback, and the output folder neither created nor touched.

Where each kind of bad input is tested (checks that live elsewhere are referenced, not repeated):

  bad input                               where
  unknown flag (closest name)             here (unknown-flag); more flags in
                                          test_run_folder.py::test_an_unknown_flag_names_the_one_meant;
                                          in a real process: test_entry_points.py
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
  finished run in --out                   here, files byte-for-byte untouched (finished-run); an
                                          --overwrite that cannot start leaves it intact: test_overwrite.py
  --out not writable                      here (out-under-a-file, out-in-proc)
  YAML that is not YAML                   test_config.py::test_bad_yaml_keys_and_types; here (invalid-yaml)
  a YAML key given twice, --config twice, here (test_contradicting_or_repeated_inputs_are_refused; an NNI
  --resume with --overwrite               config: test_a_search_config_with_a_key_given_twice_is_refused)
  nesterov without momentum, huge         here (nesterov-no-momentum, threads-huge, fake-size-huge);
  --threads / --fake-size                 the rest in test_config.py
  --per-channel on N x D outputs, NSR     here (per-channel-2d, nsr-on-input)
  on the input (flatten)
  a setting the run would not read        here (the vanilla script's regularizer settings, the flags of
                                          another choice); that none is recorded: test_config.py
  a device this torch cannot use          here
  model that cannot take the data         test_engine.py::test_a_model_that_cannot_take_the_data_fails_before_training
  crafted last.pt (right marker)          here (crafted-position, crafted-shape, malicious-last.pt); every
                                          part of a checkpoint, and files that are not one: test_checkpoints.py
  --resume with no / a lost checkpoint    test_resume.py: a warning line even with --quiet; results without
                                          last.pt is an error here (resume-without-last.pt)
  faults (signals, kills, full disks,     test_resume.py, test_overwrite.py, test_faults.py,
  NaN losses)                             test_folder_lock.py, test_run_folder.py, test_crash_points.py

Every case runs the real script file (tests/helpers.run_in_process) or its main() (run_main)
in-process: the same main() and run_cli, so the same exit code and line; test_entry_points.py
proves for each script that a real process exits 2 with one such line.
"""

import os
import shlex
import signal

import pytest
import torch

from nsr.search import launcher
from nsr.train.checkpoint import FORMAT
from nsr.train.config import parse_args
from nsr.train.datasets import IDX_FILES, offline_reason
from nsr.train.errors import UserError
from tests.helpers import (
    DIGITS,
    DIGITS_BASE,
    REFERENCE_ARGS,
    assert_error,
    assert_one_error_line,
    copy_of,
    fingerprint,
    run_in_process,
    run_main,
    run_vanilla_script,
    write_file,
    write_mnist_like,
)


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


# name -> (script, args given (tmp_path, reference), fragments of the one error line). Each case's
# --out is tmp_path/out unless its args name one; a case that cannot start must not create it.
CASES = {
    "unknown-flag": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--lamda", "3"],
                     ["unknown option --lamda; did you mean --lambda?"]),
    "lambda-nan": ("cnn_nsr.py", lambda t, r: ["--lambda", "nan"], ["lambda for NSR layer 'fc' must be a finite number >= 0, got nan"]),
    "invalid-yaml": ("fdnn_vanilla.py", lambda t, r: ["--config", write_file(t, "bad.yaml", "lr: 0.1\nepochs: [1, 2\n")],
                     ["is not valid YAML at line 3"]),
    "unknown-layer": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--regularized-layers", "outt"],
                  ["NSR layer 'outt' is not a module of the model", "closest valid names: out"]),
    "layer-twice": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--regularizer", "center", "--regularized-layers", "out",
                                                 "fc3", "out", "--lambda", "1", "2", "3"],
                    ["center-loss layer 'out' is named twice; name each layer once",
                     "(regularized_layers in the config, or --regularized-layers)"]),
    "offline": ("fdnn_nsr.py", lambda t, r: ["--dataset", "mnist", "--data-dir", str(t / "empty"), "--quiet"],
                ["mnist not found", "cannot be downloaded: no network", "--dataset digits"]),
    "out-under-a-file": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--out", os.path.join(write_file(t, "a-file", "x"), "sub")],
                         ["cannot write to output folder", "Not a directory", "choose another --out"]),
    "out-in-proc": ("fdnn_nsr.py", lambda t, r: [*DIGITS, "--out", "/proc/nsr-run"],
                    ["cannot write to output folder /proc/nsr-run"]),
    "finished-run": ("fdnn_nsr.py", lambda t, r: [*REFERENCE_ARGS, "--out", r[0]],
                     ["already holds a finished run; pass --overwrite"]),
    "malicious-last.pt": ("fdnn_nsr.py", lambda t, r: [*REFERENCE_ARGS, "--out", _crafted(r, t, "malicious"), "--resume"],
                          ["refusing to load", "only load checkpoints you trust"]),
    "crafted-position": ("fdnn_nsr.py", lambda t, r: [*REFERENCE_ARGS, "--out", _crafted(r, t, "position"), "--resume"],
                         ["does not fit this run", "position epoch must be an int, got 'x'"]),
    "crafted-shape": ("fdnn_nsr.py", lambda t, r: [*REFERENCE_ARGS, "--out", _crafted(r, t, "shape"), "--resume"],
                      ["does not fit this run", "size mismatch for fc1.weight"]),
    "resume-without-last.pt": ("fdnn_nsr.py", lambda t, r: [*REFERENCE_ARGS, "--out", _crafted(r, t, "no-last"), "--resume"],
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


# ---------------------------------------------------------------------------------- contradicting inputs

@pytest.mark.parametrize("case", ["resume-and-overwrite", "second-config", "duplicate-yaml-key",
                                  "duplicate-key-in-a-nested-mapping"])
def test_contradicting_or_repeated_inputs_are_refused(tmp_path, capsys, case):
    a = write_file(tmp_path, "a.yaml", "lr: 0.05\n")
    cases = {
        "resume-and-overwrite": (["--resume", "--overwrite"], ["--resume and --overwrite contradict each other"]),
        "second-config": (["--config", a, "--config", write_file(tmp_path, "b.yaml", "lr: 0.1\n")],
                          [f"--config given twice ({a}, {tmp_path / 'b.yaml'}); one YAML file sets the defaults"]),
        "duplicate-yaml-key": (["--config", write_file(tmp_path, "d.yaml", "lr: 0.1\nepochs: 2\nlr: 0.2\n")],
                               ["is not valid YAML at line 3: key 'lr' is given twice (first at line 1); keep one"]),
        "duplicate-key-in-a-nested-mapping": (
            ["--config", write_file(tmp_path, "n.yaml", "lr: 0.1\nx: {a: 1, a: 2}\n")],
            ["is not valid YAML at line 2: key 'a' is given twice"]),
    }
    argv, fragments = cases[case]
    code, err = run_main(capsys, [*DIGITS, "--max-steps", "2", *argv, "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_error_line(err, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_search_config_with_a_key_given_twice_is_refused(tmp_path):
    """The same YAML loader reads configs/nni/*.yml for python -m nsr search."""
    nni_yml = tmp_path / "dup.yml"
    nni_yml.write_text("experimentName: x\nmaxTrialNumber: 2\nmaxTrialNumber: 3\n")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(UserError, match=r"is not valid YAML at line 3: key 'maxTrialNumber' is given twice "
                                            r"\(first at line 2\); keep one"):
            launcher.main([str(nni_yml), "--port", "0", "--out", str(tmp_path / "out"),
                           "--experiment-dir", str(tmp_path / "nni")])
    finally:
        for s, handler in handlers.items():  # main() installs its own
            signal.signal(s, handler)
    assert not (tmp_path / "nni").exists()


# ---------------------------------------------------------------------------------- unread settings

@pytest.mark.parametrize("argv, fragment", [
    (["--regularizer", "nsr"], "--regularizer nsr: this script always trains with regularizer 'none'"),
    (["--regularizer", "center"], "--regularizer center: this script always trains with regularizer 'none'"),
    (["--lambda", "3"], "--lambda has no effect here: only --regularizer nsr or center uses it (this run: none); drop it"),
    (["--regularized-layers", "fc1"], "--regularized-layers has no effect here"),
    (["--queue-batches", "3"], "--queue-batches has no effect here"),
    (["--active-only"], "--active-only has no effect here"),
    (["--no-per-channel"], "--per-channel has no effect here"),
    (["--center-alpha", "0.3"], "--center-alpha has no effect here"),
    (["--config", "REGULARIZED_YAML"], "sets regularizer: center: this script always trains with regularizer 'none'"),
], ids=["regularizer-nsr", "regularizer-center", "lambda", "regularized-layers", "queue-batches", "active-only",
        "no-per-channel", "center-alpha", "yaml-regularizer"])
def test_the_vanilla_script_refuses_a_regularizer_and_its_settings(tmp_path, capsys, monkeypatch, argv, fragment):
    if argv[-1] == "REGULARIZED_YAML":
        argv = ["--config", write_file(tmp_path, "center.yaml", "model: mlp4\nregularizer: center\n")]
    out = tmp_path / "out"
    code, err = run_vanilla_script(capsys, monkeypatch, [*DIGITS_BASE, "--max-steps", "2", *argv, "--out", str(out)])
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--regularizer", "center", "--queue-batches", "3"],
     "--queue-batches has no effect here: only --regularizer nsr uses it (this run: center)"),
    (["--regularizer", "center", "--per-channel"], "active_only and per_channel are NSR options"),
    (["--center-alpha", "0.3"], "--center-alpha has no effect here: only --regularizer center uses it (this run: nsr)"),
    (["--scheduler", "cosine", "--milestones", "5"], "--milestones has no effect here: only --scheduler multistep"),
    (["--gamma", "0.5"], "--gamma has no effect here: only --scheduler multistep uses it (this run: none)"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum has no effect here: only --optimizer sgd uses it"),
    (["--optimizer", "adamw", "--no-nesterov"], "--nesterov has no effect here"),
    (["--cutout", "8"], "--cutout has no effect here: only --augment crop_flip_cutout uses it (this run: none)"),
    (["--fake-size", "64"], "--fake-size has no effect here: only --dataset fake uses it (this run: digits)"),
], ids=["center-queue", "center-per-channel", "nsr-center-alpha", "cosine-milestones", "none-gamma",
        "adam-momentum", "adamw-nesterov", "cutout", "fake-size"])
def test_flags_the_run_would_not_read_are_refused(tmp_path, capsys, argv, fragment):
    code, err = run_main(capsys, [*DIGITS_BASE, "--max-steps", "2", *argv, "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- devices

def _device_cases():
    cuda, count = torch.cuda.is_available(), torch.cuda.device_count()
    no_cuda = "but this torch cannot use CUDA here"
    cases = [("tpu", "unknown device 'tpu'; use auto, cpu, cuda or cuda:N")]
    if not cuda:
        cases += [("cuda", no_cuda), ("cuda:0", no_cuda)]
    cases.append(("cuda:7", no_cuda if not cuda else f"this machine has {count} CUDA GPU(s)") if count < 8 else None)
    if not torch.backends.mps.is_available():
        cases.append(("mps", "device 'mps' asked for, but this torch cannot use Apple's MPS here"))
    return [c for c in cases if c is not None]


@pytest.mark.parametrize("device, fragment", _device_cases())
def test_a_device_this_torch_cannot_use_is_refused_at_validation(tmp_path, capsys, device, fragment):
    with pytest.raises(UserError, match="device"):
        parse_args([*DIGITS, "--device", device])  # before any output folder or data exists
    code, err = run_main(capsys, [*DIGITS, "--max-steps", "2", "--device", device, "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "out").exists()
