"""NNI search: nsr.search.trial outside/inside a trial, configs/nni/*.yml, python -m nsr search's
checks before NNI starts (in-process, through the dispatcher), and real NNI experiments.

The experiments (marked slow) are real: NNI's manager (Node.js), its TPE tuner and fdnn_nsr.py
trials on the bundled `digits` set. Each runs with HOME and NNI's experiment directory inside
tmp_path, on a free loopback port, so nothing lands in ~/nni-experiments. Each proves what the
others do not: a search end to end (on a port a previous search left in TIME_WAIT), a failed
trial, Ctrl-C, a tuner that dies (two ways), kill -9 of the launcher.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import yaml
from nni.experiment.config import ExperimentConfig

from nsr.search import launcher, nni_config
from nsr.search import trial as nni_trial
from nsr.search.workarounds import no_trial_note, visible_gpu_count
from nsr.train.config import SETTINGS, parse_args
from nsr.train.errors import UserError
from tests.helpers import ROOT, assert_error, free_port, read_scalars, run_in_process

REPO = Path(ROOT)
PY = sys.executable
NNI_CONFIGS = ["mlp3", "mlp4", "mlp6", "mlp8", "mlp10", "resnet18_cifar10", "vgg19_cifar10"]
QUICK = "--dataset digits --epochs 1"


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NNI_") and k not in ("NSR_TRIAL_ARGS", "NODE_OPTIONS")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)  # NNI's experiment registry (~/nni-experiments/.experiment) goes here
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _leftovers(marker: str) -> list[str]:
    """Live processes whose command line mentions marker (experiment id or its folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if marker in cmd and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
                found.append(f"{p.pid}: {cmd[:200]}")
        except psutil.Error:
            continue
    return found


def _search_cmd(tmp_path: Path, *extra: str, config: str = "configs/nni/mlp4.yml") -> list[str]:
    return [PY, "-m", "nsr", "search", config, "--port", str(free_port()),
            "--out", str(tmp_path / "out"), "--experiment-dir", str(tmp_path / "nni"), *extra]


def _config_with(tmp_path: Path, **changes) -> Path:
    """configs/nni/mlp4.yml with top-level fields replaced, written to tmp_path (trials still run
    in the repository)."""
    data = yaml.safe_load((REPO / "configs" / "nni" / "mlp4.yml").read_text())
    data.update(changes, trialCodeDirectory=str(REPO))
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _group_alive(pgid: int) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}")
        except (OSError, psutil.Error):
            continue
    return found


def _assert_no_leftovers(tmp_path: Path, exp_id: str | None) -> None:
    deadline = time.monotonic() + 30  # a condition with a generous bound: gone in seconds
    while True:
        left = _leftovers(str(tmp_path / "nni")) + (_leftovers(exp_id) if exp_id else [])
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, "processes left behind:\n" + "\n".join(left)


# ------------------------------------------------------------------------------ nni_trial

class _ImportsOfNNI(importlib.abc.MetaPathFinder):
    """Records every attempt to import nni (or a submodule) that sys.modules cannot answer."""

    def __init__(self):
        self.asked: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "nni":
            self.asked.append(name)
        return None  # the real finders go on


