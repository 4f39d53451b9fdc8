"""Benchmarks for psiopt: a small model zoo and the ``psiopt bench`` suites.

* :mod:`psiopt.bench.models` -- batch-normalized MLPs, CNNs, ResNets and VGG, a post-norm
  ViT and a QK-norm Transformer language model.
* :mod:`psiopt.bench.data` -- datasets that ship with the dependencies or with Python
  (no download), each with training, validation and test parts.
* :mod:`psiopt.bench.methods` -- the registry of optimizers / training systems compared.
* :mod:`psiopt.bench.rayleigh` -- full-batch Rayleigh-quotient problems with known optimum.
* :mod:`psiopt.bench.suites` -- what each suite runs.
* :mod:`psiopt.bench.runner` -- runs a suite, records ``results.json``; its parts live in
  :mod:`psiopt.bench.training` (minibatch runs, tuning on the validation part, sweeps;
  the measurement protocol), :mod:`psiopt.bench.verdicts` (the targets, per task) and
  :mod:`psiopt.bench.steptime` (step time and memory, the scaling curve, discovery time).
* :mod:`psiopt.bench.records` -- the typed results records and their JSON form.
* :mod:`psiopt.bench.report`, :mod:`psiopt.bench.plots` -- Markdown report, table, PNGs.

Run ``psiopt bench --list`` to see the suites.
"""
