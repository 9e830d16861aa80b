"""The BN→FC classification head trained on reduced gradients (Wu et al., TPAMI 2024).

Reduced gradients carry no classifier of their own, so output-based scores (MSP, Energy,
ReAct, BATS) need one: ``BatchNorm1d(K) → Linear(K, C)`` trained with SGD and cross-entropy on
the ID training set. The BatchNorm takes care of the scale of the K coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gradcli.errors import BadInputError

HEAD_ARRAY_NAMES: tuple[str, ...] = (
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "fc.weight",
    "fc.bias",
)

_EVAL_BATCH = 8192


class GradientHead(torch.nn.Module):
    """``BatchNorm1d(num_features) → Linear(num_features, num_classes)``."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(num_features)
        self.fc = torch.nn.Linear(num_features, num_classes)

    @property
    def num_features(self) -> int:
        return self.fc.in_features

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from reduced gradients ``z`` (B, K); BN follows the module's mode."""
        return self.fc(self.bn(z))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Eval-mode BN output (B, K): running statistics whatever the module's mode."""
        return F.batch_norm(
            z,
            self.bn.running_mean,
            self.bn.running_var,
            self.bn.weight,
            self.bn.bias,
            training=False,
            eps=self.bn.eps,
        )

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from BN outputs ``h`` (B, K)."""
        return self.fc(h)


def _check_training_set(z: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    fix = "fit-head needs a labelled ID training set (embed the training split with its labels)"
    if z.ndim != 2:
        raise BadInputError(f"reduced gradients must have shape (N, K), got {z.shape}")
    if z.shape[0] == 0:
        raise BadInputError(f"the training embedding is empty: {fix}")
    if labels.shape != (z.shape[0],):
        raise BadInputError(
            f"{labels.shape} labels do not match {z.shape[0]} training samples: {fix}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadInputError(f"labels must be integers, got {labels.dtype}: {fix}")
    if num_classes < 2:
        raise BadInputError(f"the head needs at least 2 classes, got {num_classes}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise BadInputError(
            f"labels must lie in [0, {num_classes}) but range over "
            f"[{labels.min()}, {labels.max()}] (-1 means unlabelled): {fix}"
        )
    if not np.isfinite(z).all():
        raise BadInputError("the training embedding contains NaN/Inf: recompute it")


# The default recipe: batches of 128, at least MIN_STEPS optimiser steps and at least
# MIN_EPOCHS epochs, SGD at HEAD_LR with weight decay HEAD_WEIGHT_DECAY (which makes the
# loss strongly convex in the head's effective linear map, so seeds meet at one head), the
# learning rate decayed to 0 on a cosine over the planned steps.
HEAD_BATCH_SIZE = 128
HEAD_LR = 0.1
HEAD_WEIGHT_DECAY = 1e-2
MIN_STEPS = 2000
MIN_EPOCHS = 10
# Heads up to this many weights train on one CPU thread: their steps are too small to share.
_ONE_THREAD_WEIGHTS = 1 << 16
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimiser steps in one epoch over ``num_samples``: one per minibatch, a final minibatch
    of one sample dropped (BatchNorm cannot train on it)."""
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest >= 2 else 0)


