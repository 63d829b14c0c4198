"""The lab's commands, from a checkout of the repository:

    python -m nsr search configs/nni/mlp4.yml     # λ search with NNI
    python -m nsr reproduce --models mlp4 ...     # the paper's results table
    python -m nsr compare | report | analyze | demo

The library (NeuronSteadiness, CenterLoss) needs none of this: it is torch only.
"""

import runpy
import sys

COMMANDS = {"search": "nsr.search.launcher", "reproduce": "nsr.experiments.reproduce",
            "compare": "nsr.experiments.compare", "report": "nsr.experiments.report",
            "analyze": "nsr.experiments.analyze", "demo": "nsr.experiments.demo"}
# What the lab needs beyond the library's torch (pyproject.toml's extras), and the lab itself.
LAB_NEEDS = {"nsr", "models", "torchvision", "numpy", "yaml", "tqdm", "sklearn", "nni", "matplotlib", "scipy"}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        asked_help = argv[:1] in (["-h"], ["--help"])
        unknown = f"error: unknown command {argv[0]!r}; " if argv and not asked_help else ""
        print(f"{unknown}usage: python -m nsr {{{','.join(COMMANDS)}}} [options]  (a command's --help "
              "lists its options)", file=sys.stdout if asked_help else sys.stderr)
        sys.exit(0 if asked_help else 2)
    # Run on demand, as `python -m <module>` would: a command loads only what it uses, and an
    # install of the library alone (torch only) says what is missing instead of a traceback.
    sys.argv = [f"python -m nsr {argv[0]}", *argv[1:]]
    try:
        runpy.run_module(COMMANDS[argv[0]], run_name="__main__", alter_sys=True)
    except ImportError as e:  # runpy wraps a missing package of the command's own in an ImportError
        missing = e if isinstance(e, ModuleNotFoundError) else e.__cause__
        if not isinstance(missing, ModuleNotFoundError) or missing.name.split(".")[0] not in LAB_NEEDS:
            raise
        print(f"error: `python -m nsr {argv[0]}` needs {missing.name!r}, which is not installed: the lab runs "
              "from a checkout of the repository, after `pip install -e '.[all]'` there", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main(sys.argv[1:])
