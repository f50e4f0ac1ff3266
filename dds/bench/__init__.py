"""dds.bench: every ``dds bench*`` command and what it measures, in one place.

* :mod:`dds.bench.training`: ``dds bench`` (policies x budgets x seeds, one process), ``bench-table``
  (markdown tables from committed result rows) and ``bench-train`` (trainer img/s against the bare step);
* :mod:`dds.bench.embed`: ``bench-embed``; :mod:`dds.bench.index`: ``bench-index``;
  :mod:`dds.bench.plan`: ``bench-plan``; :mod:`dds.bench.dist`: ``bench-dist`` (under torchrun);
* :mod:`dds.bench.cli`: the commands, added to the ``dds`` app by :func:`dds.bench.cli.register`.

Importing this package imports nothing heavy; the modules above import torch where they need it.
"""
