"""Benchmarks on random-weight models of real shapes: ``python -m vtc.eval.bench.capture`` (signal capture),
``.selection`` (compressor cost), ``.prefill`` (prefill speedup) and ``.video`` (video capture memory and time)."""
