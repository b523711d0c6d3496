"""Built-in compressors; importing this package registers them (one file per method family)."""

from . import baselines, cls_attention, divprune, hiprune, visionzip  # noqa: F401  (registration side effect)
