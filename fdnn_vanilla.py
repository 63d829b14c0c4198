"""Vanilla MLP, the baseline of fdnn_nsr.py: same configs and flags, NSR off.

    python fdnn_vanilla.py                               # configs/mlp4.yaml without NSR
"""

import os

from nsr.search.trial import nni_hooks
from nsr.train.engine import main

if __name__ == "__main__":
    main(default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mlp4.yaml"),
         defaults={"regularizer": "none"}, description=__doc__.splitlines()[0], hooks=nni_hooks())
