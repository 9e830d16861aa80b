"""Reading weights: checkpoint files → a state_dict, checked against the model it is meant for.

``load_checkpoint`` accepts the shapes training scripts save (a bare state_dict, one nested under
a common key, a whole pickled module, a TorchScript archive) and unpickles nothing but tensors
and plain containers unless the checkpoint is trusted. Kept apart from the model families
because every family (built-in, torchvision, factory, TorchScript) reads its ``--weights``
through these functions, and because it also holds the one-line error helpers they share.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gradcli.errors import BadInputError

# Keys under which training scripts commonly nest the state_dict in a checkpoint dict.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(weights: str) -> bool:
    return (
        os.path.exists(weights)
        or "/" in weights
        or os.sep in weights
        or bool(os.path.splitext(weights)[1].lower() in {".pt", ".pth", ".bin", ".ckpt", ".tar"})
    )


def _existing_weights_file(weights: str, model: str) -> str:
    path = os.path.abspath(os.path.expanduser(weights))
    if not os.path.isfile(path):
        hint = ""
        if not _looks_like_path(weights):
            hint = " (weights names such as IMAGENET1K_V1 apply to torchvision architectures only)"
        raise BadInputError(f"weights file {path} for {model} not found{hint}; check --weights")
    return path


def _read_weights(weights: str, model: str, trust: bool) -> tuple[str, dict, str]:
    """The file --weights names for ``model``: its absolute path, state dict and sha256."""
    path = _existing_weights_file(weights, model)
    return path, load_checkpoint(path, trust), sha256_file(path)


def load_checkpoint(path: str, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file → its state_dict (name → tensor), ``module.`` prefix removed.

    Accepts a bare state_dict, a dict holding one under ``state_dict``/``model``/``net``/
    ``model_state_dict``, a whole pickled ``nn.Module`` (only with ``trust_checkpoint``), or a
    TorchScript archive. Without ``trust_checkpoint`` only tensors and plain containers unpickle.
    """
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        unsafe = [] if trust_checkpoint else _unsafe_globals(path)
        if unsafe:
            raise BadInputError(
                f"checkpoint {path} needs full unpickling (of {_first_few(unsafe, 3)}), which "
                "can run arbitrary code; re-save it as a plain state_dict or pass "
                "--trust-checkpoint if you trust its source"
            ) from err
        raise BadInputError(
            f"cannot read checkpoint {path} ({_unpickling_reason(err)}); pass a file saved with "
            "torch.save"
        ) from err
    except Exception as err:
        obj = _try_torchscript_state_dict(path)
        if obj is None:
            raise BadInputError(
                f"cannot read checkpoint {path} ({_one_line(err)}); pass a file saved with "
                "torch.save"
            ) from err
    return _extract_state_dict(obj, path)


def _unsafe_globals(path: str) -> list[str]:
    """Names of the Python objects a checkpoint's pickle would import (empty if unreadable)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def _try_torchscript_state_dict(path: str) -> dict | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception:
        return None


def _extract_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, Mapping) and any(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise BadInputError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict; "
            "save model.state_dict() instead"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(str(k) for k in list(obj)[:5])
        raise BadInputError(
            f"checkpoint {path} holds no tensors (keys: {keys}); save model.state_dict() instead"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _num_classes_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> int | None:
    """Output width the checkpoint's last layer has when it differs from the model's.

    Classification networks register their classifier last, so the last parameter (the
    classifier's bias or weight) has one row per class.
    """
    names = [name for name, _ in model.named_parameters()]
    if not names:
        return None
    last = names[-1]
    expected = dict(model.named_parameters())[last]
    found = state_dict.get(last)
    if found is None or found.dim() == 0 or expected.dim() == 0:
        return None
    if found.shape[1:] != expected.shape[1:] or found.shape[0] == expected.shape[0]:
        return None
    return int(found.shape[0])


def _load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str, weights: str | None
) -> None:
    """Load strictly, with a message that lists what does not match."""
    expected = model.state_dict()
    # Checkpoints from before BatchNorm counted batches lack this buffer; eval mode ignores it.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_first_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_first_few(unexpected)}")
        if mismatched:
            parts.append(
                f"shape mismatches checkpoint vs model ({len(mismatched)}): "
                f"{_first_few(mismatched)}"
            )
        raise BadInputError(
            f"the weights {weights} do not match the architecture {model_name} "
            f"({'; '.join(parts)}); check --model and --weights"
        )
    model.load_state_dict(state_dict, strict=False)


def _first_few(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (", ..." if len(items) > n else "")


def _unpickling_reason(err: BaseException) -> str:
    """The specific reason in torch's weights-only error (e.g. 'Unsupported operand 149'),
    not its advice to turn the safety off."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        if detail and detail[0].strip():
            return f"not a plain checkpoint: {detail[0].strip()}"
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
