"""The embedded default model's synthetic data (``synthetic``), its training (``python -m
vtc.eval.default_model.train``) and its accuracy with and without compression (``accuracy``, ``fidelity``)."""
