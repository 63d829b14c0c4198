"""Vanilla MLP, the baseline of fdnn_nsr.py: same configs and flags, NSR off.

    python fdnn_vanilla.py                               # configs/mlp4.yaml without NSR
"""

import os

from nsr.engine import main

if __name__ == "__main__":
    main(default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mlp4.yaml"),
         defaults={"nsr": False}, description=__doc__.splitlines()[0])
