"""Host integrations of the vtc core: one sub-package per host library (``transformers`` now; vLLM/SGLang later)."""
