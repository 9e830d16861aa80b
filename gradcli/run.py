"""The Python face of gradcli: one run store and the pipeline over it.

:class:`Run` holds what every stage works with (:class:`~gradcli.stages.context.RunContext`:
the store, the model, datasets, device, memory budget, process group) and nothing else: each
public method *is* the function of one stage module in :mod:`gradcli.stages`, bound to the run
(``Run.embed is gradcli.stages.embed.embed``), so its signature, defaults and docstring are
written once, beside the code that does the work.
"""

from __future__ import annotations

from gradcli.stages import calibrate as calibrate_stage
from gradcli.stages import embed as embed_stage
from gradcli.stages import embeddings as embeddings_stage
from gradcli.stages import evaluate as evaluate_stage
from gradcli.stages import fit as fit_stage
from gradcli.stages import records
from gradcli.stages import score as score_stage
from gradcli.stages import subspace as subspace_stage
from gradcli.stages.checks import check_extract_options
from gradcli.stages.context import RunContext


class Run(RunContext):
    """One run store and the pipeline over it.

    >>> run = Run("artifacts/demo")                                    # doctest: +SKIP
    >>> run.set_model("mnist_cnn", "weights.pt")                       # doctest: +SKIP
    >>> run.extract_subspace("mnist5k:train")                          # doctest: +SKIP
    >>> results = run.evaluate(["fashion", "digits"])                  # doctest: +SKIP
    """

    extract_subspace = subspace_stage.extract_subspace
    embed = embed_stage.embed
    embedding_names = embeddings_stage.embedding_names
    stored_name = embeddings_stage.stored_name
    load_embedding = embeddings_stage.load_embedding
    embedding_for = embeddings_stage.embedding_for
    fit_head = fit_stage.fit_head
    load_head = fit_stage.load_head
    readout = fit_stage.readout
    as_embedding = staticmethod(fit_stage.as_embedding)
    fitted_detector = fit_stage.fitted_detector
    score = score_stage.score
    item_ids = score_stage.item_ids
    calibration = records.calibration
    calibrate = calibrate_stage.calibrate
    flags = calibrate_stage.flags
    evaluate = evaluate_stage.evaluate


__all__ = ["Run", "check_extract_options"]
