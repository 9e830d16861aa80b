"""A run: the whole gradcli pipeline over one run store, callable from Python.

``Run`` ties the modules together: it loads the model recorded in the store, extracts the
subspace, embeds datasets in resumable row chunks, fits the head and detectors, scores and
evaluates. Every stage checks the provenance of what is already in the store and is skipped
when the stored result is complete and still valid.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from gradcli import data as data_mod
from gradcli.budget import auto_batch_size, format_size, plan_row_blocks, resolve_budget
from gradcli.distributed import ProcessGroup, check_shard, parse_device, shard_range
from gradcli.errors import BadInputError, GradcliError, Interrupted, StaleStoreError
from gradcli.grads import (
    TILE_BYTES,
    GradientStatistics,
    LayerGradients,
    ParameterSelection,
    Projector,
    native_bfloat16,
    sanitise_variance,
    select_parameters,
)
from gradcli.head import (
    GradientHead,
    HeadOptions,
    accuracy,
    head_from_arrays,
    head_to_arrays,
    plan_epochs,
    steps_per_epoch,
    train_head,
)
from gradcli.metrics import check_tpr, evaluate_scores, threshold_at_tpr
from gradcli.models import LoadedModel, load_model, sha256_file
from gradcli.progress import NullProgress, Progress
from gradcli.results import Results
from gradcli.scores import (
    BASE_METHODS,
    DETECTORS,
    INPUT_DETECTORS,
    get_detector,
    method_class,
    resolve_methods,
)
from gradcli.scores.base import Detector, Embedding, Readout
from gradcli.scores.baselines import ODIN, ODIN_EPSILON, ODIN_TEMPERATURE
from gradcli.scores.ensemble import ensemble_scores
from gradcli.scores.options import DetectorOptions
from gradcli.store import RESERVED_KEYS, RunStore
from gradcli.subspace import (
    Subspace,
    average_gradient_basis,
    average_gradient_k_reason,
    check_method,
    gram_,
    inverse_factor,
    orthonormalise_,
    pca_width,
    random_start,
    rayleigh_ritz,
    ritz_rotation,
)

EMBEDDINGS = ("grad", "feat")
SCORE_EMBEDDINGS = ("grad", "feat", "ensemble")
DOWNSTREAM_OF_SUBSPACE = ("embed", "head", "detectors", "scores", "results")
BASIS_CHUNK_ROWS = 1 << 20
DEFAULT_CHUNK_ROWS = 512
BASIS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# PCA keeps a batch's normalised gradients (B×P float32) for its second product when the budget
# allows at least this many samples per batch (a smaller batch would cost more than it saves).
PCA_KEEP_MIN_BATCH = 32
PCA_KEEP_MAX_BATCH = 128
# The AG subspace's peak bytes per class and parameter: float64 class means, their normalised
# copy, QR's working copy and its Q (4 × 8), then the float32 basis and class means while Q is
# alive (2 × 4); see average_gradient_basis.
AG_BYTES_PER_ENTRY = 40
STATS_STATE = "stats/state"  # the statistics pass's checkpoint
PCA_SHARE = 0.9  # of the budget for PCA's block and accumulator; batches take what is left
BASIS_SHARE = 0.6  # of the memory budget for basis rows; the rest is for batches and the model
INPUT_BATCH = 128  # images per batch of a model pass that needs input gradients (ODIN)
# Held-out images expected below a calibrated λ under which it is noted as resting on too few.
CALIBRATION_MIN_TAIL = 10


class _Scratch:
    """A buffer reused across calls: fresh buffers of tens of MB page-fault on first touch."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def view(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        numel = int(np.prod(shape))
        buffer = self._buffer
        if (
            buffer is None
            or buffer.numel() < numel
            or (buffer.dtype, buffer.device)
            != (
                dtype,
                device,
            )
        ):
            buffer = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def _accumulate_transposed(
    total: torch.Tensor, g: torch.Tensor, u: torch.Tensor, scratch: _Scratch | None = None
) -> None:
    """``total += gᵀ u``: total (r, w) float32, g (B, r) and u (B, w) float32 or bfloat16
    (whose product is formed in bf16, in ``scratch`` when given, and added in float32)."""
    if g.dtype == torch.float32:
        total.addmm_(g.T, u)
    elif scratch is None:
        total += g.T @ u
    else:
        product = scratch.view(total.shape, g.dtype, g.device)
        torch.mm(g.T, u, out=product)
        total += product


@dataclass(frozen=True)
class _PcaJob:
    """What a PCA subspace extraction works on, shared by its in-memory and layer-block
    forms."""

    source: data_mod.ImageSource
    indices: np.ndarray
    selection: ParameterSelection
    mean: torch.Tensor
    scale: torch.Tensor
    k: int
    width: int
    iterations: int
    seed: int
    batch_size: int | None
    checkpoint_every: int
    iteration_dtype: str = "auto"


