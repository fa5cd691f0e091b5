"""The one config system: YAML presets, composed in order, then dotted CLI overrides.

    config = load_config(["--configs", "atari", "debug", "--rssm.deter", "256"])
    config.rssm.deter  # 256

Every key and its type is declared by the `defaults` block of `configs.yaml`. Presets
and overrides may only set keys that exist there, with values of the same type (an int
is accepted where a float is declared). Anything else raises `ConfigError` with one line
naming the key and what was expected.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import yaml

CONFIGS_PATH = pathlib.Path(__file__).with_name("configs.yaml")


class ConfigError(ValueError):
    """A bad preset name, key, type or value. The message is one line."""


class Config(Mapping):
    """An immutable nested mapping with attribute access (`config.rssm.deter`)."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(
            self,
            "_data",
            {k: Config(v) if isinstance(v, Mapping) else _freeze(v) for k, v in data.items()},
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is immutable; use config.update({...})")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self.to_dict() == _to_plain(other)

    def __hash__(self) -> int:
        return hash(yaml.safe_dump(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self._data)

    def update(self, overrides: Mapping[str, Any]) -> Config:
        """A new config with `{"dotted.key": value}` overrides applied and type-checked."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value, self.to_dict())
        return Config(data)

    def flat(self) -> dict[str, Any]:
        """`{"rssm.deter": 600, ...}` for loggers."""
        out = {}
        for key, value in self.items():
            if isinstance(value, Config):
                out.update({f"{key}.{k}": v for k, v in value.flat().items()})
            else:
                out[key] = value
        return out

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def read_presets(path: pathlib.Path = CONFIGS_PATH) -> dict[str, dict[str, Any]]:
    return yaml.safe_load(path.read_text())


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number" if isinstance(value, float) else "int"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return f"list of {_type_name(value[0])}" if value else "list"
    return type(value).__name__


def _coerce(key: str, value: Any, default: Any) -> Any:
    """`value` converted to the type of `default`, or ConfigError."""
    expected = _type_name(default)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
                if number.is_integer():
                    return int(number)
            except ValueError:
                pass
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, list | tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if isinstance(value, list | tuple):
            if not default:
                return list(value)
            return [_coerce(f"{key}[{i}]", v, default[0]) for i, v in enumerate(value)]
    raise ConfigError(f"config key '{key}' expects {expected}, got {value!r}")


def _set_dotted(data: dict, dotted: str, value: Any, schema: dict) -> None:
    parts = dotted.split(".")
    node, spec = data, schema
    for i, part in enumerate(parts):
        if not isinstance(spec, dict) or part not in spec:
            prefix = ".".join(parts[:i])
            options = sorted(spec) if isinstance(spec, dict) else []
            where = f" under '{prefix}'" if prefix else ""
            close = ", ".join(k for k in options if k.startswith(part[:2]))[:200]
            hint = f" (close: {close})" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{where}{hint}")
        if i == len(parts) - 1:
            if isinstance(spec[part], dict):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"config key '{dotted}' is a group; set '{dotted}.<key>'")
                for sub, subvalue in value.items():
                    _set_dotted(node[part], sub, subvalue, spec[part])
            else:
                node[part] = _coerce(dotted, value, spec[part])
        else:
            node, spec = node[part], spec[part]


def _merge_preset(data: dict, preset: Mapping, schema: dict, prefix: str = "") -> None:
    for key, value in preset.items():
        _set_dotted(data, f"{prefix}{key}", value, schema)


def make_config(presets: Sequence[str] = (), overrides: Mapping[str, Any] | None = None) -> Config:
    """`defaults`, then each named preset in order, then `{"dotted.key": value}` overrides."""
    available = read_presets()
    schema = available["defaults"]
    data = copy.deepcopy(schema)
    for name in presets:
        if name not in available:
            raise ConfigError(f"unknown config preset '{name}'; available: {', '.join(available)}")
        _merge_preset(data, available[name], schema)
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value, schema)
    _validate(data)
    return Config(data)


def _validate(data: dict) -> None:
    """Value checks that a type check cannot express."""
    checks = [
        ("precision", data["precision"] in ("32", "bf16"), "32 or bf16"),
        ("actor_grad", data["actor_grad"] in ("auto", "reinforce", "dynamics", "both"),
         "auto, reinforce, dynamics or both"),
        ("actor.dist", data["actor"]["dist"] in ("auto", "onehot", "tanh_normal"),
         "auto, onehot or tanh_normal"),
        ("clip_rewards", data["clip_rewards"] in ("tanh", "identity"), "tanh or identity"),
        ("kl.balance", 0.0 <= data["kl"]["balance"] <= 1.0, "a number in [0, 1]"),
        ("discount", 0.0 < data["discount"] <= 1.0, "a number in (0, 1]"),
        ("discount_lambda", 0.0 <= data["discount_lambda"] <= 1.0, "a number in [0, 1]"),
        ("imag_horizon", data["imag_horizon"] >= 2, "an int >= 2"),
        ("dataset.batch", data["dataset"]["batch"] >= 1, "an int >= 1"),
        ("dataset.length", data["dataset"]["length"] >= 2, "an int >= 2"),
        ("envs", data["envs"] >= 1, "an int >= 1"),
        ("train_every", data["train_every"] >= 1, "an int >= 1"),
        ("wandb.mode", data["wandb"]["mode"] in ("offline", "online", "disabled"),
         "offline, online or disabled"),
    ]  # fmt: skip
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' expects {expected}")


def parse_args(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Split `--configs a b --x.y 1 --flag` into presets and raw override strings.

    Values are parsed as YAML scalars/lists (`[1,2]`, `true`, `1e-4`), then coerced to the
    declared type by `make_config`. A key given without a value means `true`.
    """
    presets: list[str] = []
    overrides: dict[str, Any] = {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; options look like --key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            values = [raw]
            i += 1
        else:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values = argv[i + 1 : j]
            i = j
        if key == "configs":
            presets.extend(values)
        elif not values:
            overrides[key] = True
        elif len(values) == 1:
            overrides[key] = _parse_scalar(values[0])
        else:
            overrides[key] = [_parse_scalar(v) for v in values]
    return presets, overrides


def _parse_scalar(text: str) -> Any:
    if not text.strip():
        return text  # YAML reads "" as null; an empty option value means an empty string
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(argv: Sequence[str], base_presets: Sequence[str] = ()) -> Config:
    """The CLI entry: parse `argv` and build the config (raises ConfigError)."""
    presets, overrides = parse_args(argv)
    return make_config([*base_presets, *presets], overrides)
