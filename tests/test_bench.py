"""scripts/bench.py: the leaf comparison of --determinism, and each mode through the CLI on
tiny sizes (the figures themselves go to docs/benchmarks.md, never into a test)."""

import json
import subprocess
import sys

import bench
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT


def test_leaf_differences_finds_last_bit_and_signed_zero():
    a = [np.arange(4, dtype=np.float32), np.zeros(2, np.float32), np.ones(3, np.int32)]
    assert bench.leaf_differences(a, [x.copy() for x in a]) == []
    b = [x.copy() for x in a]
    b[0][2] = np.nextafter(np.float32(2), np.float32(3))  # one ulp
    b[1][0] = -0.0  # equal as numbers, different bits
    differences = bench.leaf_differences(a, b)
    assert len(differences) == 2
    assert 0 < differences[0] < 1e-6 and differences[1] == 0.0


def test_matmul_gflop_counts_loop_bodies_per_iteration_and_splits_the_gradient():
    x, w = jnp.ones((3, 2, 4)), jnp.ones((4, 5))

    def loss(w):
        def step(carry, x_t):
            with jax.named_scope("layer"):
                return carry, x_t @ w

        return jax.lax.scan(step, 0.0, x)[1].sum()

    # Forward: 3 steps of [2, 4] @ [4, 5], 2·2·4·5 FLOP each; backward: dW = Σ_t x_tᵀ·dy_t,
    # [4, 2] @ [2, 5] per step, as many.
    expected = {"forward: layer": 3 * 80e-9, "backward: layer": 3 * 80e-9}
    assert bench.matmul_gflop(jax.grad(loss), w) == pytest.approx(expected)
    assert bench.matmul_gflop(loss, w) == pytest.approx({"forward: layer": 3 * 80e-9})


