import os

import jax
import numpy as np
import pytest
import yaml

from dreamer_jax import config as config_module
from dreamer_jax.config import (
    ConfigError,
    load_config,
    load_run_config,
    make_config,
    parse_args,
    read_presets,
)


def test_defaults_match_spec():
    config = make_config()
    assert config.rssm.stoch == 32 and config.rssm.discrete == 32
    assert config.rssm.deter == 1024 and config.rssm.hidden == 1024
    assert config.kl.balance == 0.8 and config.kl.free == 0.0 and config.kl.free_avg
    assert config.imag_horizon == 15 and config.discount_lambda == 0.95
    assert config.dataset.batch == 16 and config.dataset.length == 50
    assert config.model_opt.clip == 100 and config.model_opt.eps == 1e-5
    assert config.slow_target_update == 100


def test_atari_preset_overrides_defaults():
    config = make_config(["atari"])
    assert config.rssm.deter == 600 and config.rssm.hidden == 600
    assert config.rssm.stoch == 32  # untouched keys keep the default
    assert config.model_opt.lr == 2e-4 and config.actor_opt.lr == 4e-5
    assert config.critic_opt.lr == 1e-4 and config.actor_ent == 1e-3
    assert config.discount == 0.999 and config.train_every == 16
    assert config.loss_scales.kl == 0.1 and config.loss_scales.discount == 5.0
    assert config.steps == 50_000_000 and isinstance(config.steps, int)
    assert make_config(["atari", "paper"]).discount == 0.995


def test_presets_compose_in_order_then_overrides():
    config = load_config(
        ["--configs", "atari", "debug", "--rssm.deter", "256", "--dataset.batch=8", "--jit"]
    )
    assert config.rssm.deter == 256 and config.rssm.hidden == 32  # debug after atari
    assert config.dataset.batch == 8 and config.jit is True
    assert config.model_opt.lr == 2e-4


def test_cli_values_are_coerced_to_declared_types():
    config = load_config(["--steps", "1e6", "--model_opt.lr", "3e-4", "--grad_heads", "decoder"])
    assert config.steps == 1_000_000 and isinstance(config.steps, int)
    assert config.model_opt.lr == 3e-4
    assert config.grad_heads == ("decoder",)
    assert load_config(["--precision", "bf16"]).precision == "bf16"
    assert load_config(["--precision", "32"]).precision == "32"


@pytest.mark.parametrize(
    "argv, key, expected",
    [
        (["--seed", "010"], "seed", 10),  # YAML 1.1 reads 010 as octal 8
        (["--seed", "1_000"], "seed", 1000),
        (["--steps", "2e3"], "steps", 2000),
        (["--model_opt.lr", "010"], "model_opt.lr", 10.0),
        (["--model_opt.lr", ".5"], "model_opt.lr", 0.5),
        (["--log_every", "1:30"], None, "expects int"),  # YAML 1.1 reads 1:30 as 90
        (["--jit", "0"], "jit", False),
        (["--jit", "1"], "jit", True),
        (["--jit", "2"], None, "expects bool"),
    ],
)
def test_command_line_numbers_read_as_written(argv, key, expected):
    if key is None:
        with pytest.raises(ConfigError, match=expected):
            load_config(argv)
        return
    value = load_config(argv).flat()[key]
    assert value == expected and type(value) is type(expected)


