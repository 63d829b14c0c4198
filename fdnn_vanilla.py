"""Vanilla MLP, the baseline of fdnn_nsr.py: same configs, no regularizer (its flags are refused).

    python fdnn_vanilla.py                               # configs/mlp4.yaml without NSR
"""

import os

from nsr.search.trial import nni_hooks
from nsr.train.engine import main

if __name__ == "__main__":
    # fixed, not a default: --regularizer nsr (or an NSR flag) here is refused, not obeyed or ignored
    main(default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mlp4.yaml"),
         fixed={"regularizer": "none"}, description=__doc__.splitlines()[0], hooks=nni_hooks())