class Run:
    """One run store and the pipeline over it.

    >>> run = Run("artifacts/demo")                                    # doctest: +SKIP
    >>> run.set_model("mnist_cnn", "weights.pt")                       # doctest: +SKIP
    >>> run.extract_subspace("mnist5k:train")                          # doctest: +SKIP
    >>> results = run.evaluate(["fashion", "digits"])                  # doctest: +SKIP
    """

    def __init__(
        self,
        store: str | os.PathLike,
        *,
        device: str = "cpu",
        data_root: str | os.PathLike | None = None,
        progress: Progress | None = None,
        num_workers: int | None = None,
        create: bool = True,
        memory_budget: int | str | None = None,
        basis_dtype: str = "float32",
        on_bad_image: str = "fail",
        should_stop: Callable[[], bool] | None = None,
        group: ProcessGroup | None = None,
        storage_options: Mapping | None = None,
    ) -> None:
        if basis_dtype not in BASIS_DTYPES:
            raise BadInputError(
                f"--basis-dtype must be one of {', '.join(BASIS_DTYPES)}, not '{basis_dtype}'"
            )
        self.basis_dtype = basis_dtype
        if on_bad_image not in ("fail", "skip"):
            raise BadInputError(f"--on-bad-image must be fail or skip, not '{on_bad_image}'")
        self.on_bad_image = on_bad_image
        self.skipped: dict[str, list[str]] = {}
        # Polled at chunk and batch boundaries; the CLI sets it from SIGINT/SIGTERM.
        self.should_stop = should_stop or (lambda: False)
        self.memory_budget = resolve_budget(memory_budget)
        # Under torchrun (``group``), rank 0 alone writes to the store; it opens (creates) it
        # first and the others follow.
        self.group = group or ProcessGroup(device=parse_device(device))

        def open_store() -> RunStore:
            return RunStore(str(store), create=create, storage_options=storage_options)

        self.store = self._on_writer(open_store, value=False)
        if not self.group.is_writer:  # never writes; sees the store once rank 0 makes it
            self.store = RunStore(str(store), create=True, storage_options=storage_options)
        self.device = self.group.device if self.group.active else parse_device(device)
        root = (
            data_root or os.environ.get(data_mod.DATA_ROOT_ENV) or self.store.attrs.get("data_root")
        )
        self.data_root = str(data_root) if data_root else root
        self._given_data_root = os.path.abspath(str(data_root)) if data_root else None
        self.progress = progress or NullProgress()
        self.num_workers = num_workers
        self._model: LoadedModel | None = None

    def _on_writer(self, function, *args, value: bool = True):
        """``function(*args)`` on rank 0 alone; its result (with ``value``) or its one-line
        error reaches every rank, so no rank waits for one that failed. Also a barrier."""
        if not self.group.active:
            return function(*args)
        result = error = None
        if self.group.is_writer:
            try:
                result = function(*args)
            except GradcliError as problem:
                error = problem
        shared = self.group.broadcast_object((result if value else None, error))
        if shared[1] is not None:
            raise shared[1]
        return result if self.group.is_writer else shared[0]

    # -- model -------------------------------------------------------------------------
    def set_model(
        self,
        spec: str,
        weights: str | None = None,
        *,
        feature_layer: str | None = None,
        input_size: int | tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        num_classes: int | None = None,
        trust_checkpoint: bool = False,
        overwrite: bool = False,
        resize: int | None = None,
        resize_rounding: str = "uint8",
        random_weights: bool = False,
    ) -> LoadedModel:
        """Load a model and record it in the store; a different recorded model is an error.

        A torchvision architecture needs ``weights`` or ``random_weights=True``; user models
        get their images at the stored size unless ``input_size`` (and ``resize``) is given;
        ``resize_rounding`` ("uint8" as torchvision's PIL pipeline, or "float") applies when
        images are resized.
        """
        args = {
            "spec": spec,
            "weights": weights,
            "feature_layer": feature_layer,
            "input_size": list(input_size) if isinstance(input_size, tuple) else input_size,
            "mean": list(mean) if mean else None,
            "std": list(std) if std else None,
            "num_classes": num_classes,
            "trust_checkpoint": trust_checkpoint,
            "resize": resize,
            "resize_rounding": resize_rounding,
            "random_weights": bool(random_weights),
        }
        model = self._load(args)
        args.update(spec=model.spec, weights=model.weights)  # absolute paths: cwd may change
        folder = self.store.local_folder
        if model.weights and folder is not None:
            inside = os.path.relpath(os.path.realpath(model.weights), os.path.realpath(folder))
            if not inside.startswith(os.pardir):  # found again when the store is moved
                args["weights_in_store"] = inside
        record = model.describe()
        existing = self.store.attrs.get("model")
        same = existing is not None and _same_model(existing, record)
        if existing is not None and not same and not overwrite:
            what = _model_difference(existing, record)
            raise StaleStoreError(
                f"store {self.store.url} was made with another model ({what}); "
                "pass --overwrite to start the run over, or use a new --store"
            )

        def record_model() -> None:
            if existing is not None and not same:
                for path in ("stats", "subspace", *DOWNSTREAM_OF_SUBSPACE):
                    self.store.delete(path)
            self.store.update_root(model=record, model_args=args)

        self.group.barrier()  # every rank has read the root attrs before rank 0 writes them
        self._on_writer(record_model)
        self._model = model
        return model

    def _load(self, args: dict) -> LoadedModel:
        input_size = args.get("input_size")
        loaded = load_model(
            args["spec"],
            args.get("weights"),
            feature_layer=args.get("feature_layer"),
            input_size=tuple(input_size) if isinstance(input_size, list) else input_size,
            mean=args.get("mean"),
            std=args.get("std"),
            num_classes=args.get("num_classes"),
            trust_checkpoint=bool(args.get("trust_checkpoint")),
            device=self.device,
            resize=args.get("resize"),
            resize_rounding=args.get("resize_rounding", "float"),  # stores made before: float
            # stores made before the flag existed ran a weightless architecture untrained
            random_weights=bool(args.get("random_weights", not args.get("weights"))),
        )
        if self.group.active:  # without a weights file each rank would draw its own weights
            with torch.no_grad():
                for tensor in loaded.module.state_dict().values():
                    self.group.broadcast_(tensor)
        return loaded

    @property
    def model(self) -> LoadedModel:
        """The store's model, reloaded from its recorded spec; changed weights are an error."""
        if self._model is None:
            args = self.store.attrs.get("model_args")
            if args is None:
                raise BadInputError(
                    f"store {self.store.url} has no model yet; run 'gradcli extract-subspace "
                    "--model ...' first or pass the right --store"
                )
            recorded = self.store.attrs["model"]
            weights = args.get("weights")
            folder = self.store.local_folder
            if weights and not os.path.isfile(weights) and args.get("weights_in_store") and folder:
                moved = folder / args["weights_in_store"]  # the store was moved or copied
                if moved.is_file():
                    weights = str(moved)
                    args = {**args, "weights": weights}
            if weights and os.path.isabs(weights) and not os.path.isfile(weights):
                raise StaleStoreError(
                    f"the weights file {weights} that store {self.store.url} was made with is "
                    "gone; restore it, or start over with 'gradcli extract-subspace --weights "
                    "FILE --overwrite' or a new --store"
                )
            if weights and os.path.isfile(weights) and recorded.get("weights_sha256"):
                digest = sha256_file(weights)
                if digest != recorded["weights_sha256"]:
                    raise StaleStoreError(
                        f"weights file {weights} changed since store {self.store.url} was made "
                        f"(sha256 {recorded['weights_sha256'][:12]} -> {digest[:12]}); "
                        "restore the file, or start over with 'gradcli extract-subspace ... "
                        "--overwrite' or a new --store"
                    )
            if "resize_rounding" not in args and args.get("input_size") is None:
                # made before user models kept their images' size: keep the recorded size
                args = {**args, "input_size": (recorded.get("preprocess") or {}).get("input_size")}
            loaded = self._load(args)
            now = loaded.describe()
            shape = [  # what a changed model file shows (keys an older store lacks are skipped)
                key
                for key in ("architecture", "num_parameters", "num_classes", "feature_dim")
                if recorded.get(key) is not None
            ]
            if any(recorded[key] != now.get(key) for key in shape):
                what = _model_difference(
                    {k: recorded[k] for k in shape}, {k: now.get(k) for k in shape}
                )
                raise StaleStoreError(
                    f"model {args['spec']} is not the one store {self.store.url} was made with "
                    f"({what}); restore it, or start over with 'gradcli extract-subspace ... "
                    "--overwrite' or a new --store"
                )
            self._model = loaded
        return self._model

    @property
    def selection(self) -> ParameterSelection:
        """The parameters the store's gradients are taken over, as recorded at extraction."""
        record = self.store.attrs.get("params")
        if record is None:
            raise BadInputError(
                f"store {self.store.url} has no subspace yet; run 'gradcli extract-subspace' first"
            )
        return select_parameters(self.model.module, record["names"])

    # -- datasets ----------------------------------------------------------------------
    def resolve(self, spec: str, default_split: str = "test") -> data_mod.ImageSource:
        """The image source of a spec; with on_bad_image="skip", minus unreadable images."""
        source = data_mod.resolve_dataset(
            spec, data_root=self.data_root, default_split=default_split
        )
        if (
            self._given_data_root
            and self.group.is_writer
            and not self.store.read_only
            and self.store.attrs.get("data_root") != self._given_data_root
        ):
            self.store.update_root(data_root=self._given_data_root)  # it worked: remember it
        if self.on_bad_image == "skip":
            source, skipped = data_mod.without_unreadable(source)
            if skipped:
                self.skipped[source.spec] = skipped
                shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
                self.progress.note(f"skipped {len(skipped)} unreadable image(s) of {spec}: {shown}")
        return source

    def _subset(self, n: int, max_samples: int | None, seed: int) -> np.ndarray:
        """Seeded sorted random subset of range(n) when max_samples < n, else all rows."""
        if max_samples is None or max_samples >= n:
            return np.arange(n)
        if max_samples < 1:
            raise BadInputError("--max-samples must be at least 1")
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(n, size=max_samples, replace=False))

    def _loader(self, source, indices, batch_size):
        workers = self.num_workers
        if workers is None:  # decoding files in the background helps; arrays need no workers
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
            workers = 0 if isinstance(source, data_mod.ArraySource) else min(4, max(1, cores // 2))
        loader = data_mod.make_loader(
            source,
            self.model.preprocess,
            indices=[int(i) for i in indices],
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )
        return _unwrap_worker_errors(loader) if workers else loader

    # -- extract-subspace --------------------------------------------------------------
    def extract_subspace(
        self,
        dataset: str,
        *,
        method: str = "avg",
        k: int | None = None,
        params: Sequence[str] | None = None,
        max_samples: int | None = None,
        no_variance: bool = False,
        batch_size: int | None = None,
        seed: int = 0,
        oversample: int = 10,
        iterations: int = 4,
        checkpoint_every: int = 50,
        iteration_dtype: str = "auto",
        overwrite: bool = False,
    ) -> dict:
        """Compute the normalisation statistics and the subspace basis from ID training data.

        ``method="avg"``: class-average gradients. ``method="pca"``: top-``k`` eigenvectors of
        ``GᵀG`` by ``iterations`` passes of subspace iteration with ``k + oversample``
        columns from a ``seed``-ed start. The statistics pass and every PCA pass are
        checkpointed every ``checkpoint_every`` batches, so a rerun resumes them;
        ``iteration_dtype`` (auto, float32, bfloat16) is the precision of the iterations'
        products (auto: bfloat16 where the device multiplies it natively), the final
        Rayleigh–Ritz pass being float32 always.
        """
        check_extract_options(
            method=method,
            k=k,
            oversample=oversample,
            iterations=iterations,
            checkpoint_every=checkpoint_every,
            iteration_dtype=iteration_dtype,
            batch_size=batch_size,
            seed=seed,
            max_samples=max_samples,
        )
        batch_size, seed = _check_batch_size(batch_size), int(seed)
        model = self.model
        check_method(method, k, model.num_classes)
        source = self.resolve(dataset, default_split="train")
        if method == "avg" and not source.has_labels:
            raise BadInputError(
                f"{source.spec} has no labels; the average-gradient subspace needs a labelled "
                "ID training set"
            )
        selection = select_parameters(model.module, params)
        indices = self._subset(len(source), max_samples, seed)
        labels = source.labels()[indices]
        if method == "avg" and (labels.min() < 0 or labels.max() >= model.num_classes):
            raise BadInputError(
                f"{source.spec} has labels outside 0..{model.num_classes - 1}; the model has "
                f"{model.num_classes} classes"
            )
        if method == "avg":
            empty = np.flatnonzero(np.bincount(labels, minlength=model.num_classes) == 0)
            if empty.size:
                raise BadInputError(
                    f"classes {empty.tolist()[:5]} have no training samples in {source.spec}"
                    f"{'' if max_samples is None else f' (--max-samples {max_samples})'}; the "
                    "average-gradient subspace needs every class (raise --max-samples, check "
                    "the labels, or use --method pca --k N)"
                )
        class_sums = method == "avg"  # PCA needs the mean and variance only
        if class_sums:
            self._check_average_gradient_memory(selection, model.num_classes)
        if method == "pca":  # its width and memory plan, refused now rather than after a pass
            width = pca_width(k, oversample, selection.size, len(indices))
            self._pca_plan(selection, width, len(indices), iteration_dtype)
        stats_record = {
            "model_sha256": model.describe().get("weights_sha256"),
            "model": model.spec,
            "params": list(selection.names),
            "dataset": source.spec,
            "fingerprint": source.fingerprint(),
            "samples": int(len(indices)),
            "max_samples": max_samples,
            "seed": seed,
            "preprocess": model.preprocess.to_dict(),
            "class_sums": class_sums,
        }

        def open_stats() -> bool:
            if overwrite:
                for path in DOWNSTREAM_OF_SUBSPACE:
                    self.store.delete(path)
            record = self._usable_stats_record(stats_record)
            return self.store.open_stage(
                "stats", record, overwrite=overwrite, what="the gradient statistics"
            )

        stats_done = self._on_writer(open_stats)
        if not stats_done:
            class_sums = self.group.broadcast_object(
                bool(self.store.group_attrs("stats")["provenance"].get("class_sums", True))
                if self.group.is_writer
                else class_sums
            )
            self._compute_statistics(
                source, indices, selection, batch_size, no_variance, class_sums, checkpoint_every
            )
        subspace_record = {
            "stats": self.store.stage_digest("stats"),
            "method": method,
            "no_variance": no_variance,
        }
        if method == "pca":
            subspace_record.update(
                k=k, width=width, iterations=iterations, seed=seed, iteration_dtype=iteration_dtype
            )

        def open_subspace() -> bool:
            done = self.store.open_stage(
                "subspace", subspace_record, overwrite=overwrite, what="the subspace"
            )
            if not done:
                for path in DOWNSTREAM_OF_SUBSPACE:
                    self.store.delete(path)
            return done

        sub_done = self._on_writer(open_subspace)
        if not sub_done:
            mean, scale = self._normalisation(no_variance)
            if method == "pca":
                subspace = self._pca(
                    _PcaJob(
                        source,
                        indices,
                        selection,
                        mean,
                        scale,
                        k,
                        width,
                        iterations,
                        seed,
                        batch_size,
                        checkpoint_every,
                        iteration_dtype,
                    )
                )
            else:
                subspace = None  # from the stored class means, by rank 0 below

            def write_subspace() -> None:
                nonlocal subspace
                if subspace is None:
                    means = torch.from_numpy(self.store.read("stats/class_means")).double()
                    counts = np.asarray(self.store.group_attrs("stats")["class_counts"])
                    subspace = average_gradient_basis(means, mean, scale, counts)
                    self.store.write(
                        "subspace/class_means", subspace.class_means, chunk_rows=BASIS_CHUNK_ROWS
                    )
                if subspace.basis is not None:  # else written block by block already
                    self.store.write("subspace/basis", subspace.basis, chunk_rows=BASIS_CHUNK_ROWS)
                if subspace.eigenvalues is not None:
                    stats = self.store.group_attrs("stats")
                    total = (
                        stats["raw_variance_sum"]
                        if no_variance
                        else float(selection.size - stats["variance_replaced"])
                    )
                    self.store.write("subspace/eigenvalues", subspace.eigenvalues)
                    self.store.set_attrs("subspace", total_variance=total)
                self.store.delete("subspace/state")
                self.store.complete_stage("subspace", k=subspace.k, num_parameters=selection.size)

            self._on_writer(write_subspace, value=False)
        self._on_writer(
            lambda: self.store.update_root(
                params=selection.describe(),
                id_train=source.spec,
                id_test=_test_split_of(source.spec),
                id_max_samples=max_samples,
                id_seed=seed,
            )
        )
        sub_attrs = self.store.group_attrs("subspace")
        return {
            "num_parameters": selection.size,
            "k": int(sub_attrs["k"]),
            "k_reason": (
                average_gradient_k_reason(int(sub_attrs["k"]), model.num_classes)
                if method == "avg"
                else f"K = {k}, as asked (--k)"
            ),
            "explained_variance": (
                float(self.store.read("subspace/eigenvalues").sum() / sub_attrs["total_variance"])
                if method == "pca"
                else None
            ),
            "method": method,
            "samples": int(len(indices)),
            "variance_replaced": (  # --no-variance divides by none
                0
                if no_variance
                else int(self.store.group_attrs("stats").get("variance_replaced", 0))
            ),
            "reused": bool(stats_done and sub_done),
        }

    def _pca(self, job: _PcaJob) -> Subspace:
        """Randomised subspace iteration on GᵀG, one pass over the data per iteration.

        Per batch, the engine's tiles give ``U = G_b V`` (a first sweep) and then
        ``Y += G_bᵀ U`` (a second sweep over the same captured batch, no second backward).
        In bfloat16 iterations both products take bf16 operands (the tile centred and scaled
        in float32 first) and accumulate Y in float32: subspace iteration converges to the
        same subspace through that rounding, 2-3× faster on hardware with native bf16.
        After T iterations a last pass forms ``(G V)ᵀ(G V)`` for the Rayleigh–Ritz step.
        The block V, the iteration, and every ``checkpoint_every`` batches the partial Y and
        the batch cursor go to ``subspace/state`` so an interrupted run resumes there.
        """
        source, indices, selection = job.source, job.indices, job.selection
        mean, scale, k, width = job.mean, job.scale, job.k, job.width
        iterations, seed, batch_size = job.iterations, job.seed, job.batch_size
        checkpoint_every, iteration_dtype = job.checkpoint_every, job.iteration_dtype
        p = selection.size
        low, need, blocked = self._pca_plan(selection, width, len(indices), iteration_dtype)
        if blocked:
            return self._pca_blocked(job)
        state = "subspace/state"
        group = self.group
        attrs = self.store.group_attrs(state) if self.store.has(state) else {}
        model = self.model
        engine = LayerGradients(model.module, selection, tile_bytes=self._tile_bytes())
        # Arrays are written to alternating slots and only then named in the state's attrs, so
        # a kill while writing one leaves the previous checkpoint intact.
        if attrs.get("width") == width and "iteration" in attrs:
            iteration, cursor, batch = attrs["iteration"], attrs["cursor"], attrs["batch"]
            keep = bool(attrs.get("keep", False))
            low = BASIS_DTYPES[attrs.get("iteration_dtype", "float32")]  # as it began
            if attrs.get("world", 1) != group.world:
                cursor = 0  # partial sums of another number of ranks: redo this iteration
            block = torch.from_numpy(self.store.read(f"{state}/V{iteration % 2}"))
            if block.dtype == torch.int16:  # an intermediate block saved as its bf16 copy
                block = block.view(torch.bfloat16)
        else:
            block = random_start(p, width, seed)
            iteration, cursor = 0, 0
            batch, keep = group.broadcast_object(
                self._pca_batch(engine, source, indices, need, batch_size, low.itemsize)
            )

            def start_state() -> None:
                self.store.delete(state)
                self.store.write(
                    f"{state}/V0", block.numpy(), chunk_rows=BASIS_CHUNK_ROWS, compress=False
                )
                self.store.set_attrs(
                    state,
                    width=width,
                    iteration=0,
                    cursor=0,
                    batch=batch,
                    keep=keep,
                    slot=0,
                    world=group.world,
                    iteration_dtype=str(low).removeprefix("torch."),
                )

            self._on_writer(start_state, value=False)
        # A batch's normalised tiles, each kept contiguous (B, r) one after the other.
        kept = torch.empty(batch * p, dtype=low, device=self.device) if keep else None
        scratch = _Scratch()
        # The block's bf16 copy for the iterations' products: written by the
        # orthonormalisation while each chunk is in cache, reused across iterations.
        low_block = None
        if low != torch.float32 and self.device.type == "cpu":
            low_block = torch.empty(p, width, dtype=low)
            low_block.copy_(block)
        if block.dtype != torch.float32:
            if low_block is None:
                raise BadInputError(
                    "this PCA checkpoint was saved by bfloat16 iterations on a CPU; resume it "
                    "on a CPU (--device cpu) or start over with 'gradcli extract-subspace ... "
                    "--overwrite'"
                )
            block = None  # the next pass needs only the copy; its Y makes the next block
        normalisation = Projector(mean, scale, torch.empty(p, 0), device=self.device)
        writer = _BackgroundWriter()
        partial = None
        if cursor:
            # Each partial sum records the iteration and cursor it holds; one that does not
            # match the state's (a checkpoint overtaken by a kill) is never added to again:
            # the iteration starts over instead, which gives the same sums.
            if group.is_writer:
                partial = self._matching_partial(state, iteration, cursor)
            cursor = group.broadcast_object(cursor if partial or not group.is_writer else 0)
        # Each rank passes over its slice; all take the same number of steps (a rank whose
        # slice is shorter idles through the last one) so their collectives pair up.
        mine = group.split(indices)
        steps = group.steps(len(indices), batch)
        label = "PCA" if iteration < iterations else "PCA Rayleigh-Ritz"
        try:
            with self.progress.task(label, total=(iterations + 1) * steps) as advance:
                advance(iteration * steps + cursor)
                while iteration <= iterations:
                    ritz = iteration == iterations
                    if ritz:
                        projector = normalisation.rebased(block, torch.float32)
                    else:
                        projector = normalisation.rebased(
                            block if low_block is None else low_block, low
                        )
                    if cursor and group.is_writer:  # rank 0's checkpoint holds the sum so far
                        saved = torch.from_numpy(self.store.read(partial))
                        accumulator = saved if ritz else saved.to(self.device)
                    elif ritz:
                        accumulator = torch.zeros(width, width, dtype=torch.float64)
                    else:
                        accumulator = torch.zeros(p, width, device=self.device)
                    batches = iter(self._loader(source, mine[cursor * batch :], batch))
                    while cursor < steps:
                        item = next(batches, None)
                        if item is not None:
                            self._pca_batch_step(
                                engine,
                                projector,
                                item[0],
                                accumulator,
                                ritz,
                                kept,
                                source.spec,
                                scratch,
                            )
                        cursor += 1
                        advance(1)
                        stop = group.any(self.should_stop())
                        if (cursor % checkpoint_every == 0 or stop) and cursor < steps:
                            # Checkpoints hold sums over all ranks: rank 0 keeps the sum so
                            # far, the others start again from zero.
                            group.all_reduce_(accumulator)
                            if not group.is_writer:
                                accumulator.zero_()
                            writer.wait()  # this iteration's block must be named first
                            self._on_writer(
                                self._save_partial,
                                state,
                                accumulator,
                                iteration,
                                cursor,
                                value=False,
                            )
                        if stop:
                            writer.wait()
                            raise Interrupted(
                                "stopped after saving PCA progress; rerun the same command to "
                                "resume"
                            )
                    group.all_reduce_(accumulator)
                    if ritz:
                        writer.wait()
                        if not group.is_writer:
                            return None
                        basis, values = rayleigh_ritz(block, accumulator, k, len(indices))
                        return Subspace(
                            basis=basis.numpy(), method="pca", eigenvalues=values.numpy()
                        )
                    writer.wait()
                    block = accumulator.cpu()
                    del accumulator, projector
                    # The block that feeds Rayleigh–Ritz is orthonormal to rounding (two
                    # rounds); an intermediate one only needs to span the right subspace.
                    orthonormalise_(
                        block,
                        rounds=2 if iteration + 1 == iterations else 1,
                        low_copy=low_block,
                    )
                    group.broadcast_(block)  # every rank goes on with rank 0's block
                    if low_block is not None and group.world > 1:
                        low_block.copy_(block)
                    iteration, cursor = iteration + 1, 0
                    # The next pass starts at once; the block is named in the state only
                    # after its write has finished (a kill before that resumes one iteration
                    # earlier, from the intact previous slot).
                    if group.is_writer:
                        # In bf16 iterations an intermediate block is used only through its
                        # bf16 copy, so that copy is all a resume needs: half the bytes.
                        intermediate = low_block is not None and iteration < iterations
                        saved = low_block if intermediate else block
                        writer.start(self._save_block, state, iteration, saved)
        finally:
            writer.wait(raise_errors=False)
        raise AssertionError("unreachable")

    def _pca_plan(
        self, selection: ParameterSelection, width: int, n: int, iteration_dtype: str
    ) -> tuple[torch.dtype, int, bool]:
        """PCA's memory plan, checked before any pass over the data: the iterations' dtype,
        the bytes of the P×(K+p) block and accumulator, and whether they exceed the budget
        (the layer-block form, whose blocks are planned here so a budget too small even for
        them is refused now)."""
        p = selection.size
        need = p * width * 8 + p * 8
        low = self._iteration_dtype(iteration_dtype)
        if low != torch.float32 and need + p * width * 2 > int(self.memory_budget * PCA_SHARE):
            low = torch.float32  # no room for the block's bf16 copy: float32 iterations
        if low != torch.float32:
            need += p * width * 2
        blocked = need > int(self.memory_budget * PCA_SHARE)
        if blocked:
            if self.group.world > 1:
                raise BadInputError(
                    f"PCA with K + p = {width} over {p:,} parameters needs "
                    f"{need / 2**30:.1f} GiB, over {PCA_SHARE:.0%} of the memory budget, and "
                    "the layer-block form runs in one process only; raise --memory-budget or "
                    "run without torchrun"
                )
            self._pca_blocks(selection, width, n)
        return low, need, blocked

    def _pca_blocks(self, selection: ParameterSelection, width: int, n: int) -> list:
        """Layer blocks for PCA whose V or Y rows (float32) fit the budget beside U (n, w)."""
        u_bytes = n * width * 8  # U (n, w) float64, saved chunk by chunk
        budget = int(self.memory_budget * BASIS_SHARE) - u_bytes
        if budget < self.memory_budget // 8:
            raise BadInputError(
                f"PCA over {n:,} samples keeps U = G V ({n:,} x {width}, "
                f"{format_size(u_bytes)}) in memory, too much of the memory budget's "
                f"{format_size(self.memory_budget)}; raise --memory-budget or lower --max-samples"
            )
        plan = plan_row_blocks(
            selection.sizes,
            selection.names,
            width * 4 + 8,
            budget,
            remedies="lower --k or --oversample, or leave it out with --params",
        )
        starts = np.concatenate([[0], np.cumsum(selection.sizes)]).astype(int)
        return [(int(starts[a]), int(starts[b]), list(selection.names[a:b])) for a, b in plan]

    def _pca_blocked(self, job: _PcaJob) -> Subspace:
        """Subspace iteration when the P×(K+p) block and accumulator exceed the budget.

        V and Y live in the store; the parameters are split into layer blocks whose rows fit,
        and one iteration is two passes over the data per block (``U = Σ_b G_b V_b``, then
        ``Y_b = G_bᵀ U``) and a CholeskyQR2 read and written block by block. Every phase
        reads arrays it does not write (two P×w slots, S0 and S1, swap roles), and progress is
        saved after each block pass, so a killed run redoes at most one block pass.
        """
        source, indices, selection = job.source, job.indices, job.selection
        mean, scale, k, width = job.mean, job.scale, job.k, job.width
        iterations, seed, batch_size = job.iterations, job.seed, job.batch_size
        p, n = selection.size, len(indices)
        blocks = self._pca_blocks(selection, width, n)
        state = "subspace/state"
        attrs = self.store.group_attrs(state) if self.store.has(state) else {}
        model = self.model
        tile_bytes = self._tile_bytes()
        engines = [
            LayerGradients(model.module, selection, only=names, tile_bytes=tile_bytes)
            for _, _, names in blocks
        ]
        self.progress.note(
            f"the PCA block and accumulator ({2 * p * width * 4 / 2**30:.1f} GiB) exceed the "
            f"memory budget: layer-block form, {len(blocks)} blocks, "
            f"{2 * len(blocks)} passes over the data per iteration"
        )
        layout = {"form": "blocks", "width": width, "blocks": len(blocks)}
        if any(attrs.get(key) != value for key, value in layout.items()):
            self.store.delete(state)
            for slot in ("S0", "S1"):
                self.store.create_rows(
                    f"{state}/{slot}",
                    (p, width),
                    "float32",
                    chunk_rows=BASIS_CHUNK_ROWS,
                    compress=False,
                )
            for start, stop, _ in blocks:  # the seeded Gaussian start, orthonormalised below
                generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
                rows = torch.randn(stop - start, width, generator=generator)
                self.store.write_rows(f"{state}/S1", start, rows.numpy())
            fixed = max(b - a for a, b, _ in blocks) * (width * 4 + 8) + 2 * n * width * 8
            batch = batch_size or min(
                self._batch_size(engine, source, indices, fixed) for engine in engines
            )
            for engine in engines:
                engine.release()
            attrs = dict(layout, iteration=0, phase="orth1", starting=True, v=0, block=0, uslot=0)
            attrs["batch"] = batch
            self.store.set_attrs(state, **attrs)
        batch = attrs["batch"]
        n_batches = -(-n // batch)
        per_iteration = 2 * len(blocks) * n_batches
        with self.progress.task("PCA (layer blocks)", total=(iterations + 1) * per_iteration) as (
            advance
        ):
            done_in_iteration = {
                "u": attrs["block"],
                "y": len(blocks) + attrs["block"],
            }.get(attrs["phase"], 0 if attrs["starting"] else 2 * len(blocks))
            advance(attrs["iteration"] * per_iteration + done_in_iteration * n_batches)
            while True:
                attrs = self.store.group_attrs(state)
                phase, v = attrs["phase"], attrs["v"]
                if phase in ("orth1", "orth2"):
                    first = phase == "orth1"
                    source_slot, target_slot = (1 - v, v) if first else (v, 1 - v)
                    self._orthonormalise_rows(
                        f"{state}/S{source_slot}", f"{state}/S{target_slot}", blocks, width, first
                    )
                    if first:
                        self.store.set_attrs(state, phase="orth2")
                    else:
                        iteration = attrs["iteration"] + (0 if attrs["starting"] else 1)
                        self.store.set_attrs(
                            state, phase="u", v=1 - v, iteration=iteration, starting=False, block=0
                        )
                    continue
                if phase == "u":
                    u = self._pca_blocked_u(
                        state,
                        attrs,
                        blocks,
                        engines,
                        mean,
                        scale,
                        source,
                        indices,
                        batch,
                        width,
                        advance,
                    )
                    if attrs["iteration"] == iterations:
                        return self._pca_blocked_ritz(state, attrs, blocks, u, k, n)
                    self.store.set_attrs(state, phase="y", block=0)
                    continue
                self._pca_blocked_y(
                    state,
                    attrs,
                    blocks,
                    engines,
                    mean,
                    scale,
                    source,
                    indices,
                    batch,
                    width,
                    advance,
                )
                self.store.set_attrs(state, phase="orth1")

    def _blocked_pass(self, engine, source, indices, batch, each) -> None:
        """One pass over the data for one layer block: ``each(rows, start, tile)`` per tile."""
        offset = 0
        for x, _ in self._loader(source, indices, batch):
            logits, _ = engine.capture(x.to(self.device))
            _check_finite(logits, "logits", source.spec)
            rows = slice(offset, offset + x.shape[0])
            for start, tile in engine.tiles():
                each(rows, start, tile)
            offset += x.shape[0]
            if self.should_stop():
                raise Interrupted(
                    "stopped during a PCA block pass; rerun the same command to resume at the "
                    "start of that block"
                )

    def _pca_blocked_u(
        self, state, attrs, blocks, engines, mean, scale, source, indices, batch, width, advance
    ) -> torch.Tensor:
        """``U = Σ_b G_b V_b`` (n, w) float64, saved after every block."""
        n, v, uslot = len(indices), attrs["v"], attrs["uslot"]
        if attrs["block"]:
            u = torch.from_numpy(self.store.read(f"{state}/U{uslot}")).to(self.device)
        else:
            u = torch.zeros(n, width, dtype=torch.float64, device=self.device)
        unused = torch.zeros(n, dtype=torch.float64, device=self.device)
        n_batches = -(-n // batch)
        for b in range(attrs["block"], len(blocks)):
            start, stop, _ = blocks[b]
            rows_v = torch.from_numpy(self.store.read_rows(f"{state}/S{v}", start, stop))
            projector = Projector(
                mean[start:stop], scale[start:stop], rows_v, start=start, device=self.device
            )

            def add(rows, first, tile, projector=projector):
                projector.add(first, tile, u[rows], unused[rows])

            self._blocked_pass(engines[b], source, indices, batch, add)
            engines[b].release()
            _check_finite(u, "gradients", source.spec)
            uslot = 1 - uslot
            self.store.write(f"{state}/U{uslot}", u.cpu().numpy(), compress=False)
            self.store.set_attrs(state, uslot=uslot, block=b + 1)
            advance(n_batches)
        return u

    def _pca_blocked_y(
        self, state, attrs, blocks, engines, mean, scale, source, indices, batch, width, advance
    ) -> None:
        """``Y_b = G_bᵀ U`` for every block, written to the slot V does not hold."""
        n_batches = -(-len(indices) // batch)
        u32 = torch.from_numpy(self.store.read(f"{state}/U{attrs['uslot']}")).float()
        u32 = u32.to(self.device)
        for b in range(attrs["block"], len(blocks)):
            start, stop, _ = blocks[b]
            y = torch.zeros(stop - start, width, device=self.device)
            projector = Projector(
                mean[start:stop],
                scale[start:stop],
                torch.zeros(stop - start, 0),
                start=start,
                device=self.device,
            )

            def accumulate(rows, first, tile, projector=projector, y=y, start=start):
                local = slice(first - start, first - start + tile.shape[1])
                y[local].addmm_(projector.normalise(first, tile).T, u32[rows])

            self._blocked_pass(engines[b], source, indices, batch, accumulate)
            engines[b].release()
            self.store.write_rows(f"{state}/S{1 - attrs['v']}", start, y.cpu().numpy())
            self.store.set_attrs(state, block=b + 1)
            advance(n_batches)

    def _orthonormalise_rows(
        self, source: str, target: str, blocks: list, width: int, first: bool
    ) -> None:
        """One CholeskyQR round over a stored (P, w) array, block by block: target = source R⁻¹."""
        gram = torch.zeros(width, width, dtype=torch.float64)
        for start, stop, _ in blocks:
            gram_(gram, torch.from_numpy(self.store.read_rows(source, start, stop)), wide=first)
        inverse = inverse_factor(gram)
        if inverse is None:
            raise BadInputError(
                "the PCA block lost rank (the gradients span fewer than K + p directions); "
                "lower --k or --oversample"
            )
        inverse = inverse.float()
        for start, stop, _ in blocks:
            rows = torch.from_numpy(self.store.read_rows(source, start, stop))
            self.store.write_rows(target, start, (rows @ inverse).numpy())

    def _pca_blocked_ritz(self, state, attrs, blocks, u, k, n) -> Subspace:
        """Rayleigh–Ritz from U = G V: eigenvalues, and the rotated basis written block by
        block to ``subspace/basis``."""
        rotation, values = ritz_rotation((u.T @ u).cpu(), k, n)
        rotation = rotation.float()
        p = blocks[-1][1]
        self.store.create_rows("subspace/basis", (p, k), "float32", chunk_rows=BASIS_CHUNK_ROWS)
        for start, stop, _ in blocks:
            rows = torch.from_numpy(self.store.read_rows(f"{state}/S{attrs['v']}", start, stop))
            self.store.write_rows("subspace/basis", start, (rows @ rotation).numpy())
        return Subspace(basis=None, method="pca", eigenvalues=values.numpy())

    def _save_partial(
        self, state: str, accumulator: torch.Tensor, iteration: int, cursor: int
    ) -> None:
        """Checkpoint an iteration's partial sum after ``cursor`` steps (rank 0 only), in the
        slot the state does not name; the array records what it holds."""
        slot = 1 - self.store.group_attrs(state).get("slot", 0)
        self.store.write(
            f"{state}/partial{slot}",
            accumulator.cpu().numpy(),
            chunk_rows=BASIS_CHUNK_ROWS,
            compress=False,
            attrs={"iteration": iteration, "cursor": cursor},
        )
        self.store.set_attrs(state, cursor=cursor, slot=slot, world=self.group.world)

    def _matching_partial(self, state: str, iteration: int, cursor: int) -> str | None:
        """The stored partial sum of ``iteration`` after ``cursor`` steps, if one is intact."""
        slot = self.store.group_attrs(state).get("slot", 0)
        for candidate in (slot, 1 - slot):
            path = f"{state}/partial{candidate}"
            held = self.store.group_attrs(path) if self.store.has(path) else {}
            if held.get("iteration") == iteration and held.get("cursor") == cursor:
                return path
        return None

    def _pca_batch(
        self,
        engine: LayerGradients,
        source,
        indices,
        fixed: int,
        batch_size: int | None,
        itemsize: int = 4,
    ) -> tuple[int, bool]:
        """PCA batch size, and whether a batch's normalised gradients (B×P, ``itemsize``
        bytes each) are kept between the two products so the second needs no second sweep
        of the engine."""
        free = self._free_for_batches(engine, source, indices, fixed)
        per_sample = engine.sample_bytes()
        kept_bytes = itemsize * engine.selection.size
        if batch_size is not None:
            return batch_size, batch_size * (per_sample + kept_bytes) <= free
        keep_batch = auto_batch_size(per_sample + kept_bytes, free, cap=PCA_KEEP_MAX_BATCH)
        if keep_batch >= PCA_KEEP_MIN_BATCH:
            return keep_batch, True
        return auto_batch_size(per_sample, free), False

    def _pca_batch_step(
        self,
        engine: LayerGradients,
        projector: Projector,
        x: torch.Tensor,
        accumulator: torch.Tensor,
        ritz: bool,
        kept: torch.Tensor | None,
        spec: str,
        scratch: _Scratch | None = None,
    ) -> None:
        """One batch of one PCA pass: ``U = G_b V``, then ``Y += G_bᵀ U`` (or, in the
        Rayleigh–Ritz pass, ``UᵀU``) into ``accumulator``. ``kept`` (≥ B·P,) holds the
        batch's normalised tiles, each contiguous, between the two products."""
        logits, _ = engine.capture(x.to(self.device))
        _check_finite(logits, "logits", spec)
        n = x.shape[0]
        u = torch.zeros(n, projector.k, dtype=torch.float64, device=self.device)
        unused = torch.zeros(n, dtype=torch.float64, device=self.device)
        keeping = not ritz and kept is not None
        pieces, offset = [], 0
        for start, tile in engine.tiles():
            out = None
            if keeping:
                out = kept[offset : offset + tile.numel()].view(tile.shape)
                offset += tile.numel()
                pieces.append((start, out))
            projector.add(start, tile, u, unused, out=out, in_place=True)
        _check_finite(u, "gradients", spec)
        if ritz:
            accumulator += (u.T @ u).cpu()
            return
        weights = u.to(projector.dtype)
        if not keeping:
            pieces = (
                (start, projector.normalise(start, tile, in_place=True).to(projector.dtype))
                for start, tile in engine.tiles()
            )
        for start, g in pieces:
            rows = slice(start, start + g.shape[1])
            _accumulate_transposed(accumulator[rows], g, weights, scratch)

    def _save_block(self, state: str, iteration: int, block: torch.Tensor) -> None:
        """Checkpoint the block of ``iteration`` (runs in the background writer); a bf16
        block is stored as its bit pattern (int16)."""
        if block.dtype == torch.bfloat16:
            block = block.view(torch.int16)
        self.store.write(
            f"{state}/V{iteration % 2}", block.numpy(), chunk_rows=BASIS_CHUNK_ROWS, compress=False
        )
        self.store.set_attrs(state, iteration=iteration, cursor=0)

    def _usable_stats_record(self, record: dict) -> dict:
        """The stats stage's record to open: the stored one when it holds what ``record``
        asks for (statistics with class sums serve PCA too; a store made before the record
        named them has them), else ``record``."""
        existing = self.store.group_attrs("stats").get("provenance")
        if existing is None:
            return record
        rest = {key: value for key, value in existing.items() if key != "class_sums"}
        if rest != {key: value for key, value in record.items() if key != "class_sums"}:
            return record
        return existing if existing.get("class_sums", True) or not record["class_sums"] else record

    def _check_average_gradient_memory(self, selection: ParameterSelection, classes: int) -> None:
        """Refuse, before any pass over the data, an AG subspace whose class arrays exceed the
        memory budget: the statistics pass sums gradients per class (C×P float64), and the
        orthonormalisation holds the class means, their normalised copy and QR's (float64)
        and the float32 results: at most AG_BYTES_PER_ENTRY bytes per class and parameter."""
        p = selection.size
        need = AG_BYTES_PER_ENTRY * classes * p
        if need <= self.memory_budget:
            return
        last = selection.names[-1].rsplit(".", 1)[0] + ".*"
        raise BadInputError(
            f"--method avg on {classes:,} classes x {p:,} parameters needs {format_size(need)} "
            f"(float64 class sums of {format_size(8 * classes * p)}, and their "
            f"orthonormalisation), over the memory budget's {format_size(self.memory_budget)}: "
            f"select fewer parameters with --params '{last}', use --method pca --k N, or raise "
            "--memory-budget"
        )

    def _compute_statistics(
        self,
        source,
        indices: np.ndarray,
        selection: ParameterSelection,
        batch_size: int | None,
        no_variance: bool = False,
        class_sums: bool = True,
        checkpoint_every: int = 50,
    ) -> None:
        """The statistics pass: mean and centred variance of the gradients (float64), and
        their per-class sums when ``class_sums`` (the AG subspace's; PCA has none).

        Every ``checkpoint_every`` batches, and on a stop request, the float64 sums so far go
        to ``stats/state`` (alternating slots, named in the state's attrs only once written),
        so a rerun resumes after the last saved batch, with the batch size it began with,
        and gives the same bits as a pass never interrupted.
        """
        model = self.model
        engine = LayerGradients(model.module, selection, tile_bytes=self._tile_bytes())
        classes = model.num_classes if class_sums else None
        stats = GradientStatistics(selection.size, classes)
        group = self.group
        state = STATS_STATE
        # A resumed pass goes on with the batch size it began with; rank 0 holds its sums.
        resumed = self._stats_checkpoint(stats) if group.is_writer else None
        cursor, batch = group.broadcast_object(resumed or (0, None))
        if batch is None:
            # float64 mean, m2 and a spare (P,), plus the class sums (C, P)
            fixed = 8 * selection.size * (3 + (classes or 0))
            batch = group.broadcast_object(
                batch_size or self._batch_size(engine, source, indices, fixed)
            )
        mine = group.split(indices)  # under torchrun: this rank's slice; sums all-reduced below
        steps = group.steps(len(indices), batch)
        batches = iter(self._loader(source, mine[cursor * batch :], batch))
        with self.progress.task("gradient statistics", total=len(mine)) as advance:
            advance(min(len(mine), cursor * batch))
            while cursor < steps:
                item = next(batches, None)
                if item is not None:
                    x, y = item[0].to(self.device), item[1]
                    logits, _ = engine.capture(x)
                    _check_finite(logits, "logits", source.spec)
                    for start, tile in engine.tiles():
                        _check_finite(tile, "gradients", source.spec)
                        stats.update_rows(start, tile, y)
                    stats.commit(y)
                    advance(len(y))
                cursor += 1
                stop = group.any(self.should_stop())
                if (cursor % checkpoint_every == 0 or stop) and cursor < steps:
                    # A checkpoint holds the sums over all ranks: rank 0 keeps them, the
                    # others start again from zero (Chan's merge adds them up at the end).
                    stats.all_reduce(group)
                    if not group.is_writer:
                        stats = GradientStatistics(selection.size, classes)
                    self._on_writer(self._save_stats_checkpoint, stats, cursor, batch, value=False)
                if stop:
                    raise Interrupted(
                        "stopped after saving the statistics' progress; rerun the same command "
                        "to resume"
                    )
        stats.all_reduce(group)
        raw = stats.variance()
        raw_sum = float(raw[torch.isfinite(raw)].sum())
        var, replaced = sanitise_variance(raw)

        def write_stats() -> None:
            self.store.write("stats/mean", stats.mean.float().numpy(), chunk_rows=BASIS_CHUNK_ROWS)
            self.store.write("stats/var", var.float().numpy(), chunk_rows=BASIS_CHUNK_ROWS)
            summary = {}
            if class_sums:
                counts = torch.as_tensor(stats.class_counts, dtype=torch.float64)
                stats.class_sums /= counts.clamp_min(1)[:, None]  # the class means, in place
                self.store.write(
                    "stats/class_means", stats.class_sums.float().numpy(), chunk_rows=1
                )
                summary["class_counts"] = stats.class_counts.tolist()
            self.store.delete(state)
            self.store.complete_stage(
                "stats",
                samples=int(stats.count),
                variance_replaced=replaced,
                raw_variance_sum=raw_sum,
                **summary,
            )

        self._on_writer(write_stats, value=False)
        if replaced and not no_variance:  # --no-variance does not divide by it
            self.progress.note(
                f"{replaced} parameters had zero or non-finite gradient variance; "
                "their variance was set to the largest finite one"
            )

    def _save_stats_checkpoint(self, stats: GradientStatistics, cursor: int, batch: int) -> None:
        """Save the statistics after ``cursor`` batches (rank 0 only): the float64 arrays to
        the slot the state does not name, each recording the cursor, then the state."""
        state = STATS_STATE
        slot = 1 - self.store.group_attrs(state).get("slot", 0)
        arrays = {"mean": stats.mean, "m2": stats.m2}
        if stats.class_sums is not None:
            arrays["class_sums"] = stats.class_sums
        for name, values in arrays.items():
            self.store.write(
                f"{state}/{name}{slot}",
                values.numpy(),
                chunk_rows=BASIS_CHUNK_ROWS if values.ndim == 1 else 1,
                compress=False,
                attrs={"cursor": cursor},
            )
        self.store.set_attrs(
            state,
            slot=slot,
            cursor=cursor,
            batch=batch,
            world=self.group.world,
            count=int(stats.count),
            class_counts=stats.class_counts.tolist(),
        )

    def _stats_checkpoint(self, stats: GradientStatistics) -> tuple[int, int] | None:
        """Load the saved statistics into ``stats``; returns (cursor, batch), or None when
        there is no intact checkpoint of this number of ranks (the pass starts over)."""
        state = STATS_STATE
        attrs = self.store.group_attrs(state)
        if not attrs.get("cursor") or attrs.get("world") != self.group.world:
            return None
        slot, cursor = attrs["slot"], attrs["cursor"]
        names = ["mean", "m2"] + (["class_sums"] if stats.class_sums is not None else [])
        paths = [f"{state}/{name}{slot}" for name in names]
        if any(self.store.group_attrs(path).get("cursor") != cursor for path in paths):
            return None
        arrays = [
            torch.from_numpy(np.require(self.store.read(path), requirements="W")) for path in paths
        ]
        if any(a.dtype != torch.float64 or a.shape[-1] != stats.mean.shape[0] for a in arrays):
            return None
        stats.mean, stats.m2 = arrays[0], arrays[1]
        if stats.class_sums is not None:
            stats.class_sums = arrays[2]
            stats.class_counts = np.asarray(attrs["class_counts"], dtype=np.int64)
        stats.count = int(attrs["count"])
        return int(cursor), int(attrs["batch"])

    def _normalisation(self, no_variance: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.from_numpy(self.store.read("stats/mean"))
        if no_variance:
            return mean, torch.ones_like(mean)
        return mean, torch.from_numpy(self.store.read("stats/var")).sqrt()

    def _tile_bytes(self) -> int:
        """Per-sample gradient tile: large enough for fast products, a small share of the
        budget (the engine and the projection each hold one)."""
        return int(min(TILE_BYTES, max(1 << 20, self.memory_budget // 16)))

    def _iteration_dtype(self, requested: str) -> torch.dtype:
        """The dtype of PCA's iteration products: bf16 on 'auto' where it is native."""
        if requested == "auto":
            return torch.bfloat16 if native_bfloat16(self.device) else torch.float32
        return BASIS_DTYPES[requested]

    def _free_for_batches(self, engine: LayerGradients, source, indices, fixed_bytes: int) -> int:
        """Bytes of the budget left for batches once ``fixed_bytes``, the model and the tile
        workspaces are counted; captures one sample so ``engine.sample_bytes()`` is known."""
        probe, _ = next(iter(self._loader(source, indices[:1], 1)))
        engine.capture(probe.to(self.device))
        model_bytes = sum(p.numel() * p.element_size() for p in self.model.module.parameters())
        workspaces = 3 * self._tile_bytes()  # engine tile, normalised tile, bf16 copy
        return self.memory_budget - fixed_bytes - 2 * model_bytes - workspaces - (16 << 20)

    def _batch_size(self, engine: LayerGradients, source, indices, fixed_bytes: int) -> int:
        """Batch size from the memory budget, measured on one sample."""
        free = self._free_for_batches(engine, source, indices, fixed_bytes)
        return auto_batch_size(engine.sample_bytes(), free)

    def _row_blocks(
        self, selection: ParameterSelection, k: int
    ) -> list[tuple[int, int, list[str]]]:
        """Parameter blocks whose basis rows fit the budget: [(first_row, end_row, names)]."""
        bytes_per_row = k * BASIS_DTYPES[self.basis_dtype].itemsize + 8  # + mean, 1/scale
        plan = plan_row_blocks(
            selection.sizes, selection.names, bytes_per_row, int(self.memory_budget * BASIS_SHARE)
        )
        starts = np.concatenate([[0], np.cumsum(selection.sizes)]).astype(int)
        return [(int(starts[a]), int(starts[b]), list(selection.names[a:b])) for a, b in plan]

    def _projector(self, start: int, stop: int) -> Projector:
        """The projection for basis rows [start, stop), read from the store."""
        if not self.store.stage_complete("subspace"):
            raise BadInputError(
                f"store {self.store.url} has no finished subspace; run 'gradcli extract-subspace' "
                "first"
            )
        no_variance = self.store.group_attrs("subspace")["provenance"]["no_variance"]
        mean = torch.from_numpy(self.store.read_rows("stats/mean", start, stop))
        if no_variance:
            scale = torch.ones_like(mean)
        else:
            scale = torch.from_numpy(self.store.read_rows("stats/var", start, stop)).sqrt()
        starts = np.concatenate([[0], np.cumsum(self.selection.sizes)])
        bounds = [start, *[int(s) for s in starts if start < s < stop], stop]
        parts = self.store.read_rows_transposed("subspace/basis", bounds)
        return Projector(
            mean,
            scale,
            [torch.from_numpy(part) for part in parts],
            start=start,
            dtype=BASIS_DTYPES[self.basis_dtype],
            device=self.device,
            transposed=True,
        )

    # -- embed -------------------------------------------------------------------------
    def embed(
        self,
        dataset: str,
        *,
        name: str | None = None,
        batch_size: int | None = None,
        max_samples: int | None = None,
        seed: int = 0,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        overwrite: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> str:
        """Reduced gradients, features, logits and labels of a dataset; returns the name.

        When the basis does not fit the memory budget, the parameters are split into row
        blocks and the data is passed once per block; partial sums are kept in the store so
        the result equals the unsplit run and an interrupted run resumes per block and chunk.

        ``shard=(i, n)``: compute only the chunks :func:`gradcli.distributed.shard_range`
        gives shard ``i`` of ``n`` (processes started at once on one store write disjoint
        chunks); the stage is completed by whichever process finds every chunk done, so check
        ``store.stage_complete(f"embed/{name}")`` afterwards.
        """
        self.store.require()  # a store never made: say so, make nothing
        batch_size = _check_batch_size(batch_size)
        seed = _check_seed(seed)
        if chunk_rows < 1:
            raise BadInputError("--chunk-rows must be at least 1")
        shared = shard is not None
        if shared:
            check_shard(*shard, "shard")
            if overwrite:
                raise BadInputError(
                    "--overwrite cannot be combined with --shard (one shard would delete rows "
                    "another wrote); recompute once without --shard, or use a new --name"
                )
        source = self.resolve(dataset)
        defaulted = name is None
        name = name or source.slug
        _check_name(name)
        path = f"embed/{name}"
        if defaulted and not overwrite and self.store.has(path):
            stored = (self.store.group_attrs(path).get("provenance") or {}).get("dataset")
            if stored and stored != source.spec:
                raise BadInputError(
                    f"the name '{name}' already holds the embedding of {stored}; embed "
                    f"{source.spec} under a name of its own (gradcli embed --dataset "
                    f"{source.spec} --name NAME; in Python embed(spec, name=NAME)) and use "
                    f"NAME, or replace the stored one (gradcli embed --dataset {source.spec} "
                    "--overwrite)"
                )
        model = self.model
        selection = self.selection
        if not self.store.stage_complete("subspace"):
            self._projector(0, 0)  # raises the "extract-subspace first" error
        k = int(self.store.shape("subspace/basis")[1])
        indices = self._subset(len(source), max_samples, seed)
        record = {
            "subspace": self.store.stage_digest("subspace"),
            "dataset": source.spec,
            "fingerprint": source.fingerprint(),
            "rows": int(len(indices)),
            "max_samples": max_samples,
            "seed": seed,
            "preprocess": model.preprocess.to_dict(),
            "basis_dtype": self.basis_dtype,
        }
        attrs = self.store.group_attrs(path) if self.store.has(path) else {}
        left_out = attrs.get("skipped_images") or 0
        changed = attrs.get("provenance") != record
        if left_out and changed and self.on_bad_image == "fail" and not overwrite:
            raise StaleStoreError(
                f"embedding '{name}' was made with --on-bad-image skip ({left_out} unreadable "
                "image(s) left out); pass --on-bad-image skip here too"
            )
        if self.store.open_stage(
            path, record, overwrite=overwrite, what=f"embedding '{name}'", shared=shared
        ):
            return name
        if not shared:  # a shard never deletes; stored scores name the embedding they came from
            self.store.delete(f"scores/{name}")
        blocks = self._row_blocks(selection, k)
        # A TorchScript model takes no hooks: its features come from a forward pass of their own.
        scripted = isinstance(model.module, torch.jit.ScriptModule)
        feature_module = None if scripted else model.module.get_submodule(model.feature_layer)
        engines = [
            LayerGradients(
                model.module,
                selection,
                only=names,
                feature_module=feature_module if i == 0 else None,
                tile_bytes=self._tile_bytes(),
            )
            for i, (_, _, names) in enumerate(blocks)
        ]
        probe, _ = next(iter(self._loader(source, indices[:1], 1)))
        logits, feat = engines[0].capture(probe.to(self.device))
        feat = self._features(probe.to(self.device), feat)
        arrays = {
            "grad": ((k,), "float32"),
            "gnorm": ((), "float32"),
            "feat": ((feat.shape[1],), "float32"),
            "logits": ((logits.shape[1],), "float32"),
            "labels": ((), "int64"),
        }
        if len(blocks) > 1:
            # Block b reads slot (b - 1) % 2 and writes slot b % 2: redoing a block after a
            # kill never adds its terms twice.
            for slot in (0, 1):
                arrays.update({f"partial{slot}": ((k,), "float64")})
                arrays.update({f"partial_gnorm2_{slot}": ((), "float64")})
        bytes_per_row = k * BASIS_DTYPES[self.basis_dtype].itemsize + 8
        block_rows = max(stop - start for start, stop, _ in blocks)
        fixed = block_rows * bytes_per_row
        batch = batch_size or min(
            self._batch_size(engine, source, indices, fixed) for engine in engines
        )
        for engine in engines:
            engine.release()
        # The first writer records its batch size; later shards and resumes use it, so every
        # chunk is computed in the same batches whoever computes it (bitwise-equal arrays).
        meta = {"batch_size": int(batch), "shards": shard[1] if shared else 1}
        rows_per_chunk = min(chunk_rows, max(1, len(indices)))  # a chunk beyond the data is moot
        chunks = self.store.row_chunks(
            path, len(indices), rows_per_chunk, arrays, shared=shared, meta=meta
        )
        if batch_size is None:
            batch = int(chunks.meta.get("batch_size", batch))
        if len(blocks) > 1:
            self.progress.note(
                f"the basis ({selection.size:,} rows x {k}) exceeds the memory budget: "
                f"{len(blocks)} passes over the data, one per parameter block"
            )
        block_done = self.store.flags(
            path, "block_done", len(blocks) * chunks.n_chunks, shared=shared
        )
        pending = chunks.pending()
        if shared:
            own = shard_range(chunks.n_chunks, *shard)
            pending = [chunk for chunk in pending if chunk in own]
        total = len(blocks) * sum(len(chunks.chunk_range(i)) for i in pending)
        with self.progress.task(f"embed {name}", total=total) as advance:
            for b, ((start, stop, _), engine) in enumerate(zip(blocks, engines, strict=True)):
                projector = self._projector(start, stop)
                for chunk in pending:
                    rows = chunks.chunk_range(chunk)
                    flag = b * chunks.n_chunks + chunk
                    if block_done[flag]:
                        advance(len(rows))
                        continue
                    first, last = b == 0, b == len(blocks) - 1
                    parts = self._embed_rows(
                        source,
                        indices[rows.start : rows.stop],
                        batch,
                        engine,
                        projector,
                        None if first else (chunks, chunk, (b - 1) % 2),
                    )
                    if not last:
                        parts[f"partial{b % 2}"] = parts.pop("z")
                        parts[f"partial_gnorm2_{b % 2}"] = parts.pop("gnorm2")
                    else:
                        parts["grad"] = parts.pop("z").astype(np.float32)
                        parts["gnorm"] = np.sqrt(parts.pop("gnorm2")).astype(np.float32)
                    chunks.write(chunk, parts)
                    if last:
                        chunks.mark_done(chunk)
                    else:
                        block_done[flag] = True
                    advance(len(rows))
                    if self.should_stop():
                        raise Interrupted(
                            f"stopped after a finished chunk of '{name}'; rerun the same "
                            "command to resume"
                        )
                engine.release()
                del projector
        if shared and not chunks.done().all():
            return name  # other shards are still at work; the last to finish completes it
        for leftover in ("partial0", "partial1", "partial_gnorm2_0", "partial_gnorm2_1"):
            self.store.delete(f"{path}/{leftover}")
        self.store.delete(f"{path}/block_done")
        skipped = self.skipped.get(source.spec, [])
        self.store.complete_stage(
            path,
            rows=len(indices),
            dataset=source.spec,
            has_labels=source.has_labels,
            skipped_images=len(skipped),
            skipped_examples=skipped[:100],
        )
        return name

    def _embed_rows(
        self, source, indices, batch, engine, projector, partial_from=None
    ) -> dict[str, np.ndarray]:
        """One block's contribution for the given rows, batch by batch.

        Returns z (n, K) and gnorm2 (n,) float64 sums (continuing the stored partial sums of
        earlier blocks when ``partial_from`` = (row chunks, chunk, slot) is given) and, on the
        first block, the features, logits and labels.
        """
        n = len(indices)
        if partial_from is None:
            z = torch.zeros(n, projector.k, dtype=torch.float64, device=self.device)
            gnorm2 = torch.zeros(n, dtype=torch.float64, device=self.device)
        else:
            chunks, chunk, slot = partial_from
            z = torch.from_numpy(chunks.read_chunk(f"partial{slot}", chunk)).to(self.device)
            gnorm2 = torch.from_numpy(chunks.read_chunk(f"partial_gnorm2_{slot}", chunk))
            gnorm2 = gnorm2.to(self.device)
        out: dict[str, list] = {"feat": [], "logits": [], "labels": []}
        offset = 0
        for x, y in self._loader(source, indices, batch):
            x = x.to(self.device)
            logits, feat = engine.capture(x)
            if partial_from is None:
                feat = self._features(x, feat)
            rows = slice(offset, offset + len(y))
            _check_finite(logits, "logits", source.spec, indices[rows])
            for start, tile in engine.tiles():
                projector.add(start, tile, z[rows], gnorm2[rows], in_place=True)
            _check_finite(z[rows], "gradients", source.spec, indices[rows])  # NaN/Inf propagate
            offset += len(y)
            if partial_from is None:
                out["feat"].append(feat.cpu().numpy())
                out["logits"].append(logits.float().cpu().numpy())
                out["labels"].append(y.numpy().astype(np.int64))
        result = {"z": z.cpu().numpy(), "gnorm2": gnorm2.cpu().numpy()}
        if partial_from is None:
            result.update({key: np.concatenate(v) for key, v in out.items()})
        return result

    def _features(self, x: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
        """Features (B, D) float32 of a batch: those the capture hooked, else (a TorchScript
        model) from one more forward pass."""
        if captured is not None:
            return captured
        with torch.inference_mode():
            return self.model.features_and_logits(x)[0].flatten(1).float()

    def embedding_names(self) -> list[str]:
        """Names of the embeddings in the store, finished or not."""
        return self.store.children("embed") if self.store.has("embed") else []

    def _embeddings_of(self, spec: str) -> tuple[data_mod.ImageSource | None, dict[str, dict]]:
        """The source of a dataset spec (None when it is no readable spec) and its stored
        embeddings, name -> recorded provenance."""
        try:
            source = data_mod.resolve_dataset(spec, data_root=self.data_root)
        except GradcliError:
            return None, {}
        records = {
            name: self.store.group_attrs(f"embed/{name}").get("provenance") or {}
            for name in self.embedding_names()
        }
        return source, {n: r for n, r in records.items() if r.get("dataset") == source.spec}

    def stored_name(self, spec_or_name: str) -> str:
        """The store name of an embedding given by its name or by its dataset's spec."""
        names = self.embedding_names()
        if spec_or_name in names:
            return spec_or_name
        source, found = self._embeddings_of(spec_or_name)
        chosen = _preferred(source, list(found))
        if chosen is not None:
            return chosen
        if found:
            raise BadInputError(
                f"{source.spec} is embedded as {', '.join(found)}: name the one you mean"
            )
        raise BadInputError(
            f"no embedding '{spec_or_name}' in {self.store.url} (stored: "
            f"{', '.join(names) or 'none'}); embed it first: gradcli embed --dataset SPEC"
        )

    def load_embedding(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of a finished embedding, by name or dataset spec: grad (N,K), gnorm (N,),
        feat (N,D), logits (N,C) float32 and labels (N,) int64."""
        self.store.require()  # a store never made: say so, make nothing
        name = self.stored_name(name)
        path = f"embed/{name}"
        if not self.store.stage_complete(path):
            raise BadInputError(
                f"embedding '{name}' is unfinished in {self.store.url}; finish it with "
                f"'gradcli embed --name {name} --dataset SPEC', or score it by name"
            )
        return {
            key: self.store.read(f"{path}/{key}")
            for key in ("grad", "gnorm", "feat", "logits", "labels")
        }

    def embedding_for(self, spec_or_name: str, *, batch_size: int | None = None) -> str:
        """The store name of a dataset's embedding (a stored name is kept), embedding it first
        when it is not there yet."""
        return self._ensure_embedded(spec_or_name, batch_size=_check_batch_size(batch_size))

    def _embedded_as(self, spec: str, max_samples: int | None, seed: int) -> str | None:
        """The stored name of an embedding of ``spec`` with this subset, preferring its
        default name; None when there is none or several."""
        source, found = self._embeddings_of(spec)
        same_subset = [
            name
            for name, record in found.items()
            if record.get("max_samples") == max_samples
            and (max_samples is None or record.get("seed", 0) == seed)
        ]
        return _preferred(source, same_subset)

    def _note_embedding(
        self, spec: str, who: str, max_samples: int | None = None, seed: int = 0
    ) -> None:
        """Say that ``who`` embeds ``spec`` first when no finished embedding of it is stored
        (that is where its time goes)."""
        if spec in self.embedding_names():
            name = spec
        else:
            try:
                name = self._embedded_as(spec, max_samples, seed)
            except GradcliError:
                return  # the embedding itself names the problem
        if name is None or not self.store.stage_complete(f"embed/{name}"):
            self.progress.note(f"{who}: embedding {spec} first (no stored embedding)")

    def _ensure_embedded(self, spec_or_name: str, **kwargs) -> str:
        """The name of a finished embedding of a dataset spec or stored name, computing or
        finishing it first (an interrupted embedding resumes from its recorded dataset; a
        spec embedded under a name of its own is found by that name)."""
        names = self.embedding_names()
        if spec_or_name not in names:
            found = self._embedded_as(
                spec_or_name, kwargs.get("max_samples"), kwargs.get("seed", 0)
            )
            if found is not None:
                return self.embed(spec_or_name, name=found, **kwargs)
        if spec_or_name in names:
            if self.store.stage_complete(f"embed/{spec_or_name}"):
                return spec_or_name
            record = self.store.group_attrs(f"embed/{spec_or_name}").get("provenance") or {}
            if record.get("dataset"):
                kwargs.update(max_samples=record.get("max_samples"), seed=record.get("seed", 0))
                return self.embed(record["dataset"], name=spec_or_name, **kwargs)
        return self.embed(spec_or_name, **kwargs)

    def _id_spec(self, which: str) -> str:
        spec = self.store.attrs.get(f"id_{which}")
        if not spec:
            option = "fit-head --train SPEC" if which == "train" else "--id-test SPEC"
            raise BadInputError(
                f"store {self.store.url} does not know the ID {which} set; pass {option}"
            )
        return spec

    # -- fit-head ----------------------------------------------------------------------
    def fit_head(
        self,
        *,
        train: str | None = None,
        test: str | None = None,
        head: HeadOptions | None = None,
        detectors: DetectorOptions | None = None,
        batch_size: int | None = None,
        overwrite: bool = False,
    ) -> dict:
        """Train the BN→FC head and fit every detector on the ID training embeddings.

        ``head`` and ``detectors`` take the options dataclasses or dicts of their fields."""
        self.store.require()  # a store never made: say so, make nothing
        head_opts = _options(head, HeadOptions, "head")
        det_opts = _options(detectors, DetectorOptions, "detectors")
        _check_seed(head_opts.seed, "the head's seed")
        batch_size = _check_batch_size(batch_size)
        train_spec = train or self._id_spec("train")
        subset = {
            "max_samples": None if train else self.store.attrs.get("id_max_samples"),
            "seed": self.store.attrs.get("id_seed", 0),
        }
        self._note_embedding(train_spec, "fit-head", **subset)
        train_name = self._ensure_embedded(train_spec, batch_size=batch_size, **subset)
        train_data = self.load_embedding(train_name)
        labels = train_data["labels"]
        if (labels < 0).any():
            raise BadInputError(
                f"ID training embedding '{train_name}' has no labels; fit-head needs a labelled "
                "ID training set"
            )
        train_digest = self.store.stage_digest(f"embed/{train_name}")
        epochs = plan_epochs(
            len(labels), head_opts.batch_size, head_opts.epochs, head_opts.min_steps
        )
        recipe = {  # what training runs: epochs, optimiser steps, batch, lr and its schedule
            "epochs": epochs,
            "steps": epochs * steps_per_epoch(len(labels), head_opts.batch_size),
            "batch_size": head_opts.batch_size,
            "lr": head_opts.lr,
            "weight_decay": head_opts.weight_decay,
            "schedule": head_opts.schedule,
            "stopping": "fixed budget: max(10 epochs, min_steps steps)"
            if head_opts.epochs is None
            else "fixed budget: the given epochs",
        }
        record = {
            "train": train_name,
            "train_digest": train_digest,
            **vars(head_opts),
            "recipe": recipe,
        }
        summary: dict = {"train": train_name}
        if overwrite:  # and everything computed from them
            for path in ("head", "detectors", "scores", "calibration", "flags"):
                self.store.delete(path)
        if not self.store.open_stage("head", record, overwrite=True):
            self.store.delete("detectors")
            self.store.delete("scores")
            with self.progress.task("fit head", total=epochs) as advance:
                fitted = train_head(
                    train_data["grad"],
                    labels,
                    self.model.num_classes,
                    epochs=epochs,
                    lr=head_opts.lr,
                    batch_size=head_opts.batch_size,
                    momentum=head_opts.momentum,
                    weight_decay=head_opts.weight_decay,
                    schedule=head_opts.schedule,
                    seed=head_opts.seed,
                    progress=lambda done, total: advance(1),
                )
            for key, value in head_to_arrays(fitted).items():
                self.store.write(f"head/{key}", value)
            self.store.complete_stage(
                "head", train_accuracy=accuracy(fitted, train_data["grad"], labels)
            )
        summary["train_accuracy"] = self.store.group_attrs("head")["train_accuracy"]
        test_spec = test or self.store.attrs.get("id_test")
        if test_spec:
            self._note_embedding(test_spec, "fit-head")
            test_name = self._ensure_embedded(test_spec, batch_size=batch_size)
            test_data = self.load_embedding(test_name)
            classes = self.model.num_classes
            if (test_data["labels"] >= classes).any():
                raise BadInputError(
                    f"ID test set {test_spec} has labels outside 0..{classes - 1}; the model has "
                    f"{classes} classes: give the ID test set of the training data"
                )
            if test and not self.store.attrs.get("id_test"):  # evaluate's default ID set
                self._on_writer(lambda: self.store.update_root(id_test=test_name), value=False)
            if (test_data["labels"] >= 0).all():
                summary["test"] = test_name
                summary["test_accuracy"] = accuracy(
                    self.load_head(), test_data["grad"], test_data["labels"]
                )
                summary["model_test_accuracy"] = float(
                    (test_data["logits"].argmax(1) == test_data["labels"]).mean()
                )
        self._fit_detectors(train_name, train_data, det_opts)
        return summary

    def load_head(self) -> GradientHead:
        """The fitted BN→FC head, in eval mode."""
        if not self.store.stage_complete("head"):
            raise BadInputError(
                f"store {self.store.url} has no fitted head; run 'gradcli fit-head' first"
            )
        names = [n for n in self.store.children("head")]
        return head_from_arrays({n: self.store.read(f"head/{n}") for n in names})

    def readout(self, embedding: str) -> Readout | None:
        """Embedding -> logits: the head for gradients, the model's last Linear for features."""
        if embedding == "grad":
            return Readout.from_head(self.load_head())
        linear = self.model.classifier
        if linear is None:
            return None
        bias = None if linear.bias is None else linear.bias.detach().cpu()
        return Readout.from_linear(linear.weight.detach().cpu(), bias)

    @staticmethod
    def as_embedding(arrays: dict[str, np.ndarray], kind: str) -> Embedding:
        """An embedding's arrays (as :meth:`load_embedding` gives them) as the detectors'
        input for ``kind`` "grad" (reduced gradients, with ‖G‖) or "feat" (features)."""
        return Embedding(
            z=arrays["grad"] if kind == "grad" else arrays["feat"],
            logits=arrays["logits"],
            labels=arrays["labels"],
            gnorm=arrays["gnorm"] if kind == "grad" else None,
        )

    def _fit_detectors(
        self,
        train_name: str,
        train_data: dict[str, np.ndarray],
        options: DetectorOptions,
        only: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """Fit every detector, or the (embedding, method) pairs in ``only``, on the ID
        training embedding; a detector already fitted with the same record is kept."""
        head_digest = self.store.stage_digest("head")
        pairs = [(k, m) for k in EMBEDDINGS for m in BASE_METHODS if k in DETECTORS[m].kinds]
        if only is not None:
            pairs = [pair for pair in pairs if pair in set(only)]
        readouts: dict[str, Readout | None] = {}
        trains: dict[str, Embedding] = {}
        with self.progress.task("fit detectors", total=len(pairs)) as adv:
            for kind, method in pairs:
                if kind not in readouts:
                    readouts[kind] = self.readout(kind)
                    trains[kind] = self.as_embedding(train_data, kind)
                readout = readouts[kind]
                path = f"detectors/{kind}/{method}"
                config = options.for_method(method)
                record = {"train": train_name, "head": head_digest, **config}
                adv(1)
                if self.store.open_stage(path, record, overwrite=True):
                    continue
                detector = get_detector(method, **config)
                if readout is None and DETECTORS[method].needs_readout:
                    self.store.complete_stage(path, available=False)
                    continue
                detector.fit(trains[kind], readout)
                scalars = {}
                for key, value in detector.state().items():
                    if isinstance(value, np.ndarray) and value.ndim > 0:
                        self.store.write(f"{path}/{key}", value)
                    else:
                        scalars[key] = (
                            value.item() if isinstance(value, np.generic | np.ndarray) else value
                        )
                self.store.complete_stage(path, available=True, scalars=scalars)

    def _fit_missing_detectors(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Fit, with default options, detectors of methods that fit-head did not fit (a store
        made before they existed); those fit-head fitted are left as they are."""
        missing = [p for p in pairs if not self.store.stage_complete(f"detectors/{p[0]}/{p[1]}")]
        if missing:
            train_name = self.store.group_attrs("head")["provenance"]["train"]
            train_data = self.load_embedding(train_name)
            self._fit_detectors(train_name, train_data, DetectorOptions(), only=missing)

    def fitted_detector(self, kind: str, method: str) -> Detector | None:
        """The detector fit-head fitted for ``method`` on ``kind`` embeddings; None where it
        does not apply to this model (e.g. no last Linear layer)."""
        path = f"detectors/{kind}/{method}"
        if not self.store.stage_complete(path):
            raise BadInputError(
                f"detector {method} on {kind} is not fitted in {self.store.url}; "
                "run 'gradcli fit-head' first"
            )
        attrs = self.store.group_attrs(path)
        if not attrs.get("available", True):
            return None
        state = {n: self.store.read(f"{path}/{n}") for n in self.store.children(path)}
        state.update(attrs.get("scalars", {}))
        config = {k: v for k, v in attrs["provenance"].items() if k not in ("train", "head")}
        return get_detector(method, **config).__class__.from_state(state, **config)

    def _source(self, key: str, alpha: float, odin: ODIN) -> dict:
        """What scores ``key`` ('<method>-<embedding>') are computed with, apart from the data:
        the fitted detector's digest; ODIN's options and the model's weights; for an ensemble
        both parts and α. Recorded with stored scores and calibrated thresholds."""
        method, kind = key.rsplit("-", 1)
        if kind == "ensemble":
            return {
                "feat": self._source(f"{method}-feat", alpha, odin),
                "grad": self._source(f"{method}-grad", alpha, odin),
                "alpha": float(alpha),
            }
        if method in INPUT_DETECTORS:
            weights = (self.store.attrs.get("model") or {}).get("weights_sha256")
            return {"model": weights, method: odin.config()}
        return {"detector": self.store.stage_digest(f"detectors/{kind}/{method}")}

    # -- score -------------------------------------------------------------------------
    def score(
        self,
        dataset: str,
        *,
        methods: Sequence[str] = BASE_METHODS,
        embeddings: Sequence[str] = SCORE_EMBEDDINGS,
        alpha: float = 1.0,
        batch_size: int | None = None,
        odin_temperature: float = ODIN_TEMPERATURE,
        odin_epsilon: float = ODIN_EPSILON,
        write_flags: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Scores (higher = more ID) keyed '<method>-<embedding>'; written to scores/<name>/.

        ``shard=(i, n)`` splits the model pass of the methods that need the images (odin)
        into row chunks of ``scores_parts/<name>/<key>``, shard ``i`` computing its chunks;
        the process that finds every chunk done writes all the scores as an unsharded run
        would, the others return ``{}``. Needs a finished embedding and head.

        Methods that need the images (``odin``) run one batched model pass over the dataset
        the embedding was made from, only when named. Stored scores are reused while their
        recorded provenance (embedding, fitted detector, ODIN's T and ε, α) matches, else
        recomputed. With ``write_flags``, every score with a calibrated threshold λ (see
        :meth:`calibrate`) also gets its OOD flags (score < λ) in flags/<name>/<key>; a
        threshold calibrated with other settings is an error.
        """
        self.store.require()  # a store never made: say so, make nothing
        methods = resolve_methods(_name_list(methods, "methods"))
        embeddings = _check_embeddings(_name_list(embeddings, "embeddings"))
        alpha = _check_alpha(alpha)
        batch_size = _check_batch_size(batch_size)
        odin = ODIN(odin_temperature, odin_epsilon)
        classes = {method: method_class(method) for method in methods}  # unknown names fail
        _check_some_method_applies(classes, embeddings)
        if shard is not None:
            self._check_sharded_score(dataset, methods, shard)
        if not self.store.stage_complete("head"):
            self.fit_head(batch_size=batch_size)
        name = self._ensure_embedded(dataset, batch_size=batch_size)
        arrays = self.load_embedding(name)
        embed_digest = self.store.stage_digest(f"embed/{name}")
        bases = [e for e in EMBEDDINGS if e in embeddings or "ensemble" in embeddings]
        pairs = [  # a method's embedding, when asked for or needed by an ensemble it can form
            (m, k)
            for m in methods
            for k in bases
            if k in classes[m].kinds
            and (k in embeddings or set(EMBEDDINGS) <= set(classes[m].kinds))
        ]
        self._fit_missing_detectors([(k, m) for m, k in pairs if m in DETECTORS])
        calibrations: dict[str, dict] = {}
        if write_flags:  # checked before anything is computed or written
            wanted = [f"{m}-{k}" for m, k in pairs if k in embeddings]
            if "ensemble" in embeddings:
                wanted += [f"{m}-ensemble" for m in methods]
            calibrations = self._calibrations(wanted, alpha, odin)
        computed: dict[str, np.ndarray] = {}
        readouts: dict[str, Readout | None] = {}
        data: dict[str, Embedding] = {}
        sharded: dict[str, np.ndarray] = {}
        if shard is not None:
            for method, kind in pairs:
                key = f"{method}-{kind}"
                record = {"embedding": embed_digest, **self._source(key, alpha, odin)}
                path = f"scores/{name}/{key}"
                stored = self.store.has(path) and self.store.group_attrs(path).get("provenance")
                if method in INPUT_DETECTORS and stored != record:
                    part = self._input_scores_shard(name, key, record, odin, batch_size, shard)
                    if part is None:
                        return {}  # other shards still at work; the last one writes the scores
                    sharded[key] = part
        for method in methods:
            for kind in (k for m, k in pairs if m == method):
                key = f"{method}-{kind}"
                path = f"scores/{name}/{key}"
                record = {"embedding": embed_digest, **self._source(key, alpha, odin)}
                if (
                    self.store.has(path)
                    and self.store.group_attrs(path).get("provenance") == record
                ):
                    computed[key] = self.store.read(path)
                    continue
                if key in sharded:
                    scores = sharded[key]
                elif method in INPUT_DETECTORS:
                    scores = self._input_scores(name, odin, batch_size)
                else:
                    detector = self.fitted_detector(kind, method)
                    if detector is None:
                        continue
                    if kind not in readouts:
                        readouts[kind] = self.readout(kind)
                        data[kind] = self.as_embedding(arrays, kind)
                    with torch.inference_mode():
                        scores = detector.score(data[kind], readouts[kind])
                _check_finite(torch.from_numpy(np.asarray(scores)), f"{key} scores", name)
                self.store.write(path, scores, attrs={"provenance": record}, cache=True)
                computed[key] = scores
            feat, grad = computed.get(f"{method}-feat"), computed.get(f"{method}-grad")
            if "ensemble" in embeddings and feat is not None and grad is not None:
                key = f"{method}-ensemble"
                combined = ensemble_scores(feat, grad, alpha)
                record = {"embedding": embed_digest, **self._source(key, alpha, odin)}
                self.store.write(
                    f"scores/{name}/{key}",
                    combined,
                    attrs={"alpha": alpha, "provenance": record},
                    cache=True,
                )
                computed[key] = combined
        if sharded:  # every score is written: the parts are no longer needed
            self.store.delete(f"scores_parts/{name}")
        result = {k: v for k, v in computed.items() if k.rsplit("-", 1)[1] in embeddings}
        for key, record in calibrations.items():
            if key in result:
                self.store.write(
                    f"flags/{name}/{key}",
                    np.asarray(result[key]) < record["threshold"],
                    attrs={
                        "threshold": record["threshold"],
                        "tpr": record["tpr"],
                        "calibrated_on": record["dataset"],
                        "provenance": self.store.group_attrs(f"scores/{name}/{key}").get(
                            "provenance"
                        ),
                    },
                    cache=True,
                )
        return result

    def _embedded_source(
        self, name: str, needed_by: str
    ) -> tuple[data_mod.ImageSource, np.ndarray]:
        """The image source and row indices an embedding was made from, checked against its
        recorded fingerprint, for work that needs the images themselves."""
        provenance = self.store.group_attrs(f"embed/{name}").get("provenance") or {}
        spec = provenance.get("dataset")
        if not spec:
            raise BadInputError(
                f"embedding '{name}' records no dataset, so {needed_by} cannot find its images; "
                "re-embed it with 'gradcli embed --dataset SPEC --overwrite'"
            )
        try:
            source = self.resolve(spec)
        except BadInputError as err:
            raise BadInputError(
                f"{needed_by} needs the images of '{name}', but its dataset {spec} cannot be "
                f"opened: {err}"
            ) from None
        if source.fingerprint() != provenance.get("fingerprint"):
            raise StaleStoreError(
                f"the images of {spec} changed since '{name}' was embedded, so {needed_by} "
                f"would score other images; re-embed it (gradcli embed --dataset {spec} "
                f"--name {name} --overwrite) or restore the files"
            )
        indices = self._subset(len(source), provenance.get("max_samples"), provenance.get("seed"))
        if len(indices) != provenance.get("rows"):
            raise StaleStoreError(
                f"'{name}' has {provenance.get('rows')} rows but {spec} now gives {len(indices)}; "
                f"re-embed it (gradcli embed --dataset {spec} --name {name} --overwrite)"
            )
        return source, indices

    def _check_sharded_score(
        self, dataset: str, methods: Sequence[str], shard: tuple[int, int]
    ) -> str:
        """The embedding a sharded score reads; one-line errors for what it cannot do."""
        check_shard(*shard, "shard")
        if not any(m in INPUT_DETECTORS for m in methods):
            raise BadInputError(
                "--shard splits the model pass of odin; the other scores take seconds from "
                "the stored embedding: run score without --shard (or add odin to --method)"
            )
        name = dataset if dataset in self.embedding_names() else self.resolve(dataset).slug
        if not self.store.stage_complete(f"embed/{name}") or not self.store.stage_complete("head"):
            raise BadInputError(
                f"score --shard needs the finished embedding '{name}' and a fitted head; run "
                "'gradcli embed' (all shards) and 'gradcli fit-head' first"
            )
        return name

    def _input_scores_shard(
        self, name: str, key: str, record: dict, odin: ODIN, batch_size, shard
    ) -> np.ndarray | None:
        """Shard ``shard``'s row chunks of input-detector scores ``key`` (N,) float64 into
        scores_parts/<name>/<key>; all N scores once every chunk is done, else None. Chunks
        are whole batches, so every score is computed in the batch an unsharded run uses."""
        path = f"scores_parts/{name}/{key}"
        self.store.open_stage(path, record, shared=True, what=f"the {key} scores of '{name}'")
        n = int(self.store.shape(f"embed/{name}/grad")[0])
        batch = batch_size or INPUT_BATCH
        chunks = self.store.row_chunks(
            path, n, 4 * batch, {"scores": ((), "float64")}, shared=True, meta={"batch": batch}
        )
        batch = int(chunks.meta.get("batch", batch))
        own = shard_range(chunks.n_chunks, *shard)
        for chunk in (c for c in chunks.pending() if c in own):
            rows = chunks.chunk_range(chunk)
            scores = self._input_scores(name, odin, batch, slice(rows.start, rows.stop))
            chunks.write(chunk, {"scores": scores})
            chunks.mark_done(chunk)
        if not chunks.done().all():
            return None
        return chunks.read("scores")

    def _input_scores(
        self, name: str, detector, batch_size: int | None, rows: slice | None = None
    ) -> np.ndarray:
        """Scores (N,) of a detector that needs the model and the images, batch by batch over
        the rows of embedding ``name`` (or those ``rows`` of it)."""
        source, indices = self._embedded_source(name, detector.name)
        if rows is not None:
            indices = indices[rows]
        model = self.model
        scores = np.empty(len(indices))
        offset = 0
        with self.progress.task(f"{detector.name} {name}", total=len(indices)) as advance:
            for x, _ in self._loader(source, indices, batch_size or INPUT_BATCH):
                batch = detector.score_inputs(model.module, x.to(self.device), model.preprocess.std)
                scores[offset : offset + len(batch)] = batch
                offset += len(batch)
                advance(len(batch))
                if self.should_stop():
                    raise Interrupted(
                        f"stopped during the {detector.name} pass over '{name}'; rerun the same "
                        "command to score it again"
                    )
        return scores

    def item_ids(self, name: str) -> list[str] | None:
        """Per-row names of embedding ``name``: file paths (``spec#index`` for arrays), or
        ``None`` when its dataset cannot be opened or has changed since."""
        try:
            source, indices = self._embedded_source(name, "naming the rows")
        except GradcliError:
            return None
        return [source.item_id(int(i)) for i in indices]

    # -- decisions ---------------------------------------------------------------------
    def calibration(self, key: str) -> dict | None:
        """The stored calibration of scores ``key``: threshold λ, tpr, dataset, source."""
        path = f"calibration/{key}"
        return self.store.group_attrs(path) if self.store.has(path) else None

    def _calibrations(self, keys: Sequence[str], alpha: float, odin: ODIN) -> dict[str, dict]:
        """Stored calibrations of ``keys``; one made with other settings is an error."""
        found = {}
        for key in keys:
            record = self.calibration(key)
            if record is None:
                continue
            source = self._source(key, alpha, odin)
            if record.get("source") != source:
                changed = sorted(
                    k
                    for k in set(source) | set(record.get("source") or {})
                    if source.get(k) != (record.get("source") or {}).get(k)
                )
                if "detector" in changed or set(changed) <= {"feat", "grad"}:
                    raise StaleStoreError(
                        f"the {key} detector was refit (fit-head) after its threshold was "
                        f"calibrated on '{record.get('dataset')}'; recalibrate with score "
                        f"--calibrate-on {record.get('dataset')}"
                    )
                raise StaleStoreError(
                    f"the threshold of {key} was calibrated on '{record.get('dataset')}' with "
                    f"other settings ({', '.join(changed)} differ); rerun score with "
                    "--calibrate-on SPEC to recalibrate, or score with the calibrated settings"
                )
            found[key] = record
        return found

    def calibrate(
        self,
        dataset: str,
        *,
        tpr: float = 0.95,
        methods: Sequence[str] = BASE_METHODS,
        embeddings: Sequence[str] = SCORE_EMBEDDINGS,
        alpha: float = 1.0,
        batch_size: int | None = None,
        odin_temperature: float = ODIN_TEMPERATURE,
        odin_epsilon: float = ODIN_EPSILON,
    ) -> dict[str, dict]:
        """Store the paper's threshold λ for each score on held-out ID data ``dataset``.

        λ is the score at or above which a ``tpr`` share of ``dataset`` lies (the threshold
        FPR95 uses); afterwards ``score`` flags samples with score < λ as OOD. Kept in
        calibration/<key> with the settings it was made with.
        """
        self.store.require()  # a store never made: say so, make nothing
        tpr = check_tpr(tpr)
        methods = resolve_methods(_name_list(methods, "methods"))
        embeddings = _check_embeddings(_name_list(embeddings, "embeddings"))
        alpha = _check_alpha(alpha)
        odin = ODIN(odin_temperature, odin_epsilon)
        scores = self.score(
            dataset,
            methods=methods,
            embeddings=embeddings,
            alpha=alpha,
            batch_size=batch_size,
            odin_temperature=odin_temperature,
            odin_epsilon=odin_epsilon,
            write_flags=False,
        )
        name = self._ensure_embedded(dataset)
        if name == (self.store.group_attrs("head").get("provenance") or {}).get("train"):
            self.progress.note(
                f"calibrating on the ID training set '{name}' gives optimistic thresholds; "
                "use held-out ID data such as the ID test split"
            )
        samples = len(next(iter(scores.values()))) if scores else 0
        tail = samples * (1.0 - tpr)
        if 0 < tail < CALIBRATION_MIN_TAIL:
            self.progress.note(
                f"λ at TPR {tpr:g} from {samples} images rests on the lowest "
                f"{max(1, round(tail))} of them; calibrate on at least "
                f"{math.ceil(round(CALIBRATION_MIN_TAIL / (1.0 - tpr), 6))} held-out ID images "
                "for a stable threshold"
            )
        calibrations = {}
        for key, values in scores.items():
            record = {
                "threshold": threshold_at_tpr(values, tpr),
                "tpr": tpr,
                "dataset": name,
                "samples": int(len(values)),
                "embedding": self.store.stage_digest(f"embed/{name}"),
                "source": self._source(key, alpha, odin),
            }
            self.store.put_group(f"calibration/{key}", **record)
            calibrations[key] = record
        return calibrations

    def flags(self, name: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored OOD flags (N,) bool of embedding ``name`` (or its dataset's spec) for those
        ``keys`` whose flags match the stored scores and the current calibration (as ``score``
        leaves them)."""
        name = self.stored_name(name)
        out = {}
        for key in _name_list(keys, "keys"):
            path = f"flags/{name}/{key}"
            record = self.calibration(key)
            if not self.store.has(path) or record is None:
                continue
            attrs = self.store.group_attrs(path)
            scores = self.store.group_attrs(f"scores/{name}/{key}").get("provenance")
            if attrs.get("threshold") == record["threshold"] and attrs.get("provenance") == scores:
                out[key] = self.store.read(path)
        return out

    # -- evaluate ----------------------------------------------------------------------
    def evaluate(
        self,
        ood: Sequence[str],
        *,
        id_dataset: str | None = None,
        methods: Sequence[str] = BASE_METHODS,
        embeddings: Sequence[str] = SCORE_EMBEDDINGS,
        alpha: float = 1.0,
        convention: str = "paper",
        batch_size: int | None = None,
        odin_temperature: float = ODIN_TEMPERATURE,
        odin_epsilon: float = ODIN_EPSILON,
        sweeps: Mapping[str, Sequence[float]] | None = None,
    ) -> Results:
        """Every missing stage, then metrics of ID test scores against each OOD set.

        Scores with a calibrated threshold λ also report the realised acceptance at λ of the
        ID test set and of each OOD set (``Results.calibration``). ``sweeps`` maps a detector
        option (see :data:`gradcli.sweep.SWEEP_PARAMETERS`) to values tried on the stored
        embeddings (``Results.sweeps``).
        """
        from gradcli.sweep import check_sweep_dims, check_sweeps, run_sweeps

        self.store.require()  # a store never made: say so, make nothing
        if isinstance(ood, str | os.PathLike):
            ood = [ood]
        if not ood:
            raise BadInputError("give at least one --ood dataset")
        methods = resolve_methods(_name_list(methods, "methods"))
        embeddings = _check_embeddings(_name_list(embeddings, "embeddings"))
        alpha = _check_alpha(alpha)
        batch_size = _check_batch_size(batch_size)
        plan = check_sweeps(sweeps or {})
        odin = ODIN(odin_temperature, odin_epsilon)
        options = {
            "methods": methods,
            "embeddings": embeddings,
            "alpha": alpha,
            "batch_size": batch_size,
            "odin_temperature": odin_temperature,
            "odin_epsilon": odin_epsilon,
            "write_flags": False,
        }
        if not self.store.stage_complete("head"):
            self.fit_head(batch_size=batch_size)
        id_spec = id_dataset or self._id_spec("test")
        id_scores = self.score(id_spec, **options)
        id_name = self._ensure_embedded(id_spec)
        kinds = [k for k in EMBEDDINGS if k in embeddings or "ensemble" in embeddings]
        check_sweep_dims(plan, {k: self.store.shape(f"embed/{id_name}/{k}")[1] for k in kinds})
        results = Results(id_name=id_name, ood_names=[], convention=convention)
        results.settings = {
            "alpha": alpha,
            "odin_temperature": odin_temperature,
            "odin_epsilon": odin_epsilon,
            "subspace": self.store.stage_digest("subspace"),
            "head": self.store.stage_digest("head"),
            "detectors": {
                f"{method}-{kind}": self.store.stage_digest(f"detectors/{kind}/{method}")
                for method in methods
                for kind in EMBEDDINGS
                if self.store.has(f"detectors/{kind}/{method}")
            },
        }
        results.id_scores = id_scores
        id_labels = self.store.read(f"embed/{id_name}/labels")
        if len(id_labels) and ((id_labels >= 0) & (id_labels < self.model.num_classes)).all():
            grads = self.store.read(f"embed/{id_name}/grad")
            results.head_accuracy = accuracy(self.load_head(), grads, id_labels)
        for spec in ood:
            ood_name = self._ensure_embedded(spec)
            if ood_name == id_name:
                raise BadInputError(
                    f"--ood {spec} is the ID test set '{id_name}' itself; name an OOD dataset"
                )
            ood_scores = self.score(spec, **options)
            results.ood_names.append(ood_name)
            results.ood_scores[ood_name] = ood_scores
            table = {}
            for key, scores in ood_scores.items():
                method, emb = key.rsplit("-", 1)
                metrics = evaluate_scores(id_scores[key], scores, convention=convention)
                results.rows.setdefault((method, emb), {})[ood_name] = metrics
                table[key] = metrics
            self.store.put_group(
                f"results/{ood_name}", id=id_name, convention=convention, metrics=table, cache=True
            )
        for key, scores in id_scores.items():
            record = self.calibration(key)
            if record is None:
                continue
            threshold = record["threshold"]
            entry = {
                "threshold": threshold,
                "tpr": record["tpr"],
                "calibrated_on": record["dataset"],
            }
            if record.get("source") != self._source(key, alpha, odin):
                entry["stale"] = True  # calibrated with other settings: no acceptance to report
            else:
                entry["id_acceptance"] = float(np.mean(scores >= threshold))
                entry["ood_acceptance"] = {
                    name: float(np.mean(results.ood_scores[name][key] >= threshold))
                    for name in results.ood_names
                }
            results.calibration[key] = entry
        if plan:
            results.sweeps = run_sweeps(
                self, id_name, results.ood_names, plan, embeddings, alpha, convention
            )
        return results


def _unwrap_worker_errors(loader):
    """Batches of a multi-process loader; a worker's error keeps its one-line message.

    The DataLoader re-raises a worker's exception with the worker's traceback as its message;
    the original message is the last line of that text.
    """
    try:
        yield from loader
    except GradcliError as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        if len(lines) > 1:
            message = lines[-1].split(": ", 1)[-1]
            raise type(err)(message) from None
        raise


def _check_finite(
    values: torch.Tensor, what: str, source: str, row_ids: np.ndarray | None = None
) -> None:
    """A NaN or Inf in a batch is an error naming the dataset rows, never written silently."""
    bad = ~torch.isfinite(values)
    if bad.any():
        rows = torch.nonzero(bad.reshape(values.shape[0], -1).any(dim=1)).flatten().cpu().numpy()
        named = np.asarray(row_ids)[rows] if row_ids is not None else rows
        where = "rows" if row_ids is not None else "batch rows"
        raise BadInputError(
            f"{what} of {source} contain NaN or Inf for {len(rows)} sample(s) ({where} "
            f"{named[:5].tolist()}); check those inputs and the model's weights"
        )


def _check_count(value, what: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadInputError(f"{what} must be a whole number, not {value!r}")
    if value < least:
        raise BadInputError(f"{what} must be at least {least}, not {value}")


def check_extract_options(
    *,
    method: str = "avg",
    k: int | None = None,
    oversample: int = 10,
    iterations: int = 4,
    checkpoint_every: int = 50,
    iteration_dtype: str = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    max_samples: int | None = None,
) -> None:
    """Validate extract-subspace's options on their own, before a model is loaded or any data
    is read (the CLI calls it first; :meth:`Run.extract_subspace` too). What depends on the
    model or the data (K against the classes or the rank, the memory plan) is checked by
    ``Run.extract_subspace``, still before any pass over the data."""
    check_method(method, k, None)
    _check_count(oversample, "--oversample", 0)
    _check_count(iterations, "--iterations", 1)
    _check_count(checkpoint_every, "--checkpoint-every", 1)
    if iteration_dtype not in ("auto", *BASIS_DTYPES):
        raise BadInputError(
            f"--iteration-dtype must be auto, float32 or bfloat16, not '{iteration_dtype}'"
        )
    _check_batch_size(batch_size)
    _check_seed(seed)
    if max_samples is not None:
        _check_count(max_samples, "--max-samples", 1)


def _check_batch_size(batch_size: int | None) -> int | None:
    """None (chosen from the memory budget) or a whole number ≥ 1, checked before anything is
    written (a stage records the batch it was made with)."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise BadInputError(f"--batch-size must be a whole number, not {batch_size!r}")
    if batch_size < 1:
        raise BadInputError(
            f"--batch-size must be at least 1, not {batch_size} (leave it out to choose it "
            "from the memory budget)"
        )
    return int(batch_size)


def _check_seed(seed: int, what: str = "--seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise BadInputError(f"{what} must be a whole number from 0 to 2**32 - 1, not {seed!r}")
    return int(seed)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise BadInputError(f"--alpha must be a finite number, not {alpha!r}")
    return float(alpha)


def _name_list(value: str | Sequence[str], what: str) -> list[str]:
    """Names from a sequence or from one comma-separated string ("knn,msp")."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    try:
        items = list(value)
    except TypeError:
        items = [value]
    if not all(isinstance(item, str) for item in items):
        raise BadInputError(f"{what} takes names (strings), not {items!r}")
    return items


def _options(value, cls: type, what: str):
    """A ``cls`` options dataclass from itself, a dict of its fields, or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise BadInputError(
                f"{what}: unknown option(s) {', '.join(map(str, unknown))}; "
                f"{cls.__name__} has {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**value)
    raise BadInputError(f"{what} must be a {cls.__name__} or a dict of its fields")


def _preferred(source: data_mod.ImageSource | None, names: list[str]) -> str | None:
    """Of the embeddings of one source: its default name when among them, else the only one."""
    if source is not None and source.slug in names:
        return source.slug
    return names[0] if len(names) == 1 else None


def _check_embeddings(embeddings: list[str]) -> list[str]:
    unknown = [e for e in embeddings if e not in SCORE_EMBEDDINGS]
    if unknown or not embeddings:
        raise BadInputError(
            f"unknown embedding(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(SCORE_EMBEDDINGS)}"
        )
    return embeddings


def _check_name(name: str) -> None:
    """An embedding name is one store key: ASCII letters, digits, '.', '-', '_', not hidden,
    not Zarr's own metadata file."""
    valid = re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) is not None
    if not valid or name == "embed" or name in RESERVED_KEYS:
        raise BadInputError(
            f"--name '{name}' is not a valid name; use ASCII letters, digits, '.', '-' or '_'"
        )


def _check_some_method_applies(classes: Mapping[str, type], embeddings: Sequence[str]) -> None:
    """At least one (method, embedding) pair asked for can be scored."""
    for cls in classes.values():
        kinds = set(cls.kinds)
        if kinds & set(embeddings) or ("ensemble" in embeddings and set(EMBEDDINGS) <= kinds):
            return
    scores = "; ".join(f"{m} scores {'/'.join(cls.kinds)}" for m, cls in classes.items())
    raise BadInputError(
        f"no --method asked for applies to --embedding {'/'.join(embeddings)} ({scores}); "
        "choose another --embedding or --method"
    )


def _same_model(old: dict, new: dict) -> bool:
    """Recorded models are the same when they differ at most in the weights file's path while
    its sha256 is the same (a moved or copied file)."""
    if old == new:
        return True
    digest = old.get("weights_sha256")
    if not digest or digest != new.get("weights_sha256"):
        return False
    return {k: v for k, v in old.items() if k != "weights"} == {
        k: v for k, v in new.items() if k != "weights"
    }


def _model_difference(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{key} {_brief(old.get(key))} -> {_brief(new.get(key))}" for key in keys[:3])


def _brief(value) -> str:
    """A value short enough for a one-line message; long ones (paths) keep their end."""
    text = str(value)
    return text if len(text) <= 40 else "…" + text[-39:]


def _test_split_of(spec: str) -> str | None:
    """The ID test set that goes with a training spec, when the dataset has named splits."""
    if spec.startswith(("folder:", "npz:")):
        return None
    name = spec.split(":", 1)[0]
    return f"{name}:test"


class _BackgroundWriter:
    """At most one store write running beside the computation; its errors surface on wait."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, function, *args) -> None:
        self.wait()

        def target() -> None:
            try:
                function(*args)
            except BaseException as error:  # handed to the caller's thread in wait()
                self._error = error

        self._thread = threading.Thread(target=target, name="gradcli-checkpoint", daemon=True)
        self._thread.start()

    def wait(self, raise_errors: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_errors:
            raise error
