"""The project's one logger: one object, several outputs (in the spirit of dreamerv3 `embodied`).

    logger = Logger("runs/pong/0", config.flat(), total_steps=..., action_repeat=4)
    logger.scalars({"model_loss": 1.2, "train_return": -20.0})
    logger.video("openl", frames)   # uint8 [T, H, W, C]; saved and logged at once
    logger.write(step)              # one log step: jsonl + TensorBoard + wandb
    logger.progress(step, {"updates_per_sec": 3.1, "train_return": -20.0})
    logger.close()

Outputs, all under `logdir`:
  metrics.jsonl      one JSON line per `write()`: {"step", "frames", **scalars}, flushed and
                     fsynced. JSON cannot hold NaN or inf, so non-finite scalars are written
                     as `null` (TensorBoard and wandb still get the float).
  events.out.tfevents.*  TensorBoard (tensorboardX), global_step = step.
  <name>_<step>.gif  one file per `video()` call, 10 fps.
  wandb/             wandb offline run (mode "offline", the default); "online" syncs to
                     project/entity; "disabled" skips wandb. The run id is kept in
                     wandb_run_id.txt so a restarted run continues the same wandb run.
                     Online mode fails fast with `WandbError` (no API key, or no server
                     within `WANDB_INIT_TIMEOUT_S`); a failed offline init only warns.
                     `commit()` (train calls it before each checkpoint) hands wandb the
                     step's row, which it holds open until a later step; wandb writes its
                     file every `WANDB_FLUSH_S`, so a kill -9 loses only the rows of the
                     last second, and those after the checkpoint the resumed run logs again.

Resume: an existing metrics.jsonl is appended to. With `resume_step`, lines with
step > resume_step are dropped first (the file is rewritten atomically) and TensorBoard
purges its events from later steps, so a run restarted from a checkpoint at `resume_step`
does not log any step twice. A malformed line (a crash mid-write, a damaged file) is
dropped with a warning naming the file and line.

Terminal: a tqdm bar over frames when stderr is a TTY of 40 columns or more (or
`progress=True`), moved between rows too (`train.Logging.tick`); otherwise no bar,
and each `write()` prints one plain line to stdout (headed by the step, the share of the run
done and, from the row's `fps`, the time left) so logs of runs under nohup stay readable.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import pathlib
import secrets
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from dreamer_jax.paths import DirectoryError, ensure_writable, naming, write_atomic

METRICS_FILE = "metrics.jsonl"
# How long wandb.init may wait for the server (wandb's own default, 90 s, looks like a hang).
WANDB_INIT_TIMEOUT_S = 20.0
# How often wandb writes its run file (wandb's default, 15 s, loses that much to a kill -9).
WANDB_FLUSH_S = 1.0
WANDB_ID_FILE = "wandb_run_id.txt"
VIDEO_FPS = 10
STRIP_FRAMES = 50
# Shown first in the plain per-write line; every other scalar follows in insertion order.
_HEADLINE = ("train_return", "eval_return", "fps", "updates_per_sec")
_RESERVED = ("step", "frames")


class LogdirError(DirectoryError):
    """The log directory cannot be created or written. The message is one line."""


class WandbError(RuntimeError):
    """wandb online mode cannot start (no API key, no server). The message is one line."""


class Logger:
    """Buffers scalars and writes them, once per log step, to every output.

    Args:
      logdir: created if missing; must be writable (else `LogdirError`, before any write).
      config_flat: flat config (`{"rssm.deter": 600, ...}`), stored as the wandb config.
      wandb_mode: "offline" (default, under `logdir`, no network), "online" or "disabled".
      wandb_project, wandb_entity: used by wandb ("" entity means wandb's default).
      run_name: wandb display name, completed with the run's short wandb id
        (`<run_name>-<id>`, e.g. `atari_pong-0-1a2b3c4d`); None lets wandb choose.
      wandb_group, wandb_tags, wandb_notes: the wandb run's group (a sweep or experiment
        name; "" for none), tags and notes.
      total_steps: agent steps of the whole run, for the progress bar total (0: unknown).
      action_repeat: env frames per agent step; `frames = step * action_repeat`.
      progress: True forces the tqdm bar, False forces plain lines, None picks the bar
        iff stderr is a TTY.
      quiet: shows no progress at all (neither bar nor lines), e.g. for all seeds of a
        many-seed run but the first.
      resume_step: the checkpoint step a restarted run continues from; logged steps
        after it are dropped (see the module docstring).
    """

    def __init__(
        self,
        logdir: str | pathlib.Path,
        config_flat: dict,
        wandb_mode: str = "offline",
        wandb_project: str = "dreamer-jax",
        wandb_entity: str = "",
        run_name: str | None = None,
        wandb_group: str = "",
        wandb_tags: Sequence[str] = (),
        wandb_notes: str = "",
        total_steps: int = 0,
        action_repeat: int = 1,
        progress: bool | None = None,
        resume_step: int | None = None,
        quiet: bool = False,
    ):
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, not {wandb_mode!r}")
        self.logdir = pathlib.Path(logdir)
        ensure_writable(self.logdir, "log directory", LogdirError)
        self.metrics_path = self.logdir / METRICS_FILE
        self.action_repeat = action_repeat
        self.total_steps = total_steps
        # The step of the latest write()/progress(); the default step of video().
        self.step = resume_step or 0
        self._scalars: dict[str, float] = {}
        self._postfix: dict[str, float] = {}
        # (step, time) of this process's first row: the time left is reckoned from there, as
        # the first row's own interval holds the prefill and the update's compile.
        self._first_row: tuple[int, float] | None = None
        self._bar = None
        self._use_bar = _wide_terminal(sys.stderr) if progress is None else progress
        self._quiet = quiet
        # tensorboardX's add_video needs moviepy; without it, videos go in as a frame strip.
        self._tb_video = importlib.util.find_spec("moviepy") is not None

        _truncate_metrics(self.metrics_path, resume_step)
        try:  # the directory may take files while this one refuses appends (immutable, ...)
            if self.metrics_path.exists():
                self.metrics_path.open("a").close()
        except OSError as error:
            raise LogdirError(
                f"metrics file {self.metrics_path} is not writable: {error.strerror or error}"
            ) from error
        # wandb first: an online init that raises then leaves no TensorBoard writer open.
        self._wandb = None
        self._wandb_row_open = False  # rows logged since the last commit
        if wandb_mode != "disabled":
            self._wandb = _init_wandb(
                self.logdir,
                config_flat,
                wandb_mode,
                run_name,
                project=wandb_project,
                entity=wandb_entity or None,
                group=wandb_group or None,
                tags=list(wandb_tags) or None,
                notes=wandb_notes or None,
            )
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(logdir=str(self.logdir), purge_step=purge)

    def scalar(self, name: str, value: float) -> None:
        """Buffers one scalar until `write()`; a later value for the same name replaces it."""
        if name in _RESERVED:
            raise ValueError(f"scalar name {name!r} is reserved for the step counters")
        self._scalars[name] = float(value)

    def scalars(self, mapping: dict[str, float]) -> None:
        """Buffers every `name: value` of `mapping` (see `scalar`)."""
        for name, value in mapping.items():
            self.scalar(name, value)

    def video(self, name: str, frames: np.ndarray, step: int | None = None) -> None:
        """Saves `frames` (uint8 [T, H, W, C], C 1 or 3) as `<logdir>/<name>_<step>.gif` and
        logs it to TensorBoard and wandb now. `step` defaults to `self.step`; "/" in `name`
        becomes "_" in the file name. Pillow merges identical consecutive frames (adding
        their durations), so the GIF plays for the right time but may hold fewer frames."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
            raise ValueError(
                f"video {name!r} must be uint8 [T, H, W, C] with C 1 or 3, "
                f"got {frames.dtype} {frames.shape}"
            )
        step = self.step if step is None else step
        path = self.logdir / f"{name.replace('/', '_')}_{step}.gif"
        with naming(path):
            save_gif(path, frames)
        if self._tb_video:
            # tensorboardX wants [N, T, C, H, W].
            clip = frames[None].transpose(0, 1, 4, 2, 3)
            self._tb.add_video(name, clip, global_step=step, fps=VIDEO_FPS)
        else:
            # [H, T*W, C] of at most STRIP_FRAMES evenly spaced frames (a long eval episode
            # would make an image tens of thousands of pixels wide).
            picked = frames[
                np.linspace(0, len(frames) - 1, min(len(frames), STRIP_FRAMES)).astype(int)
            ]
            strip = np.concatenate(list(picked), axis=1)
            self._tb.add_image(name, strip, global_step=step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            # From the GIF path: encoding a numpy array would need moviepy.
            self._wandb_log({name: wandb.Video(str(path))}, step=step)

    def write(self, step: int) -> dict[str, Any]:
        """Writes the buffered scalars as one log step to every output and clears the buffer.

        Returns the record appended to metrics.jsonl (non-finite values as None; TensorBoard
        gets only the finite ones)."""
        self.step = step
        scalars, self._scalars = self._scalars, {}
        record = {"step": step, "frames": step * self.action_repeat}
        record.update({k: v if math.isfinite(v) else None for k, v in scalars.items()})
        with naming(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())  # a crash after write() returns loses nothing
        for name, value in scalars.items():
            if math.isfinite(value):  # tensorboardX warns of each non-finite value
                self._tb.add_scalar(name, value, global_step=step)
        with naming(self._events_path()):
            self._tb.flush()
        if self._wandb is not None and scalars:
            self._wandb_log(scalars, step=step)
        if not (self._use_bar or self._quiet):
            header = _header(step, self.total_steps, self.action_repeat, self._eta_fps(step))
            print(_plain_line(header, scalars), flush=True)
        return record

    def _eta_fps(self, step: int) -> float | None:
        """Frames/s from this process's first row to `step`; None at the first row."""
        now = time.monotonic()
        if self._first_row is None or step <= self._first_row[0]:
            self._first_row = self._first_row or (step, now)
            return None
        first_step, first_time = self._first_row
        return (step - first_step) * self.action_repeat / max(now - first_time, 1e-9)

    def message(self, text: str) -> None:
        """Prints one line for the user on stdout (nothing if quiet)."""
        if not self._quiet:
            self._print_line(text, sys.stdout)

    def warning(self, text: str) -> None:
        """Prints one line on stderr (even when quiet)."""
        self._print_line(text, sys.stderr)

    def _print_line(self, text: str, stream: Any) -> None:
        """One line above the bar when there is one, where tqdm redraws the bar below it."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def progress(self, step: int, info: dict[str, float]) -> None:
        """Moves the progress bar to `step * action_repeat` frames and shows `info` (e.g.
        updates/s, last train/eval return; the latest value of each key stays shown). tqdm
        itself shows frames/s and the ETA. Without a bar this only records the step."""
        self.step = step
        if not self._use_bar or self._quiet:
            return
        frames = step * self.action_repeat
        if self._bar is None:
            from tqdm import tqdm

            total = self.total_steps * self.action_repeat or None
            # `initial` keeps a resumed run's rate and ETA from counting frames done before.
            self._bar = tqdm(
                total=total, initial=frames, unit="frame", unit_scale=True, dynamic_ncols=True
            )
        self._postfix.update({k: float(v) for k, v in info.items()})
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in self._postfix.items()}, refresh=False)
        self._bar.update(frames - self._bar.n)

    def end_progress(self) -> None:
        """Closes the bar (its last state stays on screen), so that the lines printed next
        start on a line of their own and the bar is not drawn again below them."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def commit(self) -> None:
        """Closes wandb's open row. wandb holds a step's row open for more values of that
        step until a later step is logged, so without this a run killed after a checkpoint
        would lose the checkpoint step's row for good (the resumed run starts after it).
        Call once the step's rows are all written: wandb drops later values of its step."""
        if self._wandb is not None and self._wandb_row_open:
            self._wandb_row_open = False
            self._wandb_log({}, commit=True)

    def _wandb_log(self, data: dict, **kwargs: Any) -> None:
        """`wandb.log`, and on its failure (its service gone) a warning and no wandb from
        then on: the files, TensorBoard and the checkpoints matter more than one output."""
        try:
            self._wandb.log(data, **kwargs)
        except Exception as error:
            self._wandb = None
            warnings.warn(f"wandb failed, continuing without it: {error}", stacklevel=3)
            return
        self._wandb_row_open = not kwargs.get("commit", False)

    def _events_path(self) -> pathlib.Path:
        return self.logdir / "events.out.tfevents.*"  # which one: tensorboardX's business

    def close(self) -> None:
        """Flushes and closes TensorBoard, finishes wandb and closes the bar. Idempotent."""
        in_flight = sys.exc_info()[1]  # closed on the way out of an error
        try:
            with naming(self._events_path()):
                self._tb.close()
        except OSError:
            # Events a failed write left buffered (a full disk) cannot be written: marked
            # written, or tensorboardX's exit hook would retry and print a traceback.
            for writer in (self._tb.all_writers or {}).values():
                writer.event_writer._closed = True
            self._tb.all_writers = self._tb.file_writer = None
            if in_flight is None:  # else that error, the write that failed first, is told
                raise
        finally:
            run, self._wandb = self._wandb, None
            try:
                if run is not None:
                    run.finish()
            finally:
                self.end_progress()


def _wide_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal big enough for the bar (tqdm draws nothing at all in
    a terminal that reports 0 columns or 0 rows, as some consoles and `script` do)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return stream.isatty() and size.columns >= 40 and size.lines >= 1
    except (OSError, ValueError):
        return False


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """Parses a metrics.jsonl file into one dict per line (non-finite values are None).

    A malformed line (an interrupted write, a damaged file) is skipped with a warning."""
    path = pathlib.Path(path)
    return [
        # The logger writes null for them; a NaN or Infinity literal comes from elsewhere.
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
        for _, r in _parse_metrics(path, _read_text(path))
    ]


def _read_text(path: pathlib.Path) -> str:
    # Damaged bytes only make their line malformed, instead of failing the whole file.
    return path.read_text(encoding="utf-8", errors="replace")


def _parse_metrics(path: pathlib.Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every well-formed non-blank line of `text`; a malformed one is
    skipped with a warning."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    parsed = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer step")
        except ValueError as error:
            where = "last line (interrupted write?)" if index == len(lines) - 1 else "line"
            warnings.warn(f"{path}:{number}: dropping malformed {where}: {error}", stacklevel=3)
            continue
        parsed.append((line, record))
    return parsed


def _truncate_metrics(path: pathlib.Path, resume_step: int | None) -> None:
    """Drops lines after `resume_step` and malformed lines, rewriting atomically. On a resume
    the file as it was is kept first, byte for byte, as
    `metrics_after_checkpoint/<resume_step>.jsonl` (`.1`, `.2`, ... if taken) beside it: the
    dropped rows are what the interrupted run logged."""
    if not path.exists():
        return
    text = _read_text(path)
    parsed = _parse_metrics(path, text)
    kept = [line for line, record in parsed if resume_step is None or record["step"] <= resume_step]
    expected = "".join(line + "\n" for line in kept)
    if text == expected:
        return
    if resume_step is not None:
        folder = path.with_name(path.stem + "_after_checkpoint")
        aside, tries = folder / f"{resume_step}.jsonl", 0
        while aside.exists():
            tries += 1
            aside = folder / f"{resume_step}.{tries}.jsonl"
        folder.mkdir(exist_ok=True)
        write_atomic(aside, path.read_bytes())
    write_atomic(path, expected.encode("utf-8"))


def check_wandb_key(mode: str, logdir: pathlib.Path) -> None:
    """Raises WandbError if `mode` is online and wandb finds no API key: without one,
    wandb.init would prompt, or fail only after several seconds. Needs no network."""
    if mode != "online":
        return
    try:
        import wandb

        has_key = _has_wandb_key(wandb)
    except Exception as error:  # e.g. a malformed key: wandb's own errors, one line
        reason = str(error).splitlines()[0] if str(error) else ""
        raise WandbError(
            f"wandb online mode cannot check the API key ({type(error).__name__}: {reason}); "
            + _offline_hint(logdir)
        ) from error
    if not has_key:
        raise WandbError(
            "wandb online mode needs an API key (WANDB_API_KEY or `wandb login`); "
            + _offline_hint(logdir)
        )


def _offline_hint(logdir: pathlib.Path) -> str:
    offline_runs = f"{logdir}/wandb/offline-run-*"
    return f"to log without a network use --wandb.mode offline, then `wandb sync {offline_runs}`"


def _init_wandb(
    logdir: pathlib.Path, config_flat: dict, mode: str, run_name: str | None, **options: Any
):
    """Starts (or resumes) the wandb run of `logdir`, named `<run_name>-<run id>`, with
    `options` (project, entity, group, tags, notes) passed to `wandb.init`. Online, any
    failure is a WandbError; offline, a failure only warns and the run continues without
    wandb."""
    hint = _offline_hint(logdir)
    try:
        import wandb

        # silent: no banners in CI logs; console off: the tqdm bar's carriage returns
        # would only clutter wandb's copy of the terminal.
        settings = wandb.Settings(
            silent=True,
            console="off",
            init_timeout=WANDB_INIT_TIMEOUT_S,
            x_transaction_log_flush_interval=WANDB_FLUSH_S,
        )
        check_wandb_key(mode, logdir)
        id_path = logdir / WANDB_ID_FILE
        if id_path.exists():
            run_id = id_path.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)  # wandb ids: short, lowercase alphanumeric
            id_path.write_text(run_id + "\n", encoding="utf-8")
        return wandb.init(
            name=None if run_name is None else f"{run_name}-{run_id}",
            config=config_flat,
            dir=str(logdir),
            mode=mode,
            id=run_id,
            resume="allow",
            # A many-seed run starts one wandb run per seed in this process; wandb's default
            # would hand every later seed the first seed's run.
            reinit="create_new",
            settings=settings,
            **options,
        )
    except WandbError:
        raise
    except Exception as error:
        message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        if mode == "online":
            raise WandbError(f"wandb online init failed ({message}); {hint}") from error
        warnings.warn(
            f"wandb offline init failed, continuing without wandb: {message}", stacklevel=3
        )
        return None


