"""Host-side pictures for the logs: the open-loop prediction video (SPEC §6)."""

from __future__ import annotations

import numpy as np


def open_loop_video(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Rows truth / model / error = (model − truth + 1)/2, sequences side by side.

    Args:
      truth, prediction: `[B, T, H, W, C]` images in [-0.5, 0.5], or `[B, T, D]` vectors
        (drawn as a `D`-cell strip, scaled from [-1, 1], so vector tasks get a picture too).
    Returns:
      uint8 frames `[T, 3·H, B·W, C]`.
    """
    if truth.ndim == 3:
        truth, prediction = (_vector_frames(x) for x in (truth, prediction))
    else:
        truth, prediction = truth + 0.5, prediction + 0.5
    error = (prediction - truth + 1.0) / 2.0
    rows = np.concatenate([truth, prediction, error], 2)  # [B, T, 3H, W, C]
    frames = np.concatenate(list(rows), 2)  # [T, 3H, B·W, C]
    return (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def _vector_frames(vectors: np.ndarray, cell: int = 8) -> np.ndarray:
    """`[B, T, D]` -> `[B, T, cell, D·cell, 1]` in [0, 1]."""
    values = (np.clip(vectors, -1.0, 1.0) + 1.0) / 2.0
    strip = np.repeat(values[..., None, :], cell, -2)
    return np.repeat(strip, cell, -1)[..., None]
