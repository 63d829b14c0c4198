"""What an install holds: the library needs torch only; the lab's extras match environment.yml."""

import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_PACKAGES = ("nni", "matplotlib", "scipy", "sklearn", "yaml", "torchvision", "models")


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_environment_yml_installs_the_library_with_every_extra():
    project = _pyproject()
    with open(os.path.join(ROOT, "environment.yml")) as f:
        env = yaml.safe_load(f)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert conda_python == ["python=3.11"]
    extras = project["optional-dependencies"]
    wanted = {r.replace(" ", "") for r in project["dependencies"]}
    for extra in ("train", "search", "experiments", "test"):
        wanted |= {r.replace(" ", "") for r in extras[extra]}
    listed = {r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    assert [_name(r) for r in project["dependencies"]] == ["torch"]
    assert extras["all"] == ["nsr[train,search,experiments]"]
    assert {"torchvision", "numpy", "nni", "pyyaml", "tqdm"} <= {_name(r) for r in wanted}
    assert "setuptools>=77,<81" in {r.replace(" ", "") for r in extras["search"]}


# This test environment also holds the checkout's editable install, whose import hook would find
# nsr.train & co. in the checkout: a probe of a plain install drops that hook first.
WITHOUT_THE_CHECKOUT = ("import sys\n"
                        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n")


def _imports_after(code: str, cwd: str, env: dict | None = None) -> set[str]:
    probe = WITHOUT_THE_CHECKOUT + code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return {name.split(".")[0] for name in r.stdout.split()} | {n for n in r.stdout.split() if n.startswith("nsr.")}


@pytest.mark.slow  # a fresh interpreter: this one has loaded the lab already
@pytest.mark.timeout(300)
def test_the_library_imports_torch_only():
    loaded = _imports_after("import nsr; from nsr import NeuronSteadiness, CenterLoss, steadiness_loss", ROOT)
    assert "torch" in loaded
    assert not loaded & set(LAB_PACKAGES), loaded & set(LAB_PACKAGES)
    assert {n for n in loaded if n.startswith("nsr.")} == {"nsr.regularizer", "nsr.center_loss", "nsr.layer_outputs"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_plain_install_holds_the_library_alone_and_works_from_anywhere(tmp_path):
    """`pip install .` (not editable) into a folder: no top-level `models`, no lab; NSR trains."""
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                        "--target", str(target), ROOT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    installed = {p.name for p in target.iterdir()}
    assert "nsr" in installed and "models" not in installed and "configs" not in installed
    assert {p.name for p in (target / "nsr").glob("*.py")} == {
        "__init__.py", "__main__.py", "regularizer.py", "center_loss.py", "layer_outputs.py"}
    code = ("import torch, nsr\n"
            "assert nsr.__file__.startswith(%r), nsr.__file__\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
            "reg = nsr.NeuronSteadiness(model, {'2': 0.5}, num_classes=3)\n"
            "x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])\n"
            "loss = torch.nn.functional.cross_entropy(model(x), y) + reg(y)\n"
            "loss.backward()\n" % str(target))
    loaded = _imports_after(code, str(elsewhere), env={"PYTHONPATH": str(target)})
    assert not loaded & set(LAB_PACKAGES), loaded & set(LAB_PACKAGES)
    demo = WITHOUT_THE_CHECKOUT + "import runpy; sys.argv = ['nsr', 'demo']; runpy.run_module('nsr', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", demo], cwd=elsewhere, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 2 and r.stderr.startswith("error: `python -m nsr demo` needs") \
        and "Traceback" not in r.stderr, r.stderr
