"""ToMe's per-block merge counts (``parse_r`` in the ToMe code), shared by the methods that take them
(``tome``, ``atc``) and by ``tokenreduce calibrate``.

``r`` is an int (the same in every block), a per-block list, or ``(r, inflection)``: linear from
``lo = int(r * (1 - inflection))`` to ``hi = 2r - lo``, block ``i`` getting ``int(lo + i * (hi - lo) / (depth - 1))``
(``inflection`` -1 is the papers' "decreasing" schedule, 0 constant, +1 increasing). ``keep_ratio`` is the
resolution- and depth-independent form: ``r = floor(M * (1 - keep_ratio) / depth)`` for ``M`` mergeable input
tokens, so that at least ``keep_ratio`` of them remain after the last block.
"""

from __future__ import annotations

from tokenreduce.validate import as_int, as_real, as_sequence

RSpec = int | list[int] | tuple[int, float]


def check_r(r: object, keep_ratio: object, default_keep_ratio: float | None) -> tuple[RSpec | None, float | None]:
    """Validate an ``r`` / ``keep_ratio`` pair (at most one given; with neither, ``keep_ratio`` is
    ``default_keep_ratio``): ``r`` as an int >= 0, a list of them or ``(r >= 0, inflection in [-1, 1])``."""
    if r is not None and keep_ratio is not None:
        raise ValueError(f"pass r or keep_ratio, not both (got r={r!r}, keep_ratio={keep_ratio!r})")
    if r is None:
        ratio = default_keep_ratio if keep_ratio is None else keep_ratio
        if ratio is None:
            raise ValueError("pass r or keep_ratio")
        return None, as_real("keep_ratio", ratio, 0, 1, low_open=True)
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r >= 0, inflection in [-1, 1]), got {r!r}")
        return (as_int("r[0]", r[0], 0), as_real("r[1] (inflection)", r[1], -1, 1)), None
    if isinstance(r, (list, range)) or getattr(r, "ndim", 0) == 1:
        return [as_int(f"r[{i}]", v, 0) for i, v in enumerate(as_sequence("r", r, "integers >= 0"))], None
    return as_int("r", r, 0), None


def per_layer_r(r: RSpec | None, keep_ratio: float | None, mergeable: int, depth: int, inflection: float = 0.0) -> list[int]:
    """Tokens to merge in each of ``depth`` blocks for ``mergeable`` non-prefix input tokens. ``inflection``
    shapes an int ``r`` and the ``r`` that ``keep_ratio`` gives (a tuple ``r`` carries its own)."""
    if keep_ratio is not None:
        r = int(mergeable * (1 - keep_ratio) / depth)
    if isinstance(r, list):
        if len(r) != depth:
            raise ValueError(f"r as a list must have one entry per block ({depth}), got {len(r)}")
        return list(r)
    r, inflection = r if isinstance(r, tuple) else (r, inflection)
    if depth == 1:
        return [r]
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]
