"""`--help` and `--print_config`: what a new user types first."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import yaml

from dreamer_jax.config import Config, ConfigError, help_text, make_config, parse_cli, read_presets

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_module(module, *args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip


def test_train_help_exits_0_with_every_preset_and_key():
    result = run_module("dreamer_jax.train", "--configs", "atari", "--help")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr[-2000:]
    lines = result.stdout.splitlines()
    presets = read_presets()
    del presets["defaults"]
    for name in presets:
        assert any(line.startswith(f"  {name} ") for line in lines), name
    # Every key once, with its type and its default as typed on the command line.
    table = result.stdout.split("Keys (type, default, allowed values):\n")[1].splitlines()
    rows = [line.split() for line in table if not line.split()[0].endswith(".*:")]
    keys = {row[0]: row[1:] for row in rows}
    assert sorted(row[0] for row in rows) == sorted(f"--{key}" for key in make_config().flat())
    assert keys["--rssm.deter"][:2] == ["int", "1024"]
    assert keys["--kl.balance"][:2] == ["number", "0.8"]
    assert keys["--encoder.cnn_kernels"][:4] == ["list", "of", "int", "[4,4,4,4]"]
    assert " ".join(keys["--precision"][:5]) == "string 32 32 or bf16;"


def test_help_text_is_built_from_the_config_file(tmp_path):
    path = tmp_path / "configs.yaml"
    path.write_text(
        textwrap.dedent("""\
            # The file's header.

            defaults:
              seed: 0  # seeds everything
              clip_rewards: tanh  # tanh | identity
              kl: {balance: 0.8, forward: false}  # the KL terms
              # A comment inside the block.
              grad_heads: [decoder]

            # The first preset,
            # in two lines.
            first:
              seed: 1
            second: {kl: {balance: 0.5}, seed: 2}
        """)
    )
    text = help_text("prog", "What it does.", path)
    assert text.startswith("usage: prog --logdir DIR") and "\n\nWhat it does.\n\n" in text
    presets = text.split("Presets")[1].split("\n\n")[0].splitlines()[1:]
    assert presets == [
        "  first   The first preset, in two lines.",
        "  second  sets kl, seed",
        "  (what a preset sets: prog --configs NAME --print_config)",
    ]
    keys = text.split("Keys (type, default, allowed values):\n")[1].splitlines()
    assert keys == [
        "  --seed          int             0           an int in [0, 2147483647]; seeds everything",
        "  --clip_rewards  string          tanh        tanh or identity",
        "  --kl.*: the KL terms",
        "  --kl.balance    number          0.8         a number in [0, 1]",
        "  --kl.forward    bool            false",
        "  --grad_heads    list of string  [decoder]   a list of distinct names from decoder, "
        "reward, discount",
    ]


def test_help_anywhere_wins_over_everything_else():
    assert parse_cli(["--nope", "1", "-h"], "prog", "").startswith("usage: prog")
    assert parse_cli(["--configs", "classic", "--help"], "prog", "").startswith("usage: prog")


def test_version_and_a_config_slip():
    from dreamer_jax import __version__

    assert parse_cli(["--seed", "1", "--version"], "prog", "") == f"prog {__version__}"
    with pytest.raises(ConfigError, match="^unknown option '--config': presets are named with"):
        parse_cli(["--config", "classic"], "prog", "")


def test_print_config_gives_the_resolved_yaml_without_a_logdir():
    text = parse_cli(["--configs", "classic", "debug", "--print_config", "--seed", "7"], "p", "")
    assert yaml.safe_load(text) == make_config(["classic", "debug"], {"seed": 7}).to_dict()
    config = parse_cli(["--configs", "classic", "--seed", "7"], "p", "")
    assert isinstance(config, Config) and config.seed == 7
    with pytest.raises(ConfigError, match="unknown config key 'rssm.detr'"):
        parse_cli(["--print_config", "--rssm.detr", "3"], "p", "")


def test_train_print_config_exits_0_and_writes_nothing(tmp_path):
    args = ["--configs", "atari", "debug", "--task", "atari_breakout", "--print_config"]
    result = run_module("dreamer_jax.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed == make_config(["atari", "debug"], {"task": "atari_breakout"}).to_dict()
    assert not list(tmp_path.iterdir())


def test_eval_help_describes_every_option():
    result = run_module("dreamer_jax.eval", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: python -m dreamer_jax.eval")
    options = result.stdout.split("options:")[1]
    for flag in ("--logdir LOGDIR ", "--episodes EPISODES ", "--envs ENVS ", "--seed SEED "):
        assert flag in options, flag
    assert "--video " in options
