"""The lmms-eval plugin: the entry point (``entry``, import-light), the model (``model.VtcModel``), offline tasks on
the synthetic test split (``tasks``) and the ``vtc eval`` sweep (``sweep``)."""
