"""dds.pipeline: the offline stages, one module each.

* :mod:`dds.pipeline.shard` (``run_shard``): sources -> WebDataset tars + samples/shards/rejects tables, with
  the subset, val split and label noise of :mod:`dds.pipeline.surgery`;
* :mod:`dds.pipeline.embed` (``run_embed``) with the encoder registry :mod:`dds.pipeline.encoders`;
* :mod:`dds.pipeline.index` (``run_index``, ``index_arrays``) with :mod:`dds.pipeline.knn` and
  :mod:`dds.pipeline.adapters`; :mod:`dds.bench.index` times it on synthetic data.

Submodules are imported on use, so importing this package stays cheap (no torch).
"""
