"""Reading an experiment: the YAML file (refused when it is not one: too big, not UTF-8, an alias bomb, a key given
twice), the `--set key=value` overrides, and validation into a `Config`, every error one line naming the key; and
the keys such a file may hold, for `python -m fine_tune keys`."""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fine_tune.config import Config, Hyperparameters
from fine_tune.sections import CurveConfig, DataConfig, PretrainConfig, SweepConfig
from fine_tune.errors import ConfigError

MAX_YAML_BYTES = 1 << 20
MAX_ALIASES = 20  # an experiment needs few, if any; nested aliases ("billion laughs") expand exponentially


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse(text: str):
    """The YAML document, refused before it is built when it holds more aliases than an experiment needs."""
    aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
    if aliases > MAX_ALIASES:
        raise yaml.YAMLError(f"{aliases} aliases (at most {MAX_ALIASES}): the file would expand enormously")
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read an experiment YAML (or just the defaults), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    where = str(path) if path else "defaults"
    if path is not None:
        try:
            if Path(path).stat().st_size > MAX_YAML_BYTES:
                raise ConfigError(f"{where}: {Path(path).stat().st_size:,} bytes is not an experiment file (at most "
                                  f"{MAX_YAML_BYTES:,}); check the path")
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as e:
            raise ConfigError(f"{where}: cannot read the experiment file ({e.strerror}); check the path") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        try:
            raw = _parse(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error{at}: {problem}; fix the file's syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of key: value at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=0.01")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = parsed
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_one_line(e)}") from None


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if p not in ("range", "choices")) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling (python -m fine_tune keys lists the valid ones)"
    elif err["type"] == "literal_error":
        msg = f"{msg} (got {reprlib.repr(err['input'])})"
    elif "input" in err and err["type"] not in ("value_error", "missing"):
        msg = f"{msg} (got {reprlib.repr(err['input'])})"  # short: an input may be huge
    return f"{key}: {msg}"


def describe_keys() -> str:
    """Every config key with its default and description, for `python -m fine_tune keys`."""
    lines = []
    for model, prefix in ((Config, ""), (DataConfig, "data."), (PretrainConfig, "pretrain."), (SweepConfig, "sweep."),
                          (CurveConfig, "curve.")):
        for name, f in model.model_fields.items():
            if name in ("pretrain", "search", "sweep", "data", "curve"):
                continue
            default = f.default if not callable(f.default_factory) else f.default_factory()
            lines.append(f"  {prefix + name:26s} {f.description}  [default: {default!r}]")
    lines.append(f"  {'search.<name>':26s} values to try for a hyperparameter: {{low, high, log}} for a number, or a "
                 f"list of choices; <name> is one of {', '.join(Hyperparameters.model_fields)}")
    return "\n".join(lines)