def _bench(*args):
    return subprocess.run(
        [sys.executable, "scripts/bench.py", *args, "--configs", "classic", "debug", "--no-record"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_learner_determinism_observe_policy_and_flops_modes_on_cpu(tmp_path):
    docs = (ROOT / "docs" / "benchmarks.md").read_bytes()
    learner = _bench("--updates", "2", "--profile", str(tmp_path))
    assert learner.returncode == 0, learner.stderr[-2000:]
    assert "| train_step |" in learner.stdout and "updates/s" in learner.stdout
    assert "| host CPU/update | user " in learner.stdout
    summary = subprocess.run(
        [sys.executable, "scripts/trace_summary.py", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert summary.returncode == 0 and "/host:CPU" in summary.stdout  # the profiled updates
    # The update's HLO beside the trace names its ops: the observe scan's loop, for one.
    assert (tmp_path / "train_step.hlo.txt.gz").is_file()
    assert " while · " in summary.stdout and "world_model.py:" in summary.stdout
    determinism = _bench("--determinism", "--updates", "2", "--json", str(tmp_path / "d"))
    assert determinism.returncode == 0, determinism.stderr[-2000:]
    assert "| bit-identical | yes |" in determinism.stdout  # CPU XLA is deterministic
    figures = json.loads((tmp_path / "d").read_text())
    assert figures["bit_identical"] and figures["leaves"] > 100
    assert figures["leaves_differing"] == figures["leaves_differing_from_single_seed"] == 0
    observe = _bench(
        "--observe", "--updates", "2", "--num_seeds", "2", "--json", str(tmp_path / "o")
    )
    assert observe.returncode == 0, observe.stderr[-2000:]
    figures = json.loads((tmp_path / "o").read_text())
    assert figures["mode"] == "observe" and figures["num_seeds"] == 2
    assert 0 < figures["ms_per_call"] <= figures["median_ms_per_call"]
    policy = _bench("--policy", "--updates", "5", "--num_seeds", "2", "--json", str(tmp_path / "p"))
    assert policy.returncode == 0, policy.stderr[-2000:]
    figures = json.loads((tmp_path / "p").read_text())
    assert figures["mode"] == "policy" and 0 < figures["dispatch_ms"] <= figures["call_ms"]
    flops = _bench("--flops", "--num_seeds", "2", "--json", str(tmp_path / "f"))
    assert flops.returncode == 0, flops.stderr[-2000:]
    figures = json.loads((tmp_path / "f").read_text())
    assert figures["total_gflop"] == pytest.approx(sum(figures["gflop_by_scope"].values()))
    assert any(scope.startswith("backward: WorldModel") for scope in figures["gflop_by_scope"])
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == docs  # --no-record


@pytest.mark.parametrize(
    "mode, keys",
    [
        (
            ["--collector", "--num_seeds", "2"],
            {
                "seeds",
                "envs",
                "env_steps_per_sec",
                "frames_per_sec",
                "loop_step_ms",
                "env_ms",
                "replay_ms",
                "episodes_saved",
            },
        ),  # fmt: skip
        (["--replay"], {"num_steps", "bytes_per_step", "sample_ms", "median_wait_ms"}),
    ],
)
def test_collector_and_replay_write_their_figures(tmp_path, mode, keys):
    result = _bench(*mode, "--json", str(tmp_path / "f"))
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "f").read_text())
    assert figures["mode"] == mode[0][2:] and keys <= set(figures)
    assert all(figures[key] > 0 for key in keys)
    if "seeds" in figures:  # one loop step steps every seed's envs
        assert figures["seeds"] == 2
        steps_per_sec = 1000 * figures["seeds"] * figures["envs"] / figures["loop_step_ms"]
        assert figures["env_steps_per_sec"] == pytest.approx(steps_per_sec)
        assert figures["env_ms"] + figures["replay_ms"] < figures["loop_step_ms"]


def test_unknown_config_key_exits_2():
    result = _bench("--no_such_key", "1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no_such_key" in result.stderr


def test_bad_option_values_exit_2():
    not_a_number = _bench("--updates", "x")
    last_without_value = subprocess.run(
        [sys.executable, "scripts/bench.py", "--configs", "classic", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    for result, named in ((not_a_number, "--updates"), (last_without_value, "--json")):
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().count("\n") == 0 and named in result.stderr


def test_data_age_mode_sees_ongoing_episodes_younger(tmp_path):
    """Episodes of 500 steps in 4 envs: the paper's replay samples nothing younger than the
    last finished episode; with `replay.ongoing` the newest rows of running episodes count."""
    figures = {}
    for ongoing in ("false", "true"):
        path = tmp_path / f"{ongoing}.json"
        result = _bench("--data_age", "--envs", "4", "--episode_length", "500", "--data_steps",
                        "20000", "--replay.ongoing", ongoing, "--json", str(path))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert "| age of a chunk's newest row | median" in result.stdout
        figures[ongoing] = json.loads(path.read_text())
    assert figures["true"]["ongoing"] and not figures["false"]["ongoing"]
    assert 0 <= figures["true"]["p1_age"] < figures["false"]["p1_age"]
    assert figures["true"]["median_age"] <= figures["false"]["median_age"]


@pytest.fixture
def no_benchmark(monkeypatch):
    """`bench.main` with the benchmark (and its record) replaced by a failure: an error must
    come before anything runs."""

    def ran(config, options):
        raise AssertionError(f"the {options.mode} benchmark ran")

    monkeypatch.setattr(bench, "run", ran)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--updates", "0"], "argument --updates: must be a whole number from 1 to"),
        (["--updates", "1.5"], "argument --updates: must be a whole number"),
        (["--data_age", "--data_steps", "-5"], "argument --data_steps: must be a whole"),
        (["--data_age", "--episode_length", "x"], "argument --episode_length: must be"),
        (["--data_age", "--episode_length", "0"], "argument --episode_length: must be"),
        (["--collector", "--replay"], "argument --replay: not allowed with argument --collector"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--json", "{tmp}/missing/x.json"], "--json {tmp}/missing/x.json: no folder"),
        (["--json", "{tmp}"], "--json {tmp} is a directory"),
        (["--json", "{tmp}/p", "--profile", "{tmp}/p"], "--json {tmp}/p is the --profile dir"),
        (["--json", "{tmp}/p", "--profile", "{tmp}/p/q"], "--json {tmp}/p is the --profile"),
        (["--profile", "{tmp}/file/trace"], "--profile directory {tmp}/file/trace is not"),
        (["--rssm.deter", "200000"], "needs 1341.9 GiB, and an update at least twice that"),
        (["--collector", "--profile", "{tmp}/p"], "--profile does nothing with --collector: it"),
        (["--flops", "--updates=3"], "--updates does nothing with --flops: it applies to the"),
        (["--data_steps", "9"], "--data_steps does nothing with the learner (default): it applies"),
    ],
)
def test_bad_arguments_are_one_line_before_anything_runs(
    no_benchmark, tmp_path, capsys, args, fragment
):
    (tmp_path / "file").write_text("")
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert bench.main([*args, "--configs", "classic", "debug"]) == 2
    assert fragment.format(tmp=tmp_path) in one_line_error(capsys)


def test_a_profile_folder_is_not_made_when_another_check_fails(no_benchmark, tmp_path, capsys):
    argv = ["--profile", str(tmp_path / "prof"), "--task", "nope", "--configs", "classic", "debug"]
    assert bench.main(argv) == 2
    assert "unknown task 'nope'" in one_line_error(capsys)
    assert not (tmp_path / "prof").exists()


def test_options_and_config_overrides_are_told_apart():
    """`--replay.ongoing` is a config key, not the `--replay` mode; counts take 4e5; an
    abbreviation is left to the config (which names it as an unknown key)."""
    argv = ["--data_age", "--replay.ongoing", "true", "--data_steps", "4e5", "--configs",
            "classic", "debug", "--actor_ent", "-1e-3", "--no-record"]  # fmt: skip
    options, config_args = bench._parser().parse_known_args(argv)
    assert (options.mode, options.data_steps, options.record) == ("data_age", 400_000, False)
    assert config_args == [
        "--replay.ongoing", "true", "--configs", "classic", "debug", "--actor_ent", "-1e-3"
    ]  # fmt: skip
    assert bench._parser().parse_known_args(["--update", "5"])[1] == ["--update", "5"]


def test_data_age_that_samples_nothing_is_one_line_and_records_nothing(
    tmp_path, monkeypatch, capsys
):
    """50 steps, short of the prefill: no age was measured, so nothing is written."""
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    argv = ["--data_age", "--data_steps", "50", "--json", str(tmp_path / "figures.json")]
    assert bench.main([*argv, "--configs", "classic", "debug"]) == 2
    assert "no batch was sampled in 50 policy steps" in one_line_error(capsys)
    assert docs.read_text() == "# Benchmarks\n" and not (tmp_path / "figures.json").exists()
