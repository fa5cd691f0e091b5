import numpy as np

from dreamer_jax.report import open_loop_video


def test_open_loop_video_rows_and_error():
    truth = np.full((2, 3, 4, 5, 1), -0.5, np.float32)  # black
    prediction = np.full((2, 3, 4, 5, 1), 0.5, np.float32)  # white
    frames = open_loop_video(truth, prediction)
    assert frames.shape == (3, 12, 10, 1) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[:, :4], 0)  # truth row
    np.testing.assert_array_equal(frames[:, 4:8], 255)  # model row
    np.testing.assert_array_equal(frames[:, 8:], 255)  # error (1 - 0 + 1) / 2 = 1


def test_vector_observations_become_strips():
    truth = np.zeros((1, 2, 3), np.float32)
    frames = open_loop_video(truth, truth)
    assert frames.shape == (2, 24, 24, 1)
    np.testing.assert_array_equal(frames[:, :8], 127)  # 0 maps to mid-gray
