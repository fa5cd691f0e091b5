"""Micro-benchmark: the image encoder and decoder against today's flax convolution layers.

    python scripts/bench_conv.py [--sizes atari debug] [--repeats 3] [--precision 32|bf16]
    python scripts/bench_conv.py --seeds 4 --frames 64   # N seeds under vmap vs N calls

Times forward + backward (jit, `jax.value_and_grad` of a sum-of-squares loss) of
`ConvEncoder` / `ConvDecoder` (matmul lowering) and of the same stacks built from flax's
`nn.Conv` / `nn.ConvTranspose` (the reference tests/test_networks.py checks them against, in
tests/helpers.py), with the same parameters and inputs. Gradients are taken as a world-model
update needs them: the encoder's w.r.t. its parameters, the decoder's w.r.t. its parameters
and its input features. Sizes come from the config presets (`atari`: 16×50 frames, depth 48;
`debug`: 4×10 frames, depth 4). The two versions run interleaved (A, B, A, B, ...) and the
best of `--repeats` is kept, so a busy machine slows both alike. GFLOP are XLA's cost
analysis of each compiled function (the matmul lowering also counts the zeros it
multiplies); the reference's count is the useful work.

`--seeds N` times, for both lowerings, one `jax.vmap`ped call over N seeds (each its own
parameters and `--frames` frames, as the N-seed update runs them) against N single calls:
per-seed weights turn flax's convolutions into grouped convolutions, the matmul lowering
into batched matmuls.

Like `dreamer-train`, the script starts with `startup.prepare()` (huge pages, Eigen dots on
CPU), so the figures are those training gets.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreamer_jax.config import make_config
from dreamer_jax.networks import ConvDecoder, ConvEncoder
from dreamer_jax.startup import prepare

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import FlaxConvDecoder, FlaxConvEncoder  # noqa: E402

PRESETS = {"atari": ["atari"], "debug": ["atari", "debug"]}


def cases(size: str, dtype: jnp.dtype):
    """(name, new module, reference module, input, grad argnums) for the encoder and decoder at
    the preset's batch × length frames."""
    config = make_config(PRESETS[size])
    frames = config.dataset.batch * config.dataset.length
    rssm = config.rssm
    feat = rssm.stoch * rssm.discrete + rssm.deter
    enc, dec = config.encoder, config.decoder
    image = jax.random.uniform(jax.random.key(0), (frames, 64, 64, 1)) - 0.5
    features = jax.random.normal(jax.random.key(1), (frames, feat))
    return [
        (
            "encoder",
            ConvEncoder(enc.cnn_depth, enc.cnn_kernels, dtype),
            FlaxConvEncoder(enc.cnn_depth, enc.cnn_kernels, dtype),
            image,
            0,
        ),
        (
            "decoder",
            ConvDecoder(1, dec.cnn_depth, dec.cnn_kernels, dtype),
            FlaxConvDecoder(1, dec.cnn_depth, dec.cnn_kernels, dtype),
            features,
            (0, 1),
        ),
    ]


def compile_step(module, params, x, argnums):
    """The compiled `value_and_grad` of `sum(module(x)²)` and its XLA FLOP count."""
    loss = lambda p, x: jnp.sum(jnp.square(module.apply(p, x).astype(jnp.float32)))
    compiled = jax.jit(jax.value_and_grad(loss, argnums)).lower(params, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return compiled, float(cost["flops"])


def max_relative_difference(a, b) -> float:
    """Max over leaves of max|a − b| / max|b|."""
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)),
        jax.tree.map(np.asarray, a),
        jax.tree.map(np.asarray, b),
    )
    return max(jax.tree.leaves(diffs))


def bench(size: str, repeats: int, dtype: jnp.dtype) -> None:
    for name, new, ref, x, argnums in cases(size, dtype):
        params = ref.init(jax.random.key(2), x)
        # Random, not init, parameters: init biases are zero and would hide bias mistakes.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        params = tree.unflatten(
            [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
        )
        steps = {"flax conv": compile_step(ref, params, x, argnums)}
        steps["matmul"] = compile_step(new, params, x, argnums)
        results = {impl: jax.block_until_ready(fn(params, x)) for impl, (fn, _) in steps.items()}
        difference = max_relative_difference(results["matmul"], results["flax conv"])
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(repeats):
            for impl, (fn, _) in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, x))
                best[impl] = min(best[impl], time.perf_counter() - start)
        for impl, (_, flops) in steps.items():
            speedup = best["flax conv"] / best[impl]
            print(
                f"| {size} ({x.shape[0]} frames) | {name} | {impl} | {1000 * best[impl]:.1f} | "
                f"{flops / 1e9:.2f} | {flops / 1e9 / best[impl]:.1f} | {speedup:.2f}× |",
                flush=True,
            )
        print(f"(max relative difference of loss and gradients: {difference:.1e})", flush=True)


def bench_seeds(num_seeds: int, frames: int, repeats: int, dtype: jnp.dtype) -> None:
    for name, new, ref, x, argnums in cases("atari", dtype):
        x = x[:frames]
        params = ref.init(jax.random.key(2), x)
        seed_params = jax.vmap(lambda k, ref=ref, x=x: ref.init(k, x))(
            jax.random.split(jax.random.key(4), num_seeds)
        )
        seed_x = jnp.stack([x] * num_seeds)
        for impl, module in (("flax conv", ref), ("matmul", new)):
            single, _ = compile_step(module, params, x, argnums)
            loss = lambda p, x, m=module: jnp.sum(jnp.square(m.apply(p, x).astype(jnp.float32)))
            batched = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums)))
            jax.block_until_ready(batched(seed_params, seed_x))
            best_single = best_batched = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(num_seeds):
                    jax.block_until_ready(single(jax.tree.map(lambda a, i=i: a[i], seed_params), x))
                best_single = min(best_single, time.perf_counter() - start)
                start = time.perf_counter()
                jax.block_until_ready(batched(seed_params, seed_x))
                best_batched = min(best_batched, time.perf_counter() - start)
            print(
                f"| {name} | {impl} | {num_seeds} × {frames} | {1000 * best_single:.0f} | "
                f"{1000 * best_batched:.0f} | {best_single / best_batched:.2f}× |",
                flush=True,
            )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(PRESETS), default=["atari", "debug"])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per version")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--seeds", type=int, default=0, help="N seeds: vmap vs N calls")
    parser.add_argument("--frames", type=int, default=64, help="frames per seed (--seeds)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if args.seeds:
        print("| net | lowering | seeds × frames | N calls ms | vmap ms | vmap speedup |")
        print("|---|---|---|---|---|---|")
        bench_seeds(args.seeds, args.frames, args.repeats, dtype)
        return 0
    print("| size | net | lowering | ms (best) | XLA GFLOP | GFLOP/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        bench(size, args.repeats, dtype)
    return 0


if __name__ == "__main__":
    prepare()  # as dreamer-train does: measure what training gets
    sys.exit(main(sys.argv[1:]))
