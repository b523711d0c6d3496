"""One file per model family: its adapter (``register_adapter``) and its tiny test checkpoint (``register_tiny``).

Importing this package registers the built-in families, in this order (``supported_families()``); it is the only
place that lists them.
"""

from . import (  # noqa: F401  (registration side effect, in this order)
    llava,
    llava_next,
    llava_onevision,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
)
