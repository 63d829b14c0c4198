"""MLP + Neuron Steadiness Regularization (MLP-4 on MNIST by default).

    python fdnn_nsr.py                                   # configs/mlp4.yaml
    python fdnn_nsr.py --config configs/mlp10.yaml --dataset fashion-mnist --data-dir DIR
"""

import os

from nsr.search.trial import nni_hooks
from nsr.train.engine import main

if __name__ == "__main__":
    main(default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mlp4.yaml"),
         description=__doc__.splitlines()[0], hooks=nni_hooks())
