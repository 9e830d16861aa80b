"""The pipeline's stages, one module each, run by :class:`gradcli.run.Run`.

Every stage takes the run (:class:`~gradcli.stages.context.RunContext`: store, model, data,
device, memory budget, process group) as its first argument, owns its store group (paths in
:mod:`gradcli.layout`), writes a provenance record with it, and resumes from what it finds:

- ``stats``: the statistics pass (mean, variance and AG class means of the energy gradients),
  checkpointed in ``stats/state``.
- ``subspace``: ``extract_subspace`` (statistics, then the AG or PCA basis).
- ``pca_plan``, ``pca``, ``pca_blocked``: PCA's memory plan, its in-memory subspace
  iteration, and the row-block form for a block beyond the budget.
- ``embed``: reduced gradients, features, logits and labels of a dataset, in row chunks.
- ``embeddings``: finding stored embeddings by name or dataset spec, embedding on demand.
- ``fit``: the BN→FC head and the detectors fitted on the training embeddings.
- ``score``, ``records``, ``calibrate``: scores, what they record, thresholds and flags.
- ``evaluate``, ``sweep``: metrics against OOD sets, and detector-option sweeps.
- ``passes`` (one data pass for all), ``runner`` (open, invalidate, complete), ``checks``
  (option validation shared with the CLI).
"""
