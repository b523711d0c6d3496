"""Tiny offline checkpoints of every registered model family, for tests and benchmarks (imports transformers).

``vtc.testing`` is ``vtc.integrations.transformers.testing`` under a short name: ``build_tiny(family)``,
``save_tiny`` / ``load_tiny``, ``build_prompt``, ``random_image``, ``build_tokenizer``, and the family lists read
from the registry (``FAMILIES``, ``VIDEO_FAMILIES``, ...). The core ``vtc`` package never imports it.
"""

from __future__ import annotations

from .integrations.transformers.testing import *  # noqa: F401,F403
from .integrations.transformers.testing import __all__  # noqa: F401
