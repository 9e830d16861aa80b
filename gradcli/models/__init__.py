"""Model specs → an eval-mode ``nn.Module`` with a (features, logits) split and its preprocessing.

A model spec is one of:

1. a torchvision classification architecture name (``resnet18``, ``vit_b_16``, ...), built
   without weights; ``weights`` is a local checkpoint or a torchvision weights name such as
   ``IMAGENET1K_V1`` that must already sit in the torch hub cache (nothing is ever downloaded);
   without weights, ``random_weights=True`` must say that untrained weights are meant;
2. a built-in network: ``cifar_resnet18``, ``wrn28_10`` (CIFAR, 32×32) or ``mnist_cnn``
   (the small 28×28 demo model);
3. a user factory, ``path/to/file.py:factory`` or ``package.module:factory``: a callable that
   returns an ``nn.Module``;
4. a TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.torchscript``).

Built-in and torchvision models come with their preprocessing recipe (size, resize/crop,
mean/std); user factories and TorchScript files get images at their stored size unless an
input size is given.

The features are the input of one layer, by default the last ``nn.Linear`` in module order
(the classifier), so that the score functions can use both the penultimate features and the
model's own logits from a single forward pass.

Modules: ``loading`` (``load_model``, ``list_models``, preprocessing defaults and overrides),
``loaded`` (``LoadedModel``, feature-layer capture, the probe), ``checkpoints`` (reading and
checking weights), and one module per family: ``architectures`` (built-in networks), ``zoo``
(torchvision), ``user`` (factories and TorchScript).

To add a model family: write a module here with a ``_build_<family>(spec, weights, ...)`` that
returns a ``loaded._Built`` (module, spec, weights, sha256, preprocessing or ``None``), reading
``--weights`` through ``checkpoints``; then add its spec test and call as one branch of the
dispatch in ``loading.load_model`` (and its names to ``list_models`` if it has any). A new
built-in network needs only its class and an entry in ``architectures._BUILTINS``.
"""

from __future__ import annotations

from gradcli.models.architectures import (
    MNIST_MEAN,
    MNIST_STD,
    CifarBasicBlock,
    CifarResNet,
    MnistCNN,
    WideBasicBlock,
    WideNetworkBlock,
    WideResNet,
    cifar_resnet18,
    mnist_cnn,
    wrn28_10,
)
from gradcli.models.checkpoints import load_checkpoint, sha256_file
from gradcli.models.loaded import LoadedModel
from gradcli.models.loading import IMAGENET_ID_TRAIN, default_id_train, list_models, load_model
from gradcli.models.user import TORCHSCRIPT_SUFFIXES
from gradcli.models.zoo import IMAGENET_PREPROCESS

__all__ = [
    "IMAGENET_ID_TRAIN",
    "IMAGENET_PREPROCESS",
    "MNIST_MEAN",
    "MNIST_STD",
    "TORCHSCRIPT_SUFFIXES",
    "CifarBasicBlock",
    "CifarResNet",
    "LoadedModel",
    "MnistCNN",
    "WideBasicBlock",
    "WideNetworkBlock",
    "WideResNet",
    "cifar_resnet18",
    "default_id_train",
    "list_models",
    "load_checkpoint",
    "load_model",
    "mnist_cnn",
    "sha256_file",
    "wrn28_10",
]