def _has_wandb_key(wandb) -> bool:
    """Whether wandb finds credentials (env, netrc or its settings), without the network."""
    wandb.setup(wandb.Settings(silent=True))  # login would print where it found the key
    return wandb.login(verify=False, prompt=False)


def save_gif(path: pathlib.Path, frames: np.ndarray) -> None:
    """Writes `frames` [T, H, W, C] as a looping GIF via a temp file and an atomic rename."""
    images = [Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame) for frame in frames]
    tmp = path.with_name(f".{path.name}.tmp")
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=1000 // VIDEO_FPS,
        loop=0,
    )
    os.replace(tmp, path)


def _header(step: int, total_steps: int, action_repeat: int, fps: float | None) -> str:
    """'[step 12000/400000 (3%) | frames 48000 | 1:02:03 left]': the total, the share done
    and the time left (the remaining frames at `fps`, frames/s) only where known."""
    frames = f"frames {step * action_repeat}"
    if not total_steps:
        return f"[step {step} | {frames}]"
    parts = [f"step {step}/{total_steps} ({100 * step / total_steps:.0f}%)", frames]
    if fps and math.isfinite(fps) and fps > 0:
        seconds = max(total_steps - step, 0) * action_repeat / fps
        days = seconds / 86400  # timedelta overflows past 1e9 days (--steps 1e15)
        left = f"{days:,.0f} days" if days >= 100 else datetime.timedelta(seconds=round(seconds))
        parts.append(f"{left} left")
    return f"[{' | '.join(parts)}]"


def _plain_line(header: str, scalars: dict[str, float]) -> str:
    """'<header> train_return 12 fps 2100 model_loss 1.23 ...': the headline scalars first."""
    order = [k for k in _HEADLINE if k in scalars] + [k for k in scalars if k not in _HEADLINE]
    return " ".join([header, *(f"{k} {scalars[k]:.4g}" for k in order)])


def seeds_line(seeds: Sequence[int], records: Sequence[dict[str, Any]]) -> str | None:
    """One line of every seed's returns in one log step of a many-seed run, e.g.
    'seeds 0 1 2: train_return 12.5 - 30 | eval_return 10 8 -' ('-': none logged in this step
    by that seed); None when no seed logged a return."""
    parts = []
    for key in ("train_return", "eval_return"):
        values = [record.get(key) for record in records]
        if any(value is not None for value in values):
            parts.append(" ".join([key, *("-" if v is None else f"{v:.4g}" for v in values)]))
    if not parts:
        return None
    return f"seeds {' '.join(map(str, seeds))}: {' | '.join(parts)}"
