"""The sweeper's search space: Hydra sweep overrides -> Optuna distributions, and sampled values
back to override strings.

The syntax is Hydra's own override grammar (parsed by Hydra's ``OverridesParser``):

==========================================  ===================================================
``key=choice(a, b, c)`` or ``key=a,b,c``     ``CategoricalDistribution([a, b, c])``
``key=range(start, stop[, step])``           ``IntDistribution`` (ints) / ``FloatDistribution``
                                             (floats) with that step; ``stop`` is excluded, as
                                             in Python's ``range``
``key=interval(low, high)``                  ``FloatDistribution(low, high)``
``key=tag(log, interval(low, high))``        the same, sampled on a log scale
``key=tag(int, interval(low, high))``        ``IntDistribution(low, high)`` (both ends included)
``key=value`` (no sweep)                     a fixed override passed to every trial
==========================================  ===================================================

``tag(log, range(...))`` samples an integer range on a log scale (Optuna allows it for step 1 only).
Keys keep their prefix (``+key=``, ``++key=``), so new keys can be searched too.

Optuna is imported inside the functions that need it: Hydra imports every module of every plugin
when any Hydra app starts, and the apps that do not sweep should not pay for it.
"""

# no `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where dataclasses cannot read string annotations
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

__all__ = ["SearchSpace", "SearchSpaceError", "distribution_of", "format_value", "parse_search_space"]

#: the tags a sweep may carry
KNOWN_TAGS = frozenset({"log", "int"})

#: strings that need no quotes in an override value (and do not read as another type)
_BARE = re.compile(r"[A-Za-z_/][\w./-]*")
_RESERVED = frozenset({"null", "true", "false", "nan", "inf"})


class SearchSpaceError(ValueError):
    """A search-space entry the sweeper cannot map to an Optuna distribution; names the key."""


@dataclass
class SearchSpace:
    """What the sweeper searches, and what it passes unchanged.

    Attributes:
        distributions: override key (with its ``+`` / ``++`` prefix, if any) -> Optuna distribution.
        fixed: overrides (``key=value`` strings) given to every trial as they are.
    """

    distributions: dict[str, Any] = field(default_factory=dict)  # values: optuna BaseDistribution
    fixed: list[str] = field(default_factory=list)


def _range_values(sweep: RangeSweep) -> list[int | float]:
    """Hydra's ``range(start, stop, step)`` values (stop excluded); the sweep must be non-empty."""
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if step is None or step == 0:
        raise SearchSpaceError("range step must not be 0")
    n = math.ceil((stop - start) / step)
    if n <= 0:
        raise SearchSpaceError(f"range({start}, {stop}, {step}) is empty")
    return [start + i * step for i in range(n)]


def distribution_of(key: str, override: Override) -> "BaseDistribution":
    """The Optuna distribution of one sweep override (see the module docstring).

    Raises:
        SearchSpaceError: an unknown tag, an empty range, a reversed interval, a choice of
            lists / dicts, or a sweep type the sweeper does not know.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    tags = set(getattr(sweep, "tags", set()) or set())
    unknown = tags - KNOWN_TAGS
    if unknown:
        raise SearchSpaceError(f"{key}: unknown tag(s) {sorted(unknown)}; the sweeper knows {sorted(KNOWN_TAGS)}")
    log = "log" in tags
    try:
        if isinstance(sweep, ChoiceSweep):
            if tags:
                raise SearchSpaceError(f"tags {sorted(tags)} do not apply to choice(...)")
            bad = [v for v in sweep.list if v is not None and not isinstance(v, bool | int | float | str)]
            if bad:
                raise SearchSpaceError(f"choice values must be numbers, strings, booleans or null, not {bad}")
            if len(set(map(repr, sweep.list))) != len(sweep.list):
                raise SearchSpaceError(f"choice values repeat: {sweep.list}")
            return CategoricalDistribution(list(sweep.list))
        if isinstance(sweep, RangeSweep):
            if "int" in tags:
                raise SearchSpaceError("tag int applies to interval(...); a range of ints is already an int range")
            if sweep.step is not None and sweep.step < 0:
                raise SearchSpaceError("range with a negative step: write it increasing")
            values = _range_values(sweep)
            if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
                return IntDistribution(int(values[0]), int(values[-1]), log=log, step=int(sweep.step))
            return FloatDistribution(float(values[0]), float(values[-1]), log=log, step=sweep.step)
        if isinstance(sweep, IntervalSweep):
            low, high = sweep.start, sweep.end
            if not low < high:
                raise SearchSpaceError(f"interval({low}, {high}): low must be below high")
            if "int" in tags:
                if low != int(low) or high != int(high):
                    raise SearchSpaceError(f"tag(int, interval({low}, {high})) needs whole-number ends")
                return IntDistribution(int(low), int(high), log=log)
            return FloatDistribution(float(low), float(high), log=log)
    except SearchSpaceError as e:
        raise SearchSpaceError(f"search space {key}: {e}") from None
    except ValueError as e:  # Optuna's own checks (e.g. log scale with a step, low <= 0 on a log scale)
        raise SearchSpaceError(f"search space {override.input_line or key}: {e}") from e
    raise SearchSpaceError(
        f"search space {key}: {type(sweep).__name__} is not supported; use choice(...), range(...) or interval(...)"
    )


def parse_search_space(
    params: Mapping[str, Any] | None, arguments: Sequence[str], parser: "OverridesParser | None" = None
) -> SearchSpace:
    """Search space of the sweeper's ``params`` (key -> sweep string) and the command line's overrides.

    A command-line override of a key in ``params`` replaces it (a fixed value pins the key, a sweep
    replaces its range). Order: ``params`` first, then the command line.

    Raises:
        SearchSpaceError: an entry that cannot be mapped (see :func:`distribution_of`).
    """
    parser = parser or OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    by_key: dict[str, Override] = {}
    for override in parser.parse_overrides(lines):
        bare = override.get_key_element().lstrip("+~")
        for old in [k for k in by_key if k.lstrip("+~") == bare]:
            del by_key[old]
        by_key[override.get_key_element()] = override
    space = SearchSpace()
    for key, override in by_key.items():
        if override.is_sweep_override():
            space.distributions[key] = distribution_of(key, override)
        else:
            space.fixed.append(override.input_line if override.input_line else f"{key}={override.value()}")
    return space


def format_value(value: Any) -> str:
    """An override value string that Hydra parses back to ``value`` (None, bool, int, float or str)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _BARE.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise SearchSpaceError(f"cannot write {value!r} ({type(value).__name__}) as an override value")


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """``key=value`` override strings of one trial's sampled parameters."""
    return [f"{k}={format_value(v)}" for k, v in params.items()]