def plan_epochs(
    num_samples: int, batch_size: int, epochs: int | None = None, min_steps: int = MIN_STEPS
) -> int:
    """Epochs to run: ``epochs`` when given, else enough for ``min_steps`` optimiser steps and
    at least ``MIN_EPOCHS`` (the paper's 10), so a small ID set gets as many updates as the
    head needs to settle and a large one still sees every sample 10 times."""
    if epochs is not None:
        return int(epochs)
    per_epoch = max(1, steps_per_epoch(num_samples, batch_size))
    return max(MIN_EPOCHS, -(-int(min_steps) // per_epoch))


def train_head(
    z: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int | None = None,
    lr: float = HEAD_LR,
    batch_size: int = HEAD_BATCH_SIZE,
    momentum: float = 0.9,
    weight_decay: float = HEAD_WEIGHT_DECAY,
    min_steps: int = MIN_STEPS,
    schedule: str = "cosine",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> GradientHead:
    """Train a ``GradientHead`` on ``z`` (N, K) float32 with ``labels`` (N,) int64 in [0, C).

    SGD with momentum, weight decay and cross-entropy over shuffled minibatches for ``plan_epochs(N,
    batch_size, epochs, min_steps)`` epochs; with ``schedule="cosine"`` the learning rate
    falls from ``lr`` to 0 over the planned steps, so the head settles whatever N is
    (``"constant"`` keeps it at ``lr``). The BN's running statistics are then set to the
    mean and (unbiased) variance of the whole training set, not the last batches' moving
    average. Initialisation and shuffling come from a generator seeded with ``seed``, so equal
    inputs give an identical head. A final minibatch of one sample is dropped (BatchNorm cannot
    train on it). ``progress(done, total)`` is called after each epoch. Returns the head in
    ``eval()`` mode, on the CPU.
    """
    z = np.asarray(z)
    labels = np.asarray(labels)
    _check_training_set(z, labels, num_classes)
    if epochs is not None and epochs < 1:
        raise BadInputError(f"--epochs must be at least 1, got {epochs}")
    if min_steps < 1:
        raise BadInputError(f"--min-steps must be at least 1, got {min_steps}")
    if batch_size < 2:
        raise BadInputError(f"--head-batch-size must be at least 2 (BatchNorm), got {batch_size}")
    if not lr > 0:
        raise BadInputError(f"--lr must be positive, got {lr}")
    if schedule not in SCHEDULES:
        raise BadInputError(f"the head's schedule must be one of {', '.join(SCHEDULES)}")
    if z.shape[0] < 2:
        raise BadInputError("fit-head needs at least 2 labelled training samples")
    epochs = plan_epochs(z.shape[0], batch_size, epochs, min_steps)

    generator = torch.Generator().manual_seed(seed)
    head = GradientHead(z.shape[1], num_classes)
    torch.nn.init.kaiming_uniform_(head.fc.weight, a=5**0.5, generator=generator)
    bound = 1.0 / z.shape[1] ** 0.5
    torch.nn.init.uniform_(head.fc.bias, -bound, bound, generator=generator)

    inputs = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    targets = torch.from_numpy(labels.astype(np.int64, copy=False))
    optimiser = torch.optim.SGD(
        head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    threads = torch.get_num_threads()
    if head.fc.weight.numel() <= _ONE_THREAD_WEIGHTS:
        torch.set_num_threads(1)
    try:
        _sgd(
            head, inputs, targets, optimiser, epochs, batch_size, lr, schedule, generator, progress
        )
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # population statistics of the training set
        wide = inputs.double()
        head.bn.running_mean.copy_(wide.mean(dim=0))
        head.bn.running_var.copy_(wide.var(dim=0, unbiased=True))
    return head.eval()


def _sgd(
    head: GradientHead,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    lr: float,
    schedule: str,
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None,
) -> None:
    """The training loop of :func:`train_head`: ``epochs`` shuffled passes over inputs (N, K)."""
    total_steps = epochs * steps_per_epoch(inputs.shape[0], batch_size)
    step = 0
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, order.numel(), batch_size):
            batch = order[start : start + batch_size]
            if batch.numel() < 2:
                continue
            if schedule == "cosine":
                for group in optimiser.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total_steps))
            optimiser.zero_grad(set_to_none=True)
            loss = F.cross_entropy(head(inputs[batch]), targets[batch])
            loss.backward()
            optimiser.step()
            step += 1
        if progress is not None:
            progress(epoch + 1, epochs)


def head_to_arrays(head: GradientHead) -> dict[str, np.ndarray]:
    """The head's parameters and BN statistics as float32 arrays, keyed by ``HEAD_ARRAY_NAMES``."""
    state = head.state_dict()
    return {
        name: state[name].detach().cpu().numpy().astype(np.float32) for name in HEAD_ARRAY_NAMES
    }


def head_from_arrays(arrays: dict[str, np.ndarray]) -> GradientHead:
    """Rebuild an ``eval()`` head from ``head_to_arrays`` output; sizes come from ``fc.weight``."""
    missing = [name for name in HEAD_ARRAY_NAMES if name not in arrays]
    if missing:
        raise BadInputError(
            f"the stored head lacks {', '.join(missing)}: rerun fit-head with --overwrite"
        )
    num_classes, num_features = np.shape(arrays["fc.weight"])
    head = GradientHead(int(num_features), int(num_classes))
    try:
        head.load_state_dict(
            {name: torch.as_tensor(np.asarray(arrays[name])) for name in HEAD_ARRAY_NAMES},
            strict=False,
        )
    except RuntimeError as err:
        raise BadInputError(
            "the stored head has inconsistent array shapes: rerun fit-head with --overwrite"
        ) from err
    return head.eval()


def predict_logits(head: GradientHead, z: np.ndarray) -> np.ndarray:
    """Eval-mode logits (N, C) float32 for ``z`` (N, K), computed in batches."""
    inputs = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    with torch.no_grad():
        chunks = [
            head.classify(head.normalise(inputs[start : start + _EVAL_BATCH]))
            for start in range(0, inputs.shape[0], _EVAL_BATCH)
        ]
    if not chunks:
        return np.zeros((0, head.num_classes), np.float32)
    return torch.cat(chunks).numpy()


def accuracy(head: GradientHead, z: np.ndarray, labels: np.ndarray) -> float:
    """Share of labelled samples (label >= 0) whose eval-mode argmax logit equals the label.

    ``z`` (N, K), ``labels`` (N,) int with -1 for unlabelled samples, which are left out.
    """
    labels = np.asarray(labels)
    if labels.shape != (np.shape(z)[0],):
        raise BadInputError(
            f"accuracy needs one label per sample: {labels.shape} labels for {np.shape(z)[0]}"
        )
    labelled = labels >= 0
    if not labelled.any():
        raise BadInputError("accuracy needs labelled samples: embed a split that has labels")
    predictions = predict_logits(head, np.asarray(z)[labelled]).argmax(axis=1)
    return float(np.mean(predictions == labels[labelled]))


@dataclass
class HeadOptions:
    """Training options of the BN→FC head.

    ``epochs=None`` (default) runs enough epochs for ``min_steps`` optimiser steps, and at least
    the paper's 10, with weight decay and the learning rate decayed to 0 on a cosine
    (``schedule``): one settled head on small and large ID sets alike, whatever the seed (see
    :func:`gradcli.head.train_head`)."""

    epochs: int | None = None
    lr: float = HEAD_LR
    batch_size: int = HEAD_BATCH_SIZE
    momentum: float = 0.9
    weight_decay: float = HEAD_WEIGHT_DECAY
    seed: int = 0
    min_steps: int = MIN_STEPS
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        # Checked before any embedding is computed; named as fit-head's options.
        if self.epochs is not None and self.epochs < 1:
            raise BadInputError(f"--epochs must be at least 1, not {self.epochs}")
        if self.min_steps < 1:
            raise BadInputError(f"--min-steps must be at least 1, not {self.min_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise BadInputError(
                f"the head's schedule must be cosine or constant, not {self.schedule!r}"
            )
        if self.batch_size < 2:
            raise BadInputError(
                f"--head-batch-size must be at least 2 (BatchNorm), not {self.batch_size}"
            )
        if not self.lr > 0:
            raise BadInputError(f"--lr must be positive, not {self.lr}")
