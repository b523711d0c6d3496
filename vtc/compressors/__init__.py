"""Built-in compressors; importing this package registers them (one file per method family)."""

from . import baselines, cls_attention, divprune, hiprune, quota, visionzip  # noqa: F401  (registration side effect)
from . import llm_side, progressive  # noqa: F401  (registration side effect)
