"""The one budget vocabulary of vtc, validated in one place.

A budget says how many visual tokens survive for one image (all of its views) or one video (all of its frames):

* ``int`` >= 1   -- that many tokens (clamped to what the image has: a budget >= N keeps everything);
* ``float`` in (0, 1] -- that fraction of the image's tokens, rounded half-to-even (Python ``round``, as the
  reference code of HiPrune does), never below one token. ``1.0`` keeps everything.

``1`` and ``1.0`` therefore mean different things (one token vs all tokens); that is why booleans, strings and
other look-alikes are rejected instead of coerced.
"""

from __future__ import annotations

import math
import numbers
from typing import Union

Budget = Union[int, float]

_FORMS = "an int >= 1 (tokens kept per image) or a float in (0, 1] (fraction of the image's tokens kept)"


def validate_budget(budget: object) -> Budget:
    """Return ``budget`` as a plain ``int`` or ``float`` or raise naming the allowed forms."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        hint = " (strings from a command line go through vtc.parse_budget)" if isinstance(budget, str) else ""
        raise TypeError(f"budget must be {_FORMS}; got {budget!r} of type {type(budget).__name__}{hint}")
    if isinstance(budget, numbers.Integral):
        value = int(budget)
        if value < 1:
            raise ValueError(f"budget must be {_FORMS}; got {value}. Use 1 or more tokens.")
        return value
    value = float(budget)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"budget must be {_FORMS}; got {value}")
    if not 0.0 < value <= 1.0:
        fix = " For a token count pass an int, e.g. 64." if value > 1.0 else ""
        raise ValueError(f"budget must be {_FORMS}; got ratio {value}, outside (0, 1].{fix}")
    return value


def resolve_budget(budget: object, num_tokens: int) -> int:
    """Number of tokens to keep out of ``num_tokens`` (always in ``[min(1, N), N]``)."""
    budget = validate_budget(budget)
    if num_tokens <= 0:
        return 0
    if isinstance(budget, int):
        return min(budget, num_tokens)
    return min(num_tokens, max(1, round(budget * num_tokens)))


def parse_budget(text: str | Budget) -> Budget:
    """Parse a budget written as text (CLI flags, lmms-eval ``--model_args``): ``"64"`` -> 64, ``"0.25"`` -> 0.25.

    A value written with a decimal point or exponent is a ratio; ``"25%"`` is accepted as 0.25.
    """
    if not isinstance(text, str):
        return validate_budget(text)
    raw = text.strip()
    try:
        if raw.endswith("%"):
            value: Budget = float(raw[:-1]) / 100.0
        elif raw.lstrip("+-").isdigit():
            value = int(raw)
        else:
            value = float(raw)
    except ValueError:
        raise ValueError(f"cannot parse budget {text!r}: write {_FORMS}, e.g. '64' or '0.25'") from None
    return validate_budget(value)


def describe_budget(budget: Budget, num_tokens: int, unit: str = "image") -> str:
    """The budget as a person reads it, for an item of ``num_tokens`` visual tokens: ``"25 % of 196 = 49 tokens per
    image"`` for a fraction, ``"64 tokens per image"`` for a count -- saying so when the item has fewer tokens than
    that (``"(the image has 36: all kept)"``), since the budget is then capped."""
    budget = validate_budget(budget)
    if isinstance(budget, int):
        capped = f" (the {unit} has {num_tokens}: all kept)" if budget > num_tokens else ""
        return f"{budget} tokens per {unit}{capped}"
    return f"{round(budget * 100, 1):g} % of {num_tokens} = {resolve_budget(budget, num_tokens)} tokens per {unit}"

