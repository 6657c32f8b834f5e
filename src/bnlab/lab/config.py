"""Configuration: frozen dataclasses shared by the experiments and ``--set key=value`` overrides.

An experiment's config is a frozen dataclass (usually holding `DataConfig`, `OptimConfig` and
`TrainConfig` fields plus its own); presets are instances, variants are built with
`dataclasses.replace`. Holds no training code.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

__all__ = [
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "at_least",
    "config_hash",
    "flat_keys",
    "fraction",
    "override_key",
    "positive",
    "to_dict",
    "within",
]


# Checks for a config's __post_init__, over named fields that hold a number or a tuple of
# numbers; the error names the field (and `apply_overrides` the --set key). NaN fails them all.
def _each(obj: Any, names: str, ok: Callable[[Any], bool], one: str, many: str) -> None:
    for name in names.split():
        value = getattr(obj, name)
        for v in value if isinstance(value, tuple) else (value,):
            if not ok(v):
                want = many if isinstance(value, tuple) else one
                raise ValueError(f"{name} must be {want}, got {value!r}")


def nonempty(obj: Any, names: str) -> None:
    """Each named tuple field of ``obj`` holds something: every element check passes an empty
    sweep, which would run nothing (``--set rates=()``) or fail inside a run."""
    for name in names.split():
        if getattr(obj, name) == ():
            raise ValueError(f"{name} must be a non-empty tuple, got ()")


def one_of(obj: Any, names: str, valid: Any) -> None:
    """Each element of the named tuple fields of ``obj`` is one of ``valid`` (checked with the
    config, before any run directory exists: a variant name is built from it)."""
    for name in names.split():
        bad = [v for v in getattr(obj, name) if v not in valid]
        if bad:
            raise ValueError(f"{name} must hold names from {sorted(valid)}, got {bad[0]!r}")


def at_least(obj: Any, names: str, low: int) -> None:
    """Each named integer field (or tuple element) of ``obj`` is >= ``low``."""
    _each(obj, names, lambda v: v >= low, f"an integer >= {low}", f"integers >= {low}")


def positive(obj: Any, names: str) -> None:
    """Each named number (or tuple element) of ``obj`` is finite and > 0 (rates, widths)."""
    _each(obj, names, lambda v: 0 < v < math.inf, "a finite number > 0",
          "finite numbers > 0")


def fraction(obj: Any, names: str) -> None:
    """Each named number (or tuple element) of ``obj`` is in [0, 1) (dropout rates)."""
    _each(obj, names, lambda v: 0 <= v < 1, "a number in [0, 1)", "numbers in [0, 1)")


def within(obj: Any, names: str, low: int, high: int) -> None:
    """Each named integer (or tuple element) of ``obj`` is in [low, high] (layer numbers)."""
    _each(obj, names, lambda v: low <= v <= high, f"an integer in [{low}, {high}]",
          f"integers in [{low}, {high}]")


@dataclass(frozen=True)
class DataConfig:
    """Which IDX data set and how its pixels are turned into inputs."""

    dir: str | None = None  # MNIST-format IDX directory; None: Fashion-MNIST (`data.DEFAULT_DIR`)
    binarize: bool = False  # pixels > 0.5 -> 1, else 0 (Ioffe Sec. 4.1: "28x28 binary image")
    normalize: bool = True  # subtract the training-set pixel mean, divide by its std
    shuffle: str = "thorough"  # "thorough": a fresh global permutation every epoch; "shards"
    shards: int = 10  # contiguous shards for shuffle="shards" (within-shard shuffling)
    eval_examples: int = 10_000  # held-out examples used by the periodic evaluation

    def __post_init__(self) -> None:
        at_least(self, "shards eval_examples", 1)
        if self.shuffle not in ("thorough", "shards"):
            raise ValueError(f"shuffle must be 'thorough' or 'shards', got {self.shuffle!r}")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum, L2 weight decay and exponential learning-rate decay."""

    lr: float = 0.1  # initial learning rate
    momentum: float = 0.9  # heavy-ball momentum
    weight_decay: float = 0.0  # L2 coefficient (added to the gradient, as torch SGD does)
    decay_rate: float = 1.0  # lr(t) = lr · decay_rate ** (t / decay_steps); 1.0: constant
    decay_steps: int = 1_000  # steps per factor of decay_rate (continuous, not staircase)

    def __post_init__(self) -> None:
        at_least(self, "decay_steps", 1)
        positive(self, "lr decay_rate")
        fraction(self, "momentum")
        _each(self, "weight_decay", lambda v: 0 <= v < math.inf, "a finite number >= 0", "")


