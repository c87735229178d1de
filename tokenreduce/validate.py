"""Argument checks shared by methods, the API and the benchmark.

Each returns the value as a plain Python object, so numpy scalars, 0-d tensors and 1-d arrays are
accepted wherever an int, a real or a sequence is, and each error names the argument and its range.
Wrong types raise ``TypeError``, values out of range ``ValueError``.
"""

from __future__ import annotations

import json
import math
import numbers
import os


def _unwrap_scalar(value: object) -> object:
    """``value`` as a Python scalar when it is a 0-d tensor or array, else unchanged."""
    if hasattr(value, "ndim") and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _is_bool(value: object) -> bool:
    # numpy's bool is neither a bool subclass nor a numbers.Integral
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``in [0, 1]``, ``in (0, 1]``, ``>= 0``, ``> 0`` or ``<= 1``: the range as an error message says it."""
    if high is None:
        return "" if low is None else f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def as_bool(name: str, value: object) -> bool:
    """``True`` or ``False`` (numpy bools and 0-d bool tensors included); anything else is a ``TypeError``."""
    value = _unwrap_scalar(value)
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def as_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """An integer in ``[low, high]``; numpy integers and 0-d integer tensors are accepted."""
    value = _unwrap_scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer {_interval(low, high, False, False)}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {_interval(low, high, False, False)}, got {value}")
    return value


def as_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval given by ``low``/``high`` (open ends by flag)."""
    value = _unwrap_scalar(value)
    interval = _interval(low, high, low_open, high_open)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {interval}, got {value!r} ({type(value).__name__})")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        raise ValueError(f"{name} must be a number {interval}, got {value!r}")
    return value


def as_sequence(name: str, value: object, what: str) -> list:
    """The items of a list, tuple, range or 1-d array/tensor; ``what`` describes one item for errors."""
    if hasattr(value, "ndim") and hasattr(value, "tolist"):
        if value.ndim != 1:
            raise TypeError(f"{name} must be a 1-d sequence of {what}, got an array of shape {tuple(value.shape)}")
        return value.tolist()
    if isinstance(value, (list, tuple, range)):
        return list(value)
    hint = f"; for a single one pass ({value!r},)" if isinstance(value, numbers.Number) else ""
    raise TypeError(f"{name} must be a sequence of {what}, got {value!r} ({type(value).__name__}){hint}")


def as_int_tuple(name: str, value: object, low: int | None = None, high: int | None = None) -> tuple[int, ...]:
    """A tuple of integers in ``[low, high]``, from any sequence :func:`as_sequence` accepts."""
    what = f"integers {_interval(low, high, False, False)}"
    items = as_sequence(name, value, what)
    return tuple(as_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(items))


def as_cell_ratio(name: str, value: object, sx: int, sy: int, clip: bool, verb: str) -> float:
    """A share of tokens in ``[0, 1)`` that one kept destination per ``sy x sx`` cell allows: at most
    ``1 - 1 / (sx * sy)`` unless ``clip`` (then the count saturates at the cells' sources). ``verb`` says
    what happens to the tokens ("merge", "prune") in the error."""
    value = as_real(name, value, 0, 1, high_open=True)
    cap = 1 - 1 / (sx * sy)
    if value > cap and not clip:
        raise ValueError(
            f"{name} must be in [0, {cap:g}] with sx={sx}, sy={sy} (one destination per cell caps the {verb}d share "
            f"at 1 - 1/(sx*sy)), got {value}; pass clip=True to {verb} as many as the cells allow"
        )
    return value


def read_json_file(path: str | os.PathLike, what: str) -> object:
    """The JSON content of the file at ``path``; a ``ValueError`` naming ``what`` (e.g. "schedule file")
    and the path when it cannot be read or is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not JSON ({err})") from None