def test_text_keys_keep_the_command_line_text_verbatim(tmp_path):
    # YAML would read these as the numbers 1, 493, 750 and 1000, or as true.
    for text in ["001", "0755", "12:30", "1_000", "yes", "[1,2]", "1e3"]:
        config = load_config(["--logdir", text, "--wandb.tags", text, "x"])
        assert config.logdir == text and config.wandb.tags == (text, "x")
        config.save(tmp_path / "config.yaml")  # still plain YAML strings
        assert config_module.load_run_config(tmp_path / "config.yaml") == config
    assert load_config(["--wandb.tags", "001,b"]).wandb.tags == ("001", "b")
    for text in ["[a, b]", "a, b", "a,b,"]:
        assert load_config(["--wandb.tags", text]).wandb.tags == ("a", "b")
    assert load_config(["--wandb.tags", "[001, b]"]).wandb.tags == ("001", "b")
    assert load_config(["--wandb.tags", ""]).wandb.tags == ()
    # Numbers, bools and number lists are still read as YAML.
    config = load_config(["--seed", "1_000", "--jit", "yes", "--encoder.mlp_layers", "[4,4]"])
    assert (config.seed, config.jit, config.encoder.mlp_layers) == (1000, True, (4, 4))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--rssm.detr", "3"], "unknown config key 'rssm.detr'"),
        (["--wandb.mode", "disabled", "classic"], "'wandb.mode' takes one value, got 2"),
        (["--nope", "3"], "unknown config key 'nope'"),
        (["--rssm.deter", "abc"], "'rssm.deter' expects int"),
        (["--steps", "1.5"], "'steps' expects int"),
        (["--jit", "maybe"], "'jit' expects bool"),
        (["--precision", "16"], "'precision' expects 32 or bf16"),
        (["--kl.balance", "1.5"], "'kl.balance'"),
        (["--configs", "atarii"], "unknown config preset 'atarii'"),
        (["--rssm", "3"], "'rssm' is a group"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_input_is_one_clear_line(argv, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_config_is_immutable_and_round_trips(tmp_path):
    config = make_config(["atari"])
    with pytest.raises(AttributeError):
        config.seed = 3
    config.save(tmp_path / "config.yaml")
    again = make_config([], yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == config
    assert config.update({"rssm.deter": 7}).rssm.deter == 7 and config.rssm.deter == 600


def test_every_preset_is_valid():
    for name in read_presets():
        make_config([name])


def test_parse_args_splits_presets_and_overrides():
    presets, overrides = parse_args(
        ["--configs", "a", "b", "--x.y", "1", "--flag", "--l", "1", "2"]
    )
    assert presets == ["a", "b"]
    # Values stay text until make_config reads them by the key's declared type.
    assert overrides == {"x.y": "1", "flag": config_module.NO_VALUE, "l": ["1", "2"]}
    # A key given alone is true for a bool key and no value for any other.
    assert load_config(["--jit"]).jit is True
    with pytest.raises(ConfigError, match=r"^config key 'steps' expects int, got no value$"):
        load_config(["--steps"])


def test_every_key_has_a_range_rule():
    # A key added to `defaults` without a rule in config._RULES fails here.
    assert set(config_module._RULES) == set(make_config().flat())


@pytest.mark.parametrize(
    "key, value",
    [
        ("rssm.discrete", 0),
        ("time_limit", -1),
        ("action_repeat", 0),
        ("envs", 0),
        ("eval_envs", 0),
        ("replay.prefetch", 0),
        ("replay.capacity", 0),
        ("replay.minlen", 0),
        ("seed", -1),
        ("seed", 99999999999999999999),
        ("seed", 2**31),
        ("num_seeds", 0),
        ("num_seeds", 1025),
        ("log_every", 0),
        ("eval_every", 0),
        ("checkpoint_every", 0),
        ("checkpoint_keep", 0),
        ("max_nonfinite", 0),
        ("prefill", -1),
        ("steps", 0),
        ("eval_eps", 0),
        ("model_opt.lr", 0.0),
        ("actor_opt.eps", -1e-5),
        ("critic_opt.clip", 0.0),
        ("model_opt.wd", -0.1),
        ("model_opt.lr", float("nan")),
        ("actor.init_std", float("inf")),
        ("actor.min_std", 0.0),
        ("expl_noise", 1.5),
        ("loss_scales.kl", -1.0),
        ("kl.free", -0.5),
        ("slow_target_update", 0),
        ("slow_target_fraction", 0.0),
        ("actor_grad_mix", 2.0),
        ("actor_ent", -1e-3),
        ("reward_head.units", 0),
        ("actor.layers", -1),
        ("encoder.mlp_layers", []),
        ("decoder.mlp_layers", [32, 0]),
        ("encoder.cnn_kernels", [4, 0, 4]),
        ("grad_heads", ["decoder", "image"]),
        ("grad_heads", ["reward", "reward"]),
        ("actor.dist", "gaussian"),
        ("clip_rewards", "sign"),
    ],
)
def test_out_of_range_values_are_one_clear_line(key, value):
    with pytest.raises(ConfigError) as info:
        make_config(["debug"], {key: value})
    message = str(info.value)
    assert f"config key '{key}' expects" in message and "\n" not in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("time_limit", 0),  # the suite's own limit
        ("prefill", 0),
        ("pretrain", 0),
        ("seed", 0),
        ("seed", 2**31 - 1),
        ("num_seeds", 1),
        ("checkpoint_keep", 1),
        ("actor.layers", 0),  # a linear head
        ("grad_heads", []),
        ("kl.balance", 1.0),
        ("actor.init_std", -2.0),
        ("model_opt.wd", 0.0),
    ],
)
def test_edge_values_in_range_are_accepted(key, value):
    expected = tuple(value) if isinstance(value, list) else value
    assert make_config(["debug"], {key: value}).flat()[key] == expected


def test_largest_seed_works_everywhere_it_is_used():
    # Eval offsets the seed by 2e6 (eval.py); without x64 jax keeps only 32 bits of a seed.
    seed = 2**31 - 1 + 2_000_000
    assert jax.random.key_data(jax.random.key(seed)).tolist() == [0, seed]
    np.random.default_rng(seed)
    np.random.SeedSequence([seed, 10**9, 1_000_000]).generate_state(1)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"replay.capacity": 9}, "'replay.capacity' (9) must be at least"),
        ({"time_limit": 5}, "'time_limit' (5) must be 0 or at least"),
    ],
)
def test_sizes_that_would_never_store_an_episode_are_rejected(overrides, fragment):
    # debug: replay.minlen 10, dataset.length 10; an episode of T steps holds T + 1 records.
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make_config(["debug"], overrides)
    make_config(["debug"], {"replay.capacity": 10, "time_limit": 9})