@dataclass(frozen=True)
class TrainConfig:
    """Length of training and how often it is measured and checkpointed."""

    steps: int = 1_000  # optimizer steps
    batch_size: int = 60  # examples per mini-batch
    eval_every: int = 100  # held-out evaluation (and probes) every this many steps
    checkpoint_every: int = 1_000  # also checkpoint at every eval step that is a multiple
    eval_batch_size: int = 1_000  # examples per forward during evaluation

    def __post_init__(self) -> None:
        at_least(self, "steps batch_size eval_every checkpoint_every eval_batch_size", 1)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a (nested) dataclass config; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config (names the run directory of non-preset configs)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


def flat_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a nested dataclass config, with its current value."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(flat_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def check_name_digits(cfg: Any) -> None:
    """Refuse a float in a tuple field (a sweep: learning rates, dropout rates, init scales)
    that run names cannot tell apart: variants are named with 6 significant digits
    (``nobn_lr0.3``) and some experiments read the value back from the name, so 0.30000004
    would train at 0.3 under a config that says otherwise."""
    for key, value in flat_keys(cfg).items():
        for v in value if isinstance(value, tuple) else ():
            if isinstance(v, float) and math.isfinite(v) and float(f"{v:g}") != v:
                raise ValueError(f"--set {key}: {v!r} has more significant digits than run "
                                 f"names keep ({v:g}); give at most 6")


def override_key(item: str) -> str:
    """The key of a ``--set key=value`` item, as `apply_overrides` reads it."""
    return item.partition("=")[0].strip()


def _parse(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    # a bare word is a string: --set model.norm=bn (and so is "{[]}", which literal_eval fails
    # on with TypeError: the type check names the key and what it expects)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the default; ints widen to floats, lists to tuples.
    (Neither is None: `apply_overrides` checks None against the field's annotation.)"""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"--set {key}: expected {type(default).__name__} like {default!r}, "
                         f"got {type(value).__name__} {value!r}")
    return value


def _hint(cfg: Any, path: list[str]) -> Any:
    """The annotation of the field at ``path``."""
    owner = cfg
    for part in path[:-1]:
        owner = getattr(owner, part)
    return typing.get_type_hints(type(owner)).get(path[-1])


def _check_optional(key: str, value: Any, default: Any, hint: Any) -> Any:
    """``value`` where it or the field's default is None (`apply_overrides` sends the rest to
    `_coerce`): None where the annotation allows it (``str | None``), else a value of one of the
    annotation's other types."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) not in args:
            raise ValueError(f"--set {key}: expected {type(default).__name__} like {default!r}, "
                             "got None")
        return value
    kinds = tuple(t for t in args if isinstance(t, type) and t is not type(None))
    if kinds and not isinstance(value, kinds):
        raise ValueError(f"--set {key}: expected {' or '.join(t.__name__ for t in kinds)} or "
                         f"None, got {type(value).__name__} {value!r}")
    return value


def _element_type(cfg: Any, path: list[str]) -> type | None:
    """The element type of the tuple field at ``path`` (``tuple[float, ...]`` -> float)."""
    hint = _hint(cfg, path)
    args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    return args[0] if len(args) == 2 and args[1] is Ellipsis else None


def _coerce_elements(key: str, value: tuple[Any, ...], kind: type | None) -> tuple[Any, ...]:
    """A tuple's elements checked against its annotation; ints widen to floats."""
    if kind is None:
        return value
    out = []
    for v in value:
        ok = isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise ValueError(f"--set {key}: expected a tuple of {kind.__name__}, got "
                             f"{type(v).__name__} {v!r} in {value!r}")
        out.append(v)
    return tuple(out)


def _replace(cfg: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(cfg, **{path[0]: value})
    inner = _replace(getattr(cfg, path[0]), path[1:], value)
    return dataclasses.replace(cfg, **{path[0]: inner})


def apply_overrides(cfg: Any, sets: list[str]) -> Any:
    """Apply ``["optim.lr=0.1", "model.norm=none", ...]`` to a frozen dataclass config.

    Values are parsed with `ast.literal_eval` (bare words are strings) and must match the type
    of the value they replace.

    Raises:
        ValueError: a malformed item, an unknown key (the message lists the valid keys), a
            value of the wrong type, or one its config refuses (``train.steps=0``).
    """
    valid = flat_keys(cfg)
    for item in sets:
        _, sep, text = item.partition("=")
        key = override_key(item)
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in valid:
            raise ValueError(f"--set: unknown key {key!r}; valid keys: {', '.join(sorted(valid))}")
        value, default = _parse(text.strip()), valid[key]
        if value is None or default is None:
            value = _check_optional(key, value, default, _hint(cfg, key.split(".")))
        else:
            value = _coerce(key, value, default)
        if isinstance(value, tuple):
            value = _coerce_elements(key, value, _element_type(cfg, key.split(".")))
        try:
            cfg = _replace(cfg, key.split("."), value)
        except ValueError as e:  # a dataclass's own check (e.g. steps >= 1): name the key
            raise ValueError(f"--set {key}: {e}") from None
        valid[key] = value
    return cfg
