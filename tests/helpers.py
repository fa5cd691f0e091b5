"""Small builders shared by the learner tests (not a test module), and the flax convolution
reference of the image encoder and decoder (tests/test_networks.py, scripts/bench_conv.py)."""

import json
import pathlib
import time
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dreamer_jax.agent import Agent
from dreamer_jax.config import make_config

VECTOR_SIZE, NUM_ACTIONS = 4, 3

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(*presets, **overrides):
    return make_config(["classic", "debug", *presets], overrides)


def vector_agent(config=None) -> Agent:
    config = config or tiny_config()
    return Agent(config, {"vector": ((VECTOR_SIZE,), np.float32)}, NUM_ACTIONS, discrete=True)


def structured_batch(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A learnable fixed batch: observations and rewards are smooth functions of a phase
    that the actions advance, so the model loss can fall well below its initial value."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, NUM_ACTIONS, (batch, length))
    phase = np.cumsum(actions, 1) * 0.4 + rng.uniform(0, 6, (batch, 1))
    vector = np.stack([np.sin(phase), np.cos(phase), np.sin(2 * phase), actions / 2], -1)
    is_terminal = np.zeros((batch, length), bool)
    is_terminal[0, -1] = True
    return {
        "vector": vector.astype(np.float32),
        "action": np.eye(NUM_ACTIONS, dtype=np.float32)[actions],
        "reward": np.cos(phase).astype(np.float32),
        "is_first": np.zeros((batch, length), bool),
        "is_last": is_terminal.copy(),
        "is_terminal": is_terminal,
    }


def traced_eqns(fn, *args) -> list:
    """Every equation of `fn`'s jaxpr, nested jaxprs (jit, scan, checkpoint, ...) included."""
    # scripts/bench.py (on pytest's pythonpath) owns the jaxpr walker. Imported here, not at
    # the top, so that subprocesses that put only tests/ on sys.path can import this module.
    import bench  # noqa: PLC0415

    return [eqn for eqn, _, _ in bench.jaxpr_equations(fn, *args)]


def looped_eqns(fn, *args) -> list:
    """The equations of `fn`'s jaxpr (nested ones included) that run inside a loop, more than
    once per call."""
    import bench  # noqa: PLC0415  (see traced_eqns)

    return [eqn for eqn, trips, _ in bench.jaxpr_equations(fn, *args) if trips > 1]


def product_input_dtypes(fn, *args) -> set[jnp.dtype]:
    """The operand dtypes of every matmul and convolution `fn` runs (nested jaxprs too)."""
    return {
        v.aval.dtype
        for eqn in traced_eqns(fn, *args)
        if eqn.primitive.name in ("dot_general", "conv_general_dilated")
        for v in eqn.invars
    }


def wandb_history(run_file: pathlib.Path, finished: bool = True) -> list[dict]:
    """The history rows (`{"_step": ..., key: value}`) a wandb `.wandb` file holds.

    `finished`: the run ended normally, so its file ends with an `exit` record. wandb's own
    process may still be writing it when `run.finish()` has returned (and the CLI has
    exited), so this waits up to 30 s for that record.

    wandb ships no reader for its run files, so this one follows their format (LevelDB's log):
    a 7-byte header, then 32 KiB blocks of records, each a 7-byte header (CRC, length, type)
    and its data; a record longer than a block's rest is split in parts (types 2-4), and a
    block's last < 7 bytes are padding. Each record's data is a `wandb.proto` Record."""
    from wandb.proto import wandb_internal_pb2  # noqa: PLC0415 (wandb is slow to import)

    deadline = time.monotonic() + 30
    while True:
        data, block, pos, part, records = run_file.read_bytes(), 32768, 7, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            if pos + 7 + length > len(data):  # a record wandb is still writing
                break
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 0 and length == 0:  # the rest of the block is empty
                pos += -pos % block
                continue
            part = chunk if kind in (1, 2) else part + chunk
            if kind in (1, 4):  # a whole record, or its last part
                records.append(wandb_internal_pb2.Record.FromString(part))
        kinds = [record.WhichOneof("record_type") for record in records]
        if not finished or "exit" in kinds:
            break
        assert time.monotonic() < deadline, f"{run_file}: no exit record after 30 s"
        time.sleep(0.2)
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
        for record in records
        if record.WhichOneof("record_type") == "history"
        for items in [record.history.item]
    ]


_glorot = nn.initializers.xavier_uniform()


class FlaxConvEncoder(nn.Module):
    """The reference: the encoder built from flax's `nn.Conv` (the project's code before the
    matmul lowering; scripts/bench_conv.py times it too)."""

    depth: int = 48
    kernels: Sequence[int] = (4, 4, 4, 4)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image):
        lead = image.shape[:-3]
        x = image.reshape(-1, *image.shape[-3:]).astype(self.dtype)
        for i, kernel in enumerate(self.kernels):
            conv = nn.Conv(2**i * self.depth, (kernel, kernel), 2, "VALID", dtype=self.dtype,
                           kernel_init=_glorot)  # fmt: skip
            x = nn.elu(conv(x))
        return x.reshape(*lead, -1)


class FlaxConvDecoder(nn.Module):
    """The reference decoder, from flax's `nn.ConvTranspose` (which does not flip kernels)."""

    channels: int
    depth: int = 48
    kernels: Sequence[int] = (5, 5, 6, 6)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, feat):
        lead = feat.shape[:-1]
        x = nn.Dense(32 * self.depth, dtype=self.dtype, kernel_init=_glorot)(
            feat.astype(self.dtype)
        )
        x = x.reshape(-1, 1, 1, 32 * self.depth)
        for i, kernel in enumerate(self.kernels):
            last = i == len(self.kernels) - 1
            depth = self.channels if last else 2 ** (len(self.kernels) - i - 2) * self.depth
            conv = nn.ConvTranspose(depth, (kernel, kernel), (2, 2), "VALID", dtype=self.dtype,
                                    kernel_init=_glorot)  # fmt: skip
            x = conv(x)
            x = x if last else nn.elu(x)
        return x.reshape(*lead, *x.shape[1:])
