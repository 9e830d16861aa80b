"""What every stage works with: the store, the model, the data, the device and budget."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from gradcli import data as data_mod
from gradcli import layout
from gradcli.budget import (
    BASIS_SHARE,
    auto_batch_size,
    free_for_batches,
    plan_row_ranges,
    resolve_budget,
    tile_bytes_for,
)
from gradcli.distributed import ProcessGroup, parse_device
from gradcli.errors import BadInputError, GradcliError, StaleStoreError
from gradcli.grads import (
    LayerGradients,
    ParameterSelection,
    native_bfloat16,
    select_parameters,
)
from gradcli.models import LoadedModel, load_model, sha256_file
from gradcli.progress import NullProgress, Progress
from gradcli.stages.checks import BASIS_DTYPES, model_difference, same_model, unwrap_worker_errors
from gradcli.store import RunStore


class RunContext:
    """The store, model, data and process group that every stage works with."""

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
        same = existing is not None and same_model(existing, record)
        if existing is not None and not same and not overwrite:
            what = model_difference(existing, record)
            raise StaleStoreError(
                f"store {self.store.url} was made with another model ({what}); "
                "pass --overwrite to start the run over, or use a new --store"
            )

        def record_model() -> None:
            if existing is not None and not same:
                for path in (layout.STATS, *layout.downstream(layout.STATS)):
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
                what = model_difference(
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
        warning = data_mod.count_warning(source)  # a copy unlike the release: say so, once
        warned = self.__dict__.setdefault("_count_warnings", set())
        if warning and warning not in warned:
            warned.add(warning)
            self.progress.note(warning)
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
        return unwrap_worker_errors(loader) if workers else loader

    def _tile_bytes(self) -> int:
        """Per-sample gradient tile: large enough for fast products, a small share of the
        budget (the engine and the projection each hold one)."""
        return tile_bytes_for(self.memory_budget)

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
        return free_for_batches(self.memory_budget, fixed_bytes, model_bytes, self._tile_bytes())

    def _batch_size(self, engine: LayerGradients, source, indices, fixed_bytes: int) -> int:
        """Batch size from the memory budget, measured on one sample."""
        free = self._free_for_batches(engine, source, indices, fixed_bytes)
        return auto_batch_size(engine.sample_bytes(), free)

    def _row_blocks(
        self, selection: ParameterSelection, k: int
    ) -> list[tuple[int, int, list[str]]]:
        """Row blocks whose basis rows fit the budget: [(first_row, end_row, names)], whole
        parameters unless one alone is larger than a block (then it is cut across blocks)."""
        bytes_per_row = k * BASIS_DTYPES[self.basis_dtype].itemsize + 8  # + mean, 1/scale
        budget = int(self.memory_budget * BASIS_SHARE)
        ranges = plan_row_ranges(selection.sizes, bytes_per_row, budget, what="basis rows")
        ends = np.cumsum(selection.sizes).tolist()
        spans = list(zip(selection.names, ends, selection.sizes, strict=True))
        return [(a, b, [n for n, e, z in spans if e - z < b and e > a]) for a, b in ranges]