def test_load_run_config_round_trips(tmp_path):
    config = make_config(["atari", "debug"], {"seed": 7})
    config.save(tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == config
    assert os.listdir(tmp_path) == ["config.yaml"]  # no temporary file left


@pytest.mark.parametrize(
    "text, fragment",
    [
        (None, "not found"),
        ("seed: [1, 2\n", "not valid YAML at line 2"),
        ("just a string\n", "holds a str, not a mapping"),
        ("", "holds nothing, not a mapping"),
        ("seed: 3\nrssm: {detr: 4}\n", "unknown config key 'rssm.detr'"),
        ("1: 2\n", "unknown config key '1'"),
        ("checkpoint_keep: 0\n", "'checkpoint_keep' expects an int >= 1"),
        ("seed: abc\n", "'seed' expects int"),
    ],
)
def test_load_run_config_errors_name_the_file_in_one_line(tmp_path, text, fragment):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_a_file_given_as_a_runs_logdir_is_named_as_not_a_directory(tmp_path):
    (tmp_path / "seed_0.log").write_text("a sweep's log, next to its run's folder")
    with pytest.raises(ConfigError) as info:
        load_run_config(tmp_path / "seed_0.log" / "config.yaml")
    assert str(info.value) == f"{tmp_path / 'seed_0.log'} is not a directory: a run's logdir is one"


def test_save_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    make_config(["debug"]).save(path)
    before = path.read_text()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        make_config(["debug"], {"seed": 5}).save(path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_last_seed_of_a_many_seed_run_must_be_a_valid_seed():
    assert make_config(["debug"], {"seed": 2**31 - 4, "num_seeds": 4}).num_seeds == 4
    with pytest.raises(ConfigError, match=r"'seed' \+ 'num_seeds' - 1 \(2147483648\) must be"):
        make_config(["debug"], {"seed": 2**31 - 4, "num_seeds": 5})
