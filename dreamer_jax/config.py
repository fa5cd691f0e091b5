"""The one config system: YAML presets, composed in order, then dotted CLI overrides.

    config = load_config(["--configs", "atari", "debug", "--rssm.deter", "256"])
    config.rssm.deter  # 256

Every key and its type is declared by the `defaults` block of `configs.yaml`. Presets
and overrides may only set keys that exist there, with values of the same type (an int
is accepted where a float is declared). Anything else raises `ConfigError` with one line
naming the key and what was expected. Every key also has a range in `_RULES`, checked
before anything is written.

A run's saved config comes back with `load_run_config("<logdir>/config.yaml")`, and
`changed_keys(saved, config)` names what a resumed run would change beyond `RESUMABLE_KEYS`.
"""

from __future__ import annotations

import argparse
import copy
import math
import pathlib
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import yaml

from dreamer_jax.paths import write_atomic

CONFIGS_PATH = pathlib.Path(__file__).with_name("configs.yaml")

# Keys a resumed run may change freely: run length, logging and bookkeeping.
RESUMABLE_KEYS = (
    "logdir", "steps", "log_every", "eval_every", "eval_eps", "checkpoint_every",
    "checkpoint_keep", "wandb", "jit", "resume", "max_nonfinite", "eval_video_frames",
)  # fmt: skip


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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | pathlib.Path) -> None:
        """Writes YAML atomically: a crash leaves the previous file or this one, never a part."""
        write_atomic(path, self.to_yaml().encode())


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


class _NoValue:
    """A command-line key given without a value: true for a bool key, an error otherwise."""

    def __repr__(self) -> str:
        return "no value"


NO_VALUE = _NoValue()


class CliText(str):
    """A value as typed on the command line, read by the type of the key it sets."""


def _is_text_list(default: Any) -> bool:
    return isinstance(default, list | tuple) and (not default or isinstance(default[0], str))


def _coerce(key: str, value: Any, default: Any) -> Any:
    """`value` converted to the type of `default`, or ConfigError."""
    expected = _type_name(default)
    several = isinstance(value, list) and len(value) > 1
    if (
        several
        and all(isinstance(v, CliText) for v in value)
        and not isinstance(default, list | tuple)
    ):
        raise ConfigError(
            f"config key '{key}' takes one value, got {len(value)}: {' '.join(value)} "
            "(presets go after --configs)"
        )
    if isinstance(value, CliText):
        text = str(value)
        if isinstance(default, str):
            value = text  # as typed: YAML reads '001' as 1, '0755' as 493, '12:30' as 750
        elif _is_text_list(default):  # "001,b", "a, b" or "[001, b]": each item as typed
            inner = text.strip()
            inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
            value = [item.strip() for item in inner.split(",") if item.strip()]
        elif isinstance(default, int | float) and not isinstance(default, bool):
            value = _parse_number(text)
        elif isinstance(default, bool) and text.strip() in ("0", "1"):
            value = text.strip() == "1"
        else:
            value = _parse_scalar(text)
    if value is NO_VALUE and isinstance(default, bool):
        return True
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
                return [str(v) if isinstance(v, CliText) else v for v in value]
            return [_coerce(f"{key}[{i}]", v, default[0]) for i, v in enumerate(value)]
    raise ConfigError(f"config key '{key}' expects {expected}, got {value!r}")


def _set_dotted(data: dict, dotted: str, value: Any, schema: dict) -> None:
    parts = str(dotted).split(".")  # YAML keys may be numbers
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
                    _set_dotted(data, f"{dotted}.{sub}", subvalue, schema)
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
    config = Config(data)
    _validate(config)
    return config


def changed_keys(saved: Config, config: Config) -> list[str]:
    """Dotted keys whose values differ from the saved config, except `RESUMABLE_KEYS`."""
    old, new = saved.flat(), config.flat()
    free = lambda key: key.split(".")[0] in RESUMABLE_KEYS
    return sorted(k for k in new if not free(k) and old.get(k) != new[k])


