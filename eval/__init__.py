"""Evaluation of vtc, one subpackage per concern (nothing is imported here: the lmms-eval entry point stays light).

- ``vtc.eval.bench``: benchmarks on random-weight models of real shapes (``python -m vtc.eval.bench.<name>``).
- ``vtc.eval.lmms``: the lmms-eval plugin (model id ``vtc``), its offline tasks and the ``vtc eval`` sweep.
- ``vtc.eval.default_model``: the embedded default model's synthetic data, training and accuracy.
- ``vtc.eval.measure``: time to first token and peak memory of one request (the plugin, the sweep and the demo).
- ``vtc.eval.support_matrix``: the README's family x compressor support matrix, generated from the test results.
"""
