import pytest
import yaml

from dreamer_jax.config import ConfigError, load_config, make_config, parse_args, read_presets


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
    "argv, fragment",
    [
        (["--rssm.detr", "3"], "unknown config key 'rssm.detr'"),
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
    assert overrides == {"x.y": 1, "flag": True, "l": [1, 2]}
