"""CNN + Neuron Steadiness Regularization (ResNet-18 on CIFAR-10 by default; --regularizer none for vanilla).

    python cnn_nsr.py --config configs/vgg19_cifar10.yaml --data-dir DIR
    torchrun --nproc_per_node=4 cnn_nsr.py --config configs/resnet50_imagenet.yaml --data-dir DIR
"""

import os

from nsr.search.trial import nni_hooks
from nsr.train.engine import main

if __name__ == "__main__":
    main(default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                     "resnet18_cifar10.yaml"),
         description=__doc__.splitlines()[0], hooks=nni_hooks())