def load_run_config(path: str | pathlib.Path) -> Config:
    """The config a run saved (`<logdir>/config.yaml`), applied over `defaults` so that a key
    added since gets its default. Any problem is a one-line ConfigError naming `path`."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not path.parent.exists():
            raise ConfigError(f"{path.parent} does not exist") from None
        raise ConfigError(f"{path} not found: is {path.parent} a dreamer-jax run?") from None
    except NotADirectoryError:
        raise ConfigError(f"{path.parent} is not a directory: a run's logdir is one") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConfigError(f"{path} cannot be read: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, Mapping):
        held = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path} holds {held}, not a mapping of config keys")
    try:
        return make_config([], data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


class _Rule(NamedTuple):
    """The values a key accepts beyond its declared type, and the words for them."""

    ok: Callable[[Any], bool]
    expects: str


def _int(low: int, high: int | None = None) -> _Rule:
    if high is None:
        return _Rule(lambda v: v >= low, f"an int >= {low}")
    return _Rule(lambda v: low <= v <= high, f"an int in [{low}, {high}]")


def _number(
    low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> _Rule:
    """A finite float in the interval; `*_open` excludes that end."""

    def ok(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return math.isfinite(v) and above and below

    if high == math.inf:
        return _Rule(ok, f"a finite number {'>' if low_open else '>='} {low:g}")
    brackets = "(" if low_open else "[", ")" if high_open else "]"
    return _Rule(ok, f"a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}")


def _one_of(*options: str) -> _Rule:
    return _Rule(lambda v: v in options, f"{', '.join(options[:-1])} or {options[-1]}")


def _subset_of(*options: str) -> _Rule:
    return _Rule(
        lambda v: set(v) <= set(options) and len(set(v)) == len(v),
        f"a list of distinct names from {', '.join(options)}",
    )


_TYPED = _Rule(lambda v: True, "")  # the declared type is the whole check
_SIZE = _int(1)
_COUNT = _int(0)
_SIZES = _Rule(lambda v: len(v) > 0 and all(x >= 1 for x in v), "a non-empty list of ints >= 1")
_FRACTION = _number(0.0, 1.0)
_POSITIVE = _number(0.0, low_open=True)
_NONNEGATIVE = _number(0.0)


# The largest seed of a run (and of dreamer-eval): jax.random.key keeps only 32 bits without
# x64, and eval seeds envs with seed + 2e6.
MAX_SEED = 2**31 - 1


def _group(name: str, rules: Mapping[str, _Rule]) -> dict[str, _Rule]:
    return {f"{name}.{key}": rule for key, rule in rules.items()}


_OPTIMIZER = {
    "lr": _POSITIVE,
    "eps": _POSITIVE,
    "clip": _POSITIVE,  # a global-norm clip of 0 zeroes every gradient
    "wd": _number(0.0, 1.0, high_open=True),  # w <- (1 - wd) w
}
_HEAD = {"layers": _COUNT, "units": _SIZE}  # 0 layers: a linear head
_CODER = {"cnn_depth": _SIZE, "cnn_kernels": _SIZES, "mlp_layers": _SIZES}

# Every key of `defaults` (dotted), and the values it accepts; tests/test_config.py checks
# that no key is missing.
_RULES: dict[str, _Rule] = {
    "logdir": _TYPED,  # train.py requires it
    "seed": _int(0, MAX_SEED),
    "num_seeds": _int(1, 1024),  # each seed holds a whole agent; far more cannot fit a GPU
    "task": _TYPED,  # checked against the available tasks by envs.VectorEnv
    "envs": _SIZE,
    "eval_envs": _SIZE,
    "time_limit": _COUNT,  # 0: the suite's own limit
    "action_repeat": _SIZE,
    "steps": _SIZE,
    "log_every": _SIZE,
    "eval_every": _SIZE,
    "eval_eps": _SIZE,
    "prefill": _COUNT,
    "pretrain": _COUNT,
    "train_every": _SIZE,
    "train_steps": _SIZE,
    "checkpoint_every": _SIZE,
    "checkpoint_keep": _SIZE,  # orbax keeps no checkpoint at all with 0
    "resume.allow_config_change": _TYPED,
    "replay.capacity": _SIZE,
    "replay.minlen": _SIZE,
    "replay.prioritize_ends": _TYPED,
    "replay.prefetch": _SIZE,
    "replay.ongoing": _TYPED,
    "dataset.batch": _SIZE,
    "dataset.length": _int(2),
    "precision": _one_of("32", "bf16"),
    "jit": _TYPED,
    "clip_rewards": _one_of("tanh", "identity"),
    "eval_noise": _FRACTION,
    "expl_noise": _FRACTION,
    "grad_heads": _subset_of("decoder", "reward", "discount"),
    "pred_discount": _TYPED,
    **_group("rssm", {"hidden": _SIZE, "deter": _SIZE, "stoch": _SIZE, "discrete": _SIZE}),
    **_group("encoder", _CODER),
    **_group("decoder", _CODER),
    **_group("reward_head", _HEAD),
    **_group("discount_head", _HEAD),
    **_group("loss_scales", {"kl": _NONNEGATIVE, "reward": _NONNEGATIVE, "discount": _NONNEGATIVE}),
    **_group(
        "kl", {"free": _NONNEGATIVE, "forward": _TYPED, "balance": _FRACTION, "free_avg": _TYPED}
    ),
    **_group("model_opt", _OPTIMIZER),
    **_group(
        "actor",
        {
            **_HEAD,
            "dist": _one_of("auto", "onehot", "tanh_normal"),
            "min_std": _POSITIVE,
            "init_std": _Rule(math.isfinite, "a finite number"),  # an offset of the softplus
        },
    ),
    **_group("critic", _HEAD),
    **_group("actor_opt", _OPTIMIZER),
    **_group("critic_opt", _OPTIMIZER),
    "discount": _number(0.0, 1.0, low_open=True),
    "discount_lambda": _FRACTION,
    "imag_horizon": _int(2),
    "actor_grad": _one_of("auto", "reinforce", "dynamics", "both"),
    "actor_grad_mix": _FRACTION,
    "actor_ent": _NONNEGATIVE,
    "slow_target_update": _SIZE,
    "slow_target_fraction": _number(0.0, 1.0, low_open=True),
    "max_nonfinite": _SIZE,
    "wandb.mode": _one_of("offline", "online", "disabled"),
    "wandb.project": _TYPED,
    "wandb.entity": _TYPED,
    "wandb.group": _TYPED,
    "wandb.tags": _TYPED,
    "wandb.notes": _TYPED,
    "eval_video_frames": _COUNT,  # 0: no policy video
}


def _validate(config: Config) -> None:
    """Range checks that a type check cannot express (`_RULES`), then checks across keys."""
    for key, value in config.flat().items():
        rule = _RULES[key]
        if not rule.ok(value):
            raise ConfigError(
                f"config key '{key}' expects {rule.expects}, got {_to_plain(value)!r}"
            )
    if config.seed + config.num_seeds - 1 > MAX_SEED:
        raise ConfigError(
            f"config keys 'seed' + 'num_seeds' - 1 ({config.seed + config.num_seeds - 1}) "
            f"must be at most {MAX_SEED}"
        )
    # Episodes shorter than this are never stored: the run would collect and never train.
    sample = max(config.replay.minlen, config.dataset.length)
    if config.replay.capacity < sample:
        raise ConfigError(
            f"config key 'replay.capacity' ({config.replay.capacity}) must be at least "
            f"max(replay.minlen, dataset.length) = {sample}, or no episode is ever stored"
        )
    # An episode of time_limit steps holds time_limit + 1 observations.
    if 0 < config.time_limit < sample - 1:
        raise ConfigError(
            f"config key 'time_limit' ({config.time_limit}) must be 0 or at least "
            f"max(replay.minlen, dataset.length) - 1 = {sample - 1}, or no episode is ever stored"
        )


def parse_args(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Split `--configs a b --x.y 1 --flag` into presets and raw override strings.

    Values stay text (`CliText`) until `make_config` reads them by the declared type: as
    YAML (`[1,2]`, `true`, `1e-4`) for numbers, bools and lists, verbatim for strings. A key
    given without a value means `true`.
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
        if key == "config":  # a natural slip, and no key of that name could be close to it
            raise ConfigError("unknown option '--config': presets are named with --configs")
        if key == "configs":
            presets.extend(values)
        elif not values:
            overrides[key] = NO_VALUE
        elif len(values) == 1:
            overrides[key] = CliText(values[0])
        else:
            overrides[key] = [CliText(v) for v in values]
    return presets, overrides


def _parse_number(text: str) -> Any:
    """A number as Python reads it: YAML 1.1 would read '010' as 8 (octal) and '1:30' as 90."""
    for read in (int, float, lambda text: int(text, 0)):  # the last: 0x10, 0o17, 0b11
        try:
            return read(text)
        except ValueError:
            pass
    return text


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


HELP_FLAGS = ("-h", "--help")
HELP_WIDTH = 100
PRINT_FLAG = "--print_config"
VERSION_FLAG = "--version"


def program_name(module: str) -> str:
    """How the user started `module`: by its console script (`dreamer-train`, from
    pyproject.toml) or as `python -m <module>`."""
    script = pathlib.Path(sys.argv[0]).name
    return script if script.startswith("dreamer-") else f"python -m {module}"


class OneLineParser(argparse.ArgumentParser):
    """argparse for the commands: a bad argument raises `error` (default ConfigError) with
    argparse's message, for the command to print as one `error:` line and exit 2, instead of
    argparse's usage block."""

    def __init__(self, *args: Any, error: type[Exception] = ConfigError, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._error = error

    def error(self, message: str):  # type: ignore[override]
        raise self._error(message)


def warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the commands: `warning: <message>`, without the file, line
    and source line Python adds."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def parse_cli(argv: Sequence[str], program: str, description: str) -> Config | str:
    """The config `argv` asks for, or the text to print before exiting 0: the usage for
    `-h`/`--help` (anywhere in `argv`), the version for `--version`, the resolved config as
    YAML for `--print_config`.
    Raises ConfigError."""
    if any(arg in HELP_FLAGS for arg in argv):
        return help_text(program, description)
    if VERSION_FLAG in argv:
        from dreamer_jax import __version__

        return f"{program} {__version__}"
    config = load_config([arg for arg in argv if arg != PRINT_FLAG])
    return config.to_yaml() if PRINT_FLAG in argv else config


def help_text(program: str, description: str, path: pathlib.Path = CONFIGS_PATH) -> str:
    """The usage, the presets and every key with its type, default and allowed values, all
    read from `configs.yaml` and `_RULES`, so the help cannot fall behind the config."""
    text = path.read_text()
    presets = read_presets(path)
    defaults = presets.pop("defaults")
    notes = _preset_comments(text)
    width = max(map(len, presets)) + 4
    preset_lines = [
        textwrap.fill(
            notes.get(name) or f"sets {', '.join(preset)}",
            HELP_WIDTH, initial_indent=f"  {name:<{width - 2}}", subsequent_indent=" " * width,
        )
        for name, preset in presets.items()
    ]  # fmt: skip
    return "\n".join([
        f"usage: {program} --logdir DIR [--configs PRESET ...] [--KEY VALUE ...]",
        f"       {program} [--configs PRESET ...] [--KEY VALUE ...] {PRINT_FLAG}",
        "",
        description.strip(),
        "",
        "Presets (applied over the defaults in the order given to --configs):",
        *preset_lines,
        f"  (what a preset sets: {program} --configs NAME {PRINT_FLAG})",
        "",
        "Options: --KEY VALUE sets any key below; a group's keys are dotted (--rssm.deter 256),",
        "a list takes several values or one [a,b]; a bool key given alone means true.",
        f"  {PRINT_FLAG}  print the resolved config (YAML) and exit",
        f"  {VERSION_FLAG}       print the version and exit",
        "  -h, --help      print this help and exit",
        "",
        "Keys (type, default, allowed values):",
        *_key_lines(defaults, _key_comments(text)),
    ]) + "\n"  # fmt: skip


def _key_lines(defaults: Mapping[str, Any], comments: Mapping[str, str]) -> list[str]:
    """One aligned line per dotted key; a group's comment goes on a line of its own first."""
    rows = [
        (f"--{key}", _type_name(value), _show(value), key)
        for key, value in Config(defaults).flat().items()
    ]
    # Long defaults ([400,400,400,400]) push their own line's note rather than every line's.
    widths = [max(len(row[i]) for row in rows) for i in range(2)] + [10]
    lines, group = [], ""
    for *columns, key in rows:
        top = key.split(".")[0]
        if "." in key and top != group and top in comments:
            lines.append(f"  --{top}.*: {comments[top]}")
        group = top
        note = "; ".join(n for n in (_RULES[key].expects, comments.get(key)) if n)
        cells = [f"{cell:<{width}}" for cell, width in zip(columns, widths, strict=True)]
        lines.append(f"  {'  '.join(cells)}  {note}".rstrip())
    return lines


def _show(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return f"[{','.join(map(_show, value))}]"
    return str(value) if value != "" else "''"


def _preset_comments(text: str) -> dict[str, str]:
    """`{name: comment}` from the comment lines right above each top-level block."""
    comments, block = {}, []
    for line in text.splitlines():
        if line.startswith("#"):
            block.append(line.lstrip("#").strip())
            continue
        name = re.match(r"(\w+):", line)
        if name and block:
            comments[name[1]] = " ".join(block)
        block = []
    return comments


def _key_comments(text: str) -> dict[str, str]:
    """`{key: comment}` from the inline comments of the `defaults` block's lines (a group's
    comment under the group's name)."""
    comments, inside = {}, False
    for line in text.splitlines():
        if re.match(r"\w", line):
            inside = line.startswith("defaults:")
        entry = re.match(r"  (\w+): .*?\s#\s*(.*)", line)
        if inside and entry:
            # "tanh | identity" repeats the allowed values that the help already shows.
            comments[entry[1]] = re.sub(r"^[\w']+( \| [\w']+)+\.?\s*", "", entry[2])
    return comments
