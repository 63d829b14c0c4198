"""Every entry point once as a real process: a mistake is exit code 2 and one `error:` line on
stderr, no traceback, nothing on stdout, nothing written. Everywhere else bad input runs these
same entry points in-process (tests/helpers.run_in_process), which proves the line but not what
the process itself returns."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import ROOT, assert_error, assert_one_error_line, fingerprint, run_in_process, run_script

NNI_MLP4 = os.path.join(ROOT, "configs", "nni", "mlp4.yml")

CASES = {  # entry point -> (arguments, run in a scratch folder, fragments of the error line)
    "fdnn_vanilla.py": (["--config", "bad.yaml"], ["is not valid YAML at line 2"]),
    "fdnn_nsr.py": (["--dataset", "digits", "--lamda", "3"], ["unknown option --lamda; did you mean --lambda?"]),
    "cnn_nsr.py": (["--lambda", "nan"], ["lambda for NSR layer 'fc' must be a finite number >= 0, got nan"]),
    "-m nsr search": ([NNI_MLP4, "--max-trials", "0", "--out", "out"], ["--max-trials must be at least 1, got 0"]),
    "-m nsr reproduce": (["--out", "out", "--models", "mlp4", "--seeds", "0"], ["--seeds must be between 1"]),
    "-m nsr compare": (["--out", "out", "--jobs", "0"], ["--jobs must be at least 1, got 0"]),
    "-m nsr report": ([], ["the following arguments are required: OUT"]),
    "-m nsr analyze": (["--batch-size", "x"], ["argument --batch-size: invalid int value: 'x'"]),
    "-m nsr demo": (["--seeds", "0"], ["--seeds must be between 1 and 100, got 0"]),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_mistake_exits_2_with_one_line_in_a_real_process(tmp_path):
    """The nine processes start three at a time: their start (torch's import) is what they cost."""
    def one(entry):
        args, fragments = CASES[entry]
        cwd = tmp_path / entry.replace(" ", "_")
        cwd.mkdir()
        (cwd / "bad.yaml").write_text("epochs: [1, 2\n")
        before = fingerprint(cwd)
        proc = run_script(entry, *args, check=False, cwd=str(cwd), env={"HOME": str(cwd)})
        assert proc.returncode == 2, (entry, proc.returncode, proc.stdout, proc.stderr)
        assert_one_error_line(proc.stderr, *fragments)
        assert proc.stdout == "", entry
        assert fingerprint(cwd) == before and os.listdir(cwd) == ["bad.yaml"], entry

    with ThreadPoolExecutor(max_workers=3) as pool:
        for done in [pool.submit(one, entry) for entry in CASES]:
            done.result()  # re-raises a case's failure, which names its entry point


def test_the_same_mistakes_in_process_give_the_same_line(tmp_path, monkeypatch):
    """What the slow test above proves of a process, in-process: the line comes from the entry
    points themselves, not from how a process starts."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\n")
    for entry, (args, fragments) in CASES.items():
        assert_error(run_in_process(entry, *args), *fragments)
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]


def test_the_dispatcher_names_its_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    usage = "usage: python -m nsr {search,reproduce,compare,report,analyze,demo} [options]"
    line = assert_error(run_in_process("-m nsr bogus"), "unknown command 'bogus'", usage)
    assert line.startswith("error: unknown command 'bogus'; ")
    for asked in ("-h", "--help"):
        result = run_in_process(f"-m nsr {asked}")
        assert result.code == 0 and result.err == "" and result.out.startswith(usage)
    assert os.listdir(tmp_path) == []
