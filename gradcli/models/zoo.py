"""The torchvision family: classification architectures by name, built without downloading.

Weights are a local checkpoint or a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``,
``ResNet18_Weights.IMAGENET1K_V1``) whose file must already sit in the torch hub cache; the
weights entry also gives the preprocessing recipe and the constructor arguments torchvision's
own builders would set. Separate because it is the only family that depends on torchvision's
registry and its quirks (auxiliary heads, legacy DenseNet keys).
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlparse

import torch
from torch import nn

from gradcli.config import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from gradcli.errors import BadInputError
from gradcli.models.checkpoints import (
    _existing_weights_file,
    _load_state_dict_checked,
    _looks_like_path,
    _num_classes_from_state_dict,
    load_checkpoint,
    sha256_file,
)
from gradcli.models.loaded import _Built

IMAGENET_PREPROCESS = Preprocess((224, 224), 3, IMAGENET_MEAN, IMAGENET_STD, resize=256)


def _torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _build_torchvision(
    name: str, weights: str | None, num_classes: int | None, trust: bool
) -> _Built:
    import torchvision.models as tvm

    weights_enum = None
    state_dict, weights_given, sha = None, None, None
    if weights is not None:
        if _looks_like_path(weights):
            weights_given = _existing_weights_file(weights, name)
            checkpoint_path = weights_given
        else:
            weights_enum = _resolve_torchvision_weights(name, weights)
            weights_given = weights
            checkpoint_path = _hub_checkpoint_path(weights_enum)
            if not os.path.isfile(checkpoint_path):
                raise BadInputError(
                    f"weights {weights} for {name} are not in the local torch hub cache: "
                    f"download {weights_enum.url} to {checkpoint_path} or pass a local weights "
                    "file with --weights"
                )
        state_dict = load_checkpoint(checkpoint_path, trust)
        sha = sha256_file(checkpoint_path)
        if name.startswith("densenet"):
            state_dict = _rename_legacy_densenet_keys(state_dict)

    kwargs = _torchvision_build_kwargs(name, weights_enum, state_dict)
    if weights_enum is not None:
        categories = len(weights_enum.meta["categories"])
        if num_classes is not None and num_classes != categories:
            raise BadInputError(
                f"weights {weights} have {categories} classes but --num-classes is "
                f"{num_classes}; drop --num-classes or pass a fine-tuned weights file"
            )
        kwargs["num_classes"] = categories
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    if state_dict is not None and weights_enum is None and num_classes is None:
        inferred = _num_classes_from_state_dict(_shapes_only(name, kwargs), state_dict)
        if inferred is not None:
            kwargs["num_classes"] = inferred
    model = tvm.get_model(name, weights=None, **kwargs)
    if state_dict is not None:
        _load_state_dict_checked(model, state_dict, name, weights_given)
    _drop_auxiliary_heads(model)

    preprocess = IMAGENET_PREPROCESS
    if weights_enum is not None:
        preprocess = _preprocess_from_weights(weights_enum)
    return _Built(model, name, weights_given, sha, preprocess)


def _shapes_only(name: str, kwargs: dict) -> nn.Module:
    """The architecture with parameters on the meta device (shapes, no memory, no random
    initialisation), for reading its layer shapes; built normally where meta fails."""
    import torchvision.models as tvm

    try:
        with torch.device("meta"):
            return tvm.get_model(name, weights=None, **kwargs)
    except Exception:  # an architecture whose constructor reads tensor values
        return tvm.get_model(name, weights=None, **kwargs)


def _resolve_torchvision_weights(arch: str, weights: str):
    """``IMAGENET1K_V1``, ``DEFAULT`` or ``ResNet18_Weights.IMAGENET1K_V1`` → the enum member."""
    import torchvision.models as tvm

    try:
        enum_cls = tvm.get_model_weights(arch)
    except Exception as err:
        raise BadInputError(
            f"torchvision has no weights names for {arch}; pass a local weights file"
        ) from err
    member = weights
    if "." in weights:
        class_name, member = weights.split(".", 1)
        if class_name != enum_cls.__name__:
            raise BadInputError(
                f"weights {weights} are not for {arch}; use {enum_cls.__name__}.NAME "
                f"with NAME one of {', '.join(enum_cls.__members__)}"
            )
    try:
        return enum_cls[member]
    except KeyError:
        raise BadInputError(
            f"unknown weights {weights!r} for {arch}: use one of "
            f"{', '.join(enum_cls.__members__)} or a local weights file"
        ) from None


def _hub_checkpoint_path(weights_enum) -> str:
    """Where ``torch.hub`` caches the file of a torchvision weights entry."""
    filename = os.path.basename(urlparse(weights_enum.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _preprocess_from_weights(weights_enum) -> Preprocess:
    transforms = weights_enum.transforms()
    crop = getattr(transforms, "crop_size", [224])
    resize = getattr(transforms, "resize_size", None)
    return Preprocess(
        input_size=(int(crop[0]), int(crop[-1])),
        channels=3,
        mean=tuple(float(m) for m in getattr(transforms, "mean", IMAGENET_MEAN)),
        std=tuple(float(s) for s in getattr(transforms, "std", IMAGENET_STD)),
        resize=int(resize[0]) if resize else None,
    )


def _torchvision_build_kwargs(name: str, weights_enum, state_dict: dict | None) -> dict:
    """The constructor arguments torchvision's own builders set when they load weights."""
    kwargs: dict = {}
    if name in ("googlenet", "inception_v3"):
        has_aux = state_dict is not None and any(
            k.startswith(("aux1.", "aux2.", "AuxLogits.")) for k in state_dict
        )
        kwargs["aux_logits"] = has_aux
        kwargs["init_weights"] = state_dict is None
        if weights_enum is not None:
            kwargs["transform_input"] = True
    if weights_enum is not None and name.startswith("vit_"):
        kwargs["image_size"] = weights_enum.meta["min_size"][0]
    if weights_enum is not None and name.startswith("maxvit"):
        kwargs["input_size"] = weights_enum.meta["min_size"]
    return kwargs


def _drop_auxiliary_heads(model: nn.Module) -> None:
    """Remove training-only auxiliary classifiers: they never run in eval mode, so their
    parameters would only add zero gradients."""
    import torchvision.models as tvm

    if isinstance(model, tvm.GoogLeNet):
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None
    elif isinstance(model, tvm.Inception3):
        model.aux_logits = False
        model.AuxLogits = None


_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_legacy_densenet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old DenseNet checkpoints (including torchvision's own) name layers ``norm.1``."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed
