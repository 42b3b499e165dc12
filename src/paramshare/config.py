"""params.yaml -> frozen dataclasses. Every check and its error message lives here.

Validation is strict in the nanoGPT sense: an unknown key, a wrong type or a value out of
range is refused up front with one line naming the key and what is allowed, before any data
is read or any model trained.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

MNIST_TRAIN_SIZE = 60_000
NUM_CLASSES = 10
FAMILIES = ("conv", "recurrent", "attention", "soft", "mlp")


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key."""


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _choice(*allowed):
    def check(v):
        return None if v in allowed else f"must be one of {', '.join(map(str, allowed))}"
    return check


def knob(default, check=None, doc=""):
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class DataConfig:
    val_size: int = knob(5000, _positive, "validation images carved (stratified) from MNIST train")
    train_size: int = knob(55000, _positive, "labelled training images (stratified subset of the rest)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = knob(6, _positive)
    batch_size: int = knob(64, _positive)
    lr: float = knob(1e-3, _positive)
    lr_schedule: str = knob("cosine", _choice("cosine", "constant"))
    threads: int = knob(0, _non_negative, "torch intra-op threads; 0 = one per core")
    resume: bool = knob(True, None, "continue an interrupted training from its last completed epoch")
    device: str = knob("auto", _choice("auto", "cpu", "cuda", "mps"), "auto: CUDA, else MPS, else CPU")
    distributed: int = knob(0, _non_negative, "processes the train stage runs under torchrun (DDP); 0 = none")


@dataclass(frozen=True)
class ConvConfig:
    channels: int = knob(32, _positive)
    hidden: int = knob(128, _positive)


@dataclass(frozen=True)
class RecurrentConfig:
    hidden: int = knob(128, _positive)


@dataclass(frozen=True)
class AttentionConfig:
    patch: int = knob(4, _choice(1, 2, 4, 7, 14, 28))
    width: int = knob(64, _positive)
    heads: int = knob(4, _positive)
    depth: int = knob(4, _positive)
    mlp_ratio: int = knob(2, _positive)


@dataclass(frozen=True)
class SoftConfig:
    hidden: int = knob(256, _positive)
    strength: float = knob(1e-3, _positive, "lambda of the L2 tie; the untied twin uses 0")


@dataclass(frozen=True)
class MlpConfig:
    hidden: int = knob(256, _positive)


@dataclass(frozen=True)
class ModelConfig:
    tied: bool = knob(True)
    conv: ConvConfig = field(default_factory=ConvConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    soft: SoftConfig = field(default_factory=SoftConfig)
    mlp: MlpConfig = field(default_factory=MlpConfig)

    def family(self, name: str):
        """The hyper-parameter block of one family."""
        return getattr(self, name)


@dataclass(frozen=True)
class Config:
    seed: int = knob(0, _non_negative)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: tuple = knob(FAMILIES)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["variants"] = list(self.variants)
        return d


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _coerce(key: str, value: Any, typ) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; allowed: true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; allowed: {_type_name(int)}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}; allowed: a finite number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; allowed: {_type_name(str)}")
        return value
    raise TypeError(typ)


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'params'}: got {raw!r}; allowed: a mapping of "
                          f"{', '.join(f.name for f in fields(cls))}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed keys: {', '.join(known)}")
    values = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        if name not in raw:
            continue
        value = raw[name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING
                                    else None):
            values[name] = _build(f.default_factory, value, key + ".")
            continue
        if name == "variants":
            values[name] = _variants(key, value)
            continue
        typ = {"int": int, "float": float, "bool": bool, "str": str}[f.type]
        value = _coerce(key, value, typ)
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{key}: got {value!r}; {problem}")
        values[name] = value
    return cls(**values)


def _variants(key: str, value: Any) -> tuple:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: got {value!r}; allowed: a non-empty list of {', '.join(FAMILIES)}")
    for v in value:
        if v not in FAMILIES:
            raise ConfigError(f"{key}: unknown variant {v!r}; allowed: {', '.join(FAMILIES)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: got {value!r}; each variant may appear once")
    return tuple(value)


def _cross_checks(cfg: Config) -> None:
    available = MNIST_TRAIN_SIZE - cfg.data.val_size
    if cfg.data.val_size < NUM_CLASSES or available < NUM_CLASSES:
        raise ConfigError(f"data.val_size: got {cfg.data.val_size}; allowed: "
                          f"{NUM_CLASSES}..{MNIST_TRAIN_SIZE - NUM_CLASSES}")
    if not NUM_CLASSES <= cfg.data.train_size <= available:
        raise ConfigError(f"data.train_size: got {cfg.data.train_size}; allowed: {NUM_CLASSES} "
                          f"(one per class)..{available} (60000 minus data.val_size)")
    att = cfg.model.attention
    if att.width % att.heads:
        raise ConfigError(f"model.attention.heads: got {att.heads}; must divide "
                          f"model.attention.width ({att.width})")


def from_dict(raw: Any) -> Config:
    cfg = _build(Config, raw if raw is not None else {}, "")
    _cross_checks(cfg)
    return cfg


def load(path: str | os.PathLike = "params.yaml") -> Config:
    """Read and validate a params file; raises ConfigError with a one-line message."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        if isinstance(exc, yaml.constructor.ConstructorError):
            raise ConfigError(f"{path}: refused{where}: {exc.problem} (params are plain YAML values; "
                              f"tags that build Python objects are never run)") from None
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return from_dict(raw)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become comma-joined strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out
