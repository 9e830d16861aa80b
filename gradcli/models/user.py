"""The user's own models: factory specs (``file.py:fn``, ``module:fn``) and TorchScript files.

A factory is imported (a file with its own folder on ``sys.path`` while it runs) and called,
with ``num_classes`` when given; a TorchScript file is loaded as is. Neither comes with a
preprocessing recipe, so ``load_model`` derives one from the module. Separate because this is
the only place that imports and runs code named on the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gradcli.errors import BadInputError
from gradcli.models.checkpoints import (
    _load_state_dict_checked,
    _one_line,
    _read_weights,
    sha256_file,
)
from gradcli.models.loaded import _Built

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


def _is_factory_spec(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target) and re.fullmatch(r"[A-Za-z_][\w.]*", attr) is not None


def _build_factory(spec: str, weights: str | None, num_classes: int | None, trust: bool) -> _Built:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise BadInputError(f"model file {path} not found; check the path in --model")
        normalized = f"{path}:{attr}"
        search_dir = os.path.dirname(path)
        with _prepended_sys_path(search_dir):
            python_module = _import_file(path)
            model = _call_factory(python_module, attr, normalized, num_classes)
    else:
        normalized = spec
        python_module = _import_module(target)
        model = _call_factory(python_module, attr, normalized, num_classes)

    weights_path, sha = None, None
    if weights is not None:
        weights_path, state_dict, sha = _read_weights(weights, normalized, trust)
        _load_state_dict_checked(model, state_dict, normalized, weights_path)
    return _Built(model, normalized, weights_path, sha, None)


@contextlib.contextmanager
def _prepended_sys_path(directory: str) -> Iterator[None]:
    """Let a model file import the modules next to it while it is imported and called."""
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


def _import_file(path: str):
    module_name = "gradcli_user_model_" + hashlib.sha1(path.encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise BadInputError(f"cannot import {path} as Python; give a .py file in --model")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so that classes defined there can be pickled
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise BadInputError(f"importing {path} failed: {_one_line(err)}") from err
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise BadInputError(
            f"cannot import module {name!r} ({_one_line(err)}); check the name and that its "
            "package is installed or on PYTHONPATH"
        ) from err
    except Exception as err:
        raise BadInputError(f"importing module {name!r} failed: {_one_line(err)}") from err


def _call_factory(python_module, attr: str, spec: str, num_classes: int | None) -> nn.Module:
    factory = python_module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise BadInputError(
                f"{spec.rpartition(':')[0]} has no {attr!r}; check the factory name after ':' "
                "in --model"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise BadInputError(
            f"{attr} in --model {spec} is a {type(factory).__name__}, not a callable that "
            "returns an nn.Module"
        )
    kwargs = {}
    if num_classes is not None:
        if not _accepts_keyword(factory, "num_classes"):
            raise BadInputError(
                f"factory {attr} takes no num_classes argument; drop --num-classes or add it"
            )
        kwargs["num_classes"] = int(num_classes)
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise BadInputError(f"calling {attr}() from {spec} failed: {_one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise BadInputError(
            f"{attr}() from {spec} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _accepts_keyword(func: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell; let the call decide
    return any(
        p.name == name
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        or p.kind == p.VAR_KEYWORD
        for p in parameters
    )


def _build_torchscript(spec: str, weights: str | None, trust: bool) -> _Built:
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        raise BadInputError(f"model file {path} not found; check the path in --model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu")
    except Exception as err:
        raise BadInputError(
            f"{path} is not a TorchScript file; give an architecture name or file.py:factory "
            "with --weights"
        ) from err
    weights_path, sha = None, sha256_file(path)
    if weights is not None:
        weights_path, state_dict, sha = _read_weights(weights, path, trust)
        _load_state_dict_checked(module, state_dict, path, weights_path)
    return _Built(module, path, weights_path, sha, None)