def test_nni_trial_outside_nni_is_silent_and_does_not_import_nni(monkeypatch, capsys):
    for name in [m for m in sys.modules if m.split(".")[0] == "nni"]:
        monkeypatch.delitem(sys.modules, name)  # as in a fresh process: nni not loaded yet
    imports = _ImportsOfNNI()
    monkeypatch.setattr(sys, "meta_path", [imports, *sys.meta_path])
    monkeypatch.setenv("NNI_PLATFORM", "unittest")  # NNI's own marker for "no runtime"
    monkeypatch.setenv("NNI_TRIAL_JOB_ID", "abc")
    assert nni_trial.in_trial() is False
    assert nni_trial.get_trial_parameters() is None
    assert nni_trial.nni_hooks() is None
    nni_trial.report_intermediate(50.0)
    nni_trial.report_intermediate(float("nan"))
    nni_trial.report_final(97.5, 97.1)
    assert imports.asked == []
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"NNI_PLATFORM": "local"}, False),                        # no trial id: not a trial
    ({"NNI_TRIAL_JOB_ID": "abc"}, False),
    ({"NNI_PLATFORM": "unittest", "NNI_TRIAL_JOB_ID": "abc"}, False),
    ({"NNI_PLATFORM": "local", "NNI_TRIAL_JOB_ID": "abc"}, True),
    ({"NNI_PLATFORM": "remote", "NNI_TRIAL_JOB_ID": "abc"}, True),
])
def test_in_trial_reads_nni_environment(monkeypatch, env, expected):
    for key in ("NNI_PLATFORM", "NNI_TRIAL_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert nni_trial.in_trial() is expected


@pytest.fixture
def fake_nni(monkeypatch):
    """An in-trial environment with a recording stand-in for the `nni` module."""
    calls: list[tuple[str, object]] = []
    mod = types.ModuleType("nni")
    mod.get_next_parameter = lambda: calls.append(("get", None)) or {"lambda": 0.25, "queue_batches": 5}
    mod.report_intermediate_result = lambda v: calls.append(("intermediate", v))
    mod.report_final_result = lambda v: calls.append(("final", v))
    monkeypatch.setitem(sys.modules, "nni", mod)
    monkeypatch.setenv("NNI_PLATFORM", "local")
    monkeypatch.setenv("NNI_TRIAL_JOB_ID", "abc")
    return calls


def test_nni_trial_inside_trial_uses_nni(fake_nni):
    assert nni_trial.in_trial()
    assert nni_trial.get_trial_parameters() == {"lambda": 0.25, "queue_batches": 5}
    nni_trial.report_intermediate(91.5)
    nni_trial.report_final(97.25, 96.5)
    assert fake_nni == [("get", None), ("intermediate", 91.5),
                        ("final", {"default": 97.25, "test_acc": 96.5})]


def test_nni_trial_never_reports_nan(fake_nni):
    with pytest.raises(UserError, match="validation accuracy"):
        nni_trial.report_intermediate(float("nan"))
    with pytest.raises(UserError, match="best validation accuracy"):
        nni_trial.report_final(float("inf"), 90.0)
    nni_trial.report_final(90.0, float("nan"))  # the test accuracy only rides along: null
    assert fake_nni == [("final", {"default": 90.0, "test_acc": None})]


# ------------------------------------------------------------------------------ configs/nni

@pytest.mark.parametrize("name", NNI_CONFIGS)
def test_nni_config_is_valid_and_points_at_the_right_script(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against the YAML's folder, not cwd
    config = ExperimentConfig.load(str(REPO / "configs" / "nni" / f"{name}.yml"))
    canon = config.canonical_copy()  # NNI's own validation
    assert Path(canon.trial_code_directory) == REPO
    assert canon.trial_concurrency == 1
    assert canon.max_trial_number and canon.max_experiment_duration
    assert canon.tuner.name == "TPE" and canon.tuner.class_args["optimize_mode"] == "maximize"
    assert canon.training_service.platform == "local"
    space = canon.search_space
    assert space["lambda"] == {"_type": "loguniform", "_value": [0.001, 10]}
    accepted = {"regularized_layer"} | set(SETTINGS)  # the one name the trial maps (config_overrides)
    assert set(space) <= accepted, f"keys the engine would reject: {set(space) - accepted}"

    argv = shlex.split(canon.trial_command.replace("$NSR_TRIAL_ARGS", ""))
    assert argv[0] == "python3"
    script = "fdnn_nsr.py" if name.startswith("mlp") else "cnn_nsr.py"
    assert argv[1] == script and (REPO / script).is_file()
    cfg_path = argv[argv.index("--config") + 1]
    assert cfg_path == f"configs/{name}.yaml" and (REPO / cfg_path).is_file()
    assert "$NNI_OUTPUT_DIR" in argv[argv.index("--out") + 1]  # each trial writes its own folder
    # no GPU pinning by default (NNI's GPU scheduling started no trial on an H200): cuda:0 or CPU
    assert canon.training_service.trial_gpu_number is None

    # the trial command parses with the engine's own parser, from the repository root
    monkeypatch.chdir(REPO)
    cfg = parse_args([a.replace("$NNI_OUTPUT_DIR", str(tmp_path)) for a in argv[2:]])
    assert cfg.model == name.split("_")[0]
    assert (cfg.regularizer != "none") and cfg.regularized_layers


def test_remote_pool_example_is_accepted_by_nni_and_runs_the_local_trial_command(tmp_path, monkeypatch):
    """configs/nni/remote/mlp4_remote.yml through NNI's own config classes (no connection is made;
    the only thing NNI checks on this machine, the SSH key file, is pointed at a stand-in)."""
    monkeypatch.chdir(tmp_path)
    path = REPO / "configs" / "nni" / "remote" / "mlp4_remote.yml"
    config = ExperimentConfig.load(str(path))
    key = tmp_path / "id_ed25519"
    key.write_text("stand-in")
    for machine in config.training_service.machine_list:
        machine.ssh_key_file = str(key)
    canon = config.canonical_copy()  # NNI's own validation
    assert canon.training_service.platform == "remote" and len(canon.training_service.machine_list) == 2
    assert Path(canon.trial_code_directory) == REPO
    assert canon.search_space["lambda"] == {"_type": "loguniform", "_value": [0.001, 10]}
    assert all(m.python_path for m in canon.training_service.machine_list)
    # the same trial as configs/nni/mlp4.yml's, with the data at a fixed path on every machine
    argv = shlex.split(canon.trial_command)
    assert argv[:4] == ["python3", "fdnn_nsr.py", "--config", "configs/mlp4.yaml"]
    monkeypatch.chdir(REPO)
    cfg = parse_args([a.replace("$NNI_OUTPUT_DIR", str(tmp_path)) for a in argv[2:]])
    assert cfg.data_dir == "/srv/datasets/mnist" and cfg.out == f"{tmp_path}/run"
    # python -m nsr search runs the local service only, and says so in one line
    line = search(tmp_path, str(path))
    assert "local training service only" in line


def test_nniignore_keeps_the_remote_upload_within_nni_limits():
    """NNI packs trialCodeDirectory for remote machines and refuses more than 2000 files or
    300 MB: .nniignore leaves out everything git ignores (the environment, data, runs) and .git."""
    ignored = {line.strip() for line in (REPO / ".nniignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    git_ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
    assert git_ignored <= ignored and ".git/" in ignored
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert len(tracked) < 1000, "the repository alone approaches NNI's limit of 2000 files"


# ------------------------------------------------------------------------------ python -m nsr search errors
# In-process through the dispatcher, from the repository (configs/nni/... resolve there);
# test_entry_points.py runs the command once as a process.

def search(tmp_path, *args) -> str:
    """`python -m nsr search ARGS --out ... --experiment-dir ...`, expected to fail before NNI
    starts: its one error line."""
    result = run_in_process("-m nsr search", *args, "--out", str(tmp_path / "out"),
                            "--experiment-dir", str(tmp_path / "nni"))
    line = assert_error(result)
    assert result.out == ""
    assert not (tmp_path / "nni").exists()  # nothing was started
    return line


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("setup, args, message", [
    (None, ["missing.yml"], "not found"),
    ("a: [1,\n", ["{cfg}"], "not valid YAML at line 2"),
    ("trialConcurrency: 1\nbogusField: 2\n", ["{cfg}"], "bogus"),
    (None, ["configs/nni/mlp4.yml", "--trial-args", '--lr "0.1'], "No closing quotation"),
    (None, ["configs/nni/mlp4.yml", "--gpu-indices", "a"], "--gpu-indices"),
    (None, ["configs/nni/mlp4.yml", "--max-trials", "0"], "--max-trials"),
    (None, ["configs/nni/mlp4.yml", "--concurrency", "0"], "--concurrency must be at least 1"),
])
def test_search_bad_input_is_one_line(tmp_path, in_repo, setup, args, message):
    cfg = tmp_path / "bad.yml"
    if setup is not None:
        cfg.write_text(setup)
    assert message in search(tmp_path, *[a.format(cfg=cfg) for a in args], "--port", "0")


@pytest.mark.parametrize("spec, message", [
    ({"_type": "loguniform", "_value": [0, 10]}, "must have low > 0"),
    ({"_type": "uniform", "_value": [5, 1]}, "must have high > low"),
    ({"_type": "logunifrom", "_value": [0.001, 10]}, 'unsupported type "logunifrom"'),
    ({"_type": "choice", "_value": []}, "a choice with no values"),
    ({"_type": "uniform", "_value": ["a", 1]}, "must have float values"),
    ({"_type": "quniform", "_value": [0, 1]}, "must have 3 values"),
])
def test_search_space_the_tuner_cannot_use_is_refused_before_nni_starts(tmp_path, in_repo, spec, message):
    # NNI 3.0 would start, its tuner would die on the first of these, and the search would wait
    # for maxExperimentDuration (48 h)
    cfg = _config_with(tmp_path, searchSpace={"lambda": spec})
    line = search(tmp_path, str(cfg), "--port", "0")
    assert line.startswith(f"error: NNI config {str(cfg)!r}: ") and message in line and "lambda" in line
    assert not (tmp_path / "out").exists()


def test_command_line_overrides_reach_the_experiment_config(in_repo):
    args = launcher.build_parser().parse_args(["configs/nni/mlp10.yml", "--concurrency", "2", "--max-trials", "7"])
    config = nni_config.load_config(args.config, args)
    assert (config.trial_concurrency, config.max_trial_number) == (2, 7)  # the file says 1 and 30


def test_a_config_nni_cannot_load_leaves_the_next_load_working(tmp_path, in_repo):
    """NNI 3.0 keeps a global set after a failed ExperimentConfig.load; the next load in the same
    process (a notebook, this test session) then failed with a bare AssertionError."""
    (tmp_path / "bad.yml").write_text("trialConcurrency: 1\nbogusField: 2\n")
    assert "bogusfield" in search(tmp_path, str(tmp_path / "bad.yml"), "--port", "0")
    assert "--max-trials must be at least 1" in search(tmp_path, "configs/nni/mlp4.yml", "--max-trials", "0")
    line = search(tmp_path, "configs/nni/mlp4.yml", "--port", "0", "--trial-args", '--lr "0.1')
    assert line == "error: --trial-args '--lr \"0.1': No closing quotation"


def test_search_port_in_use_is_one_line(tmp_path, in_repo):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = search(tmp_path, "configs/nni/mlp4.yml", "--port", str(port))
    assert line == (f"error: port {port} is in use (another NNI experiment?); pick another "
                    "with --port, or --port 0 for any free one")


def test_a_port_left_in_time_wait_is_free_for_the_next_search():
    """A stopped NNI manager leaves its clients' connections in TIME_WAIT; the next search on that
    port must not find it busy (the real experiment below starts on such a port)."""
    port = free_port()
    _time_wait_on(port)
    assert _in_time_wait(port), "no TIME_WAIT on the port: the test would not test anything"
    with socket.socket() as s:  # what the port check did before: the port looked busy
        with pytest.raises(OSError):
            s.bind(("127.0.0.1", port))
    assert launcher.pick_port(port, "127.0.0.1") == port


def test_search_without_gpu_refuses_gpu_config(tmp_path, in_repo):
    if visible_gpu_count() not in (0,):
        pytest.skip("a GPU is visible (or NVML is missing): nothing to refuse")
    line = search(tmp_path, "configs/nni/resnet18_cifar10.yml", "--port", "0", "--gpu-indices", "0")
    assert "no NVIDIA GPU is visible; add --cpu" in line


def test_search_refuses_filelock_that_hangs_nni(tmp_path, in_repo, monkeypatch):
    # NNI 3.0's registry lock never acquires with filelock >= 3.12: nnictl just hangs.
    fake = tmp_path / "site" / "filelock-3.12.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: filelock\nVersion: 3.12.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    line = search(tmp_path, "configs/nni/mlp4.yml", "--port", "0")
    assert line.startswith("error: filelock 3.12.0 is installed, but NNI 3.0 needs filelock<3.12")


def test_no_trial_note_names_the_gpu_wait(tmp_path):
    log = tmp_path / "log" / "nnimanager.log"
    log.parent.mkdir()
    log.write_text("[x] INFO (TrialKeeper) Scheduling failed because the GPU constraint cannot be satisfied\n")
    note = no_trial_note(tmp_path, "trialGpuNumber 1, gpuIndices [0], useActiveGpu True")
    assert "waiting for a GPU" in note and "gpuIndices [0]" in note and "--cpu" in note
    log.write_text("")
    assert str(log) in no_trial_note(tmp_path, "")


# ------------------------------------------------------------------------------ real experiments

def _time_wait_on(port: int) -> None:
    """Leave a connection in TIME_WAIT on the listening side of `port`, as a stopped NNI manager
    does (it closes its clients' connections first)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the side that closes first keeps the TIME_WAIT
        client.close()


def _in_time_wait(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT
               for c in psutil.net_connections("tcp"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_real_experiment_two_trials(tmp_path):
    """2 TPE trials of fdnn_nsr.py (1 epoch on digits) through NNI, on a port the previous search
    left in TIME_WAIT: both succeed, best.json is written, the web UI listened on loopback only."""
    port = free_port()
    _time_wait_on(port)
    assert _in_time_wait(port), "no TIME_WAIT on the port: the test would not test it"
    cmd = [PY, "-m", "nsr", "search", "configs/nni/mlp4.yml", "--port", str(port), "--out", str(tmp_path / "out"),
           "--experiment-dir", str(tmp_path / "nni"), "--max-trials", "2", "--trial-args", QUICK]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    listen_ips = set()
    try:
        while proc.poll() is None:  # until the search ends; the test's timeout bounds it
            try:
                listen_ips |= {c.laddr.ip for c in psutil.net_connections("tcp")
                               if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
            except psutil.Error:
                pass
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert listen_ips == {"127.0.0.1"}, f"web UI listened on {listen_ips}"
    assert f"web UI: http://127.0.0.1:{port}" in out

    trials = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert trials["status"] == "DONE"
    assert [t["status"] for t in trials["trials"]] == ["SUCCEEDED", "SUCCEEDED"]
    for t in trials["trials"]:
        assert 0.001 <= t["parameters"]["lambda"] <= 10
        assert 0 <= t["best_val_acc"] <= 100 and 0 <= t["test_acc"] <= 100

    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert set(best) >= {"parameters", "best_val_acc", "test_acc", "experiment_id", "trial_id"}
    assert best["best_val_acc"] == max(t["best_val_acc"] for t in trials["trials"])
    assert best["complete"] is True
    # what NNI recorded is what the trial measured, with the tuner's lambda applied
    run = Path(best["trial_dir"]) / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_val_acc"] == pytest.approx(best["best_val_acc"])
    assert metrics["test_acc"] == pytest.approx(best["test_acc"])
    assert metrics["dataset"] == "digits" and metrics["epochs"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["lambda"] == [best["parameters"]["lambda"]]
    # the trial's TensorBoard events: in $NNI_OUTPUT_DIR/tensorboard, and where NNI 3.0's web UI looks
    scalars = read_scalars(Path(best["trial_dir"]) / "tensorboard")
    assert len(scalars["accuracy/val"]) == 1 and scalars["accuracy/val"][0][1] == pytest.approx(metrics["best_val_acc"])
    web_ui = Path(best["experiment_dir"]) / "trials" / best["trial_id"] / "output" / "tensorboard"
    assert web_ui.resolve() == (Path(best["trial_dir"]) / "tensorboard").resolve()
    assert f"best lambda = {best['parameters']['lambda']:.6g}" in out
    assert "[2 done]" in out and "best so far" in out

    assert Path(best["experiment_dir"]).parent == tmp_path / "nni"
    _assert_no_leftovers(tmp_path, best["experiment_id"])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the NNI manager still listens"
    real_home = Path(os.path.expanduser("~")) / "nni-experiments" / best["experiment_id"]
    assert not real_home.exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_reports_failed_trial(tmp_path):
    cmd = _search_cmd(tmp_path, "--max-trials", "1", "--trial-args", QUICK + " --regularized-layers nosuchlayer")
    r = subprocess.run(cmd, cwd=REPO, env=_clean_env(tmp_path), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: no trial succeeded")
    trials = json.loads((tmp_path / "out" / "trials.json").read_text())
    (t,) = trials["trials"]
    assert t["status"] == "FAILED" and t["best_val_acc"] is None
    assert t["error"].startswith("error: NSR layer 'nosuchlayer' is not a module")  # the trial's own line
    assert "FAILED" in r.stdout and "nosuchlayer" in r.stdout
    assert not (tmp_path / "out" / "best.json").exists()
    _assert_no_leftovers(tmp_path, trials["experiment_id"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_ctrl_c_stops_manager_and_trial(tmp_path):
    cmd = _search_cmd(tmp_path, "--max-trials", "3", "--trial-args", "--dataset digits --epochs 100000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        trial_running = False
        while time.monotonic() < deadline and proc.poll() is None and not trial_running:
            trial_running = any("fdnn_nsr.py" in " ".join(p.info["cmdline"] or [])
                                and str(tmp_path / "nni") in " ".join(p.info["cmdline"] or [])
                                for p in psutil.process_iter(["cmdline"]))
            time.sleep(0.5)
        assert trial_running, "no trial started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    trials = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert trials["status"] == "INTERRUPTED"
    _assert_no_leftovers(tmp_path, trials["experiment_id"])


_BROKEN_TUNER = """
from nni.tuner import Tuner


class BrokenSpace(Tuner):  # passes every check, then dies when NNI hands it the search space
    def update_search_space(self, search_space):
        raise RuntimeError("this tuner cannot use " + ",".join(search_space))

    def generate_parameters(self, parameter_id, **kwargs):
        return {"lambda": 0.1}

    def receive_trial_result(self, parameter_id, parameters, value, **kwargs):
        pass


class BrokenInit(BrokenSpace):  # dies while the dispatcher starts
    def __init__(self):
        raise RuntimeError("tuner constructor failed")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)  # instead of maxExperimentDuration (48 h)
@pytest.mark.parametrize("tuner, message", [
    ("BrokenSpace", "RuntimeError: this tuner cannot use lambda"),
    ("BrokenInit", "RuntimeError: tuner constructor failed"),
])
def test_search_dead_tuner_ends_the_search_in_one_line(tmp_path, tuner, message):
    code = tmp_path / "tuner"
    code.mkdir()
    (code / "broken_tuner.py").write_text(_BROKEN_TUNER)
    cfg = _config_with(tmp_path, tuner={"codeDirectory": str(code), "className": f"broken_tuner.{tuner}"})
    r = subprocess.run([PY, "-m", "nsr", "search", str(cfg), "--port", str(free_port()), "--poll", "1",
                        "--out", str(tmp_path / "out"), "--experiment-dir", str(tmp_path / "nni"),
                        "--trial-args", QUICK],
                       cwd=REPO, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: NNI's tuner stopped: " + message), r.stderr
    assert lines[0].endswith("dispatcher.log)")
    trials = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert trials["status"] == "ERROR" and trials["trials"] == []
    assert not (tmp_path / "out" / "best.json").exists()
    _assert_no_leftovers(tmp_path, trials["experiment_id"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_killed_with_sigkill_takes_manager_and_trial_along(tmp_path):
    cmd = _search_cmd(tmp_path, "--max-trials", "3", "--trial-args", "--dataset digits --epochs 100000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    manager_group = None
    try:
        exp_id = proc.stdout.readline().split()[1].rstrip(":")  # "experiment ID: ..."
        deadline = time.monotonic() + 120
        trial = None
        while time.monotonic() < deadline and proc.poll() is None and trial is None:
            for p in psutil.process_iter(["cmdline"]):
                cmd_line = " ".join(p.info["cmdline"] or [])
                if "fdnn_nsr.py" in cmd_line and str(tmp_path / "nni") in cmd_line:
                    trial = p
            time.sleep(0.5)
        assert trial is not None, "no trial started"
        manager_group = os.getpgid(trial.pid)  # NNI's manager, tuner and trials share one group
        assert len(_group_alive(manager_group)) >= 3  # manager, tuner (sh + python), trial
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()  # the watchdog notices within a second, then SIGTERM, SIGKILL after 10 s
        while time.monotonic() - killed < 60 and (_group_alive(manager_group) or _leftovers(exp_id)):
            time.sleep(0.5)
        left = _group_alive(manager_group) + _leftovers(exp_id) + _leftovers(str(tmp_path / "nni"))
        assert not left, "still running 60 s after kill -9:\n" + "\n".join(left)
    finally:
        if proc.poll() is None:
            proc.kill()
        if manager_group is not None and _group_alive(manager_group):
            os.killpg(manager_group, signal.SIGKILL)
        proc.communicate(timeout=30)
