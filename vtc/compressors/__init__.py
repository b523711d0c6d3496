"""Built-in compressors; importing this package registers them (one file per method family)."""

from . import baselines, cdpruner, cls_attention, divprune, hiprune, prumerge_plus, quota, vispruner  # noqa: F401
from . import visionzip  # noqa: F401  (registration side effect)
from . import llm_side, progressive  # noqa: F401  (registration side effect)
from . import downsample  # noqa: F401  (registration side effect)
from . import trim  # noqa: F401  (registration side effect)
from . import dycoke  # noqa: F401  (registration side effect)
from . import vidcom2  # noqa: F401  (registration side effect)
from . import evs  # noqa: F401  (registration side effect)
from . import fastvid  # noqa: F401  (registration side effect)
from . import holov  # noqa: F401  (registration side effect)
