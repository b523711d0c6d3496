"""lmms-eval entry point (group ``lmms_eval.models``): registers the model id ``vtc``.

Kept import-light on purpose: lmms-eval imports every entry point when it starts, and one that fails to import
only logs a warning and leaves the model "not found". The class (``vtc.eval.lmms.model.VtcModel``) is imported only
when ``--model vtc`` is used.
"""

MODEL_ID = "vtc"
CLASS_PATH = "vtc.eval.lmms.model.VtcModel"


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
