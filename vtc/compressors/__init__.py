"""Built-in compressors; importing this package registers them (one file per method family)."""

from . import baselines, cdpruner, cls_attention, divprune, hiprune, prumerge_plus, quota, vispruner  # noqa: F401
from . import visionzip  # noqa: F401  (registration side effect)
from . import llm_side, progressive  # noqa: F401  (registration side effect)
from . import downsample, holov, trim  # noqa: F401  (registration side effect)
from . import dycoke, evs, fastvid, vidcom2  # noqa: F401  (video methods; registration side effect)
