"""What a training run shows while it runs: a progress line with ETA, and an optional profile."""

import sys
import time


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """On a terminal one line rewritten in place (evaluations stay on screen); otherwise one
    line every `log_every` steps. Steps are numbered from 0, as in the metrics and checkpoint
    names (step_N is saved after step N). ETA = mean wall time per step since the first step
    (which compiles), evaluations and saves included."""

    def __init__(self, steps: int, log_every: int, stream=None):
        self.steps, self.log_every = steps, log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.clock: tuple[float, int] | None = None  # (time, step) after the first step
        self.open_line = False  # a terminal line that the next step rewrites

    def show(self, record: dict) -> None:
        step, last = record["step"], record["step"] == self.steps - 1
        line = (f"step {step:>5}/{self.steps - 1}  loss {record['loss']:.4f}  "
                f"lr {record['lr']:.2e}  |g| {record['grad_norm']:.3f}  "
                f"{record['tokens_per_s']:,.0f} tok/s")
        if "eval_loss" in record:
            line += f"  eval {record['eval_loss']:.4f}"
        now = time.perf_counter()
        if self.clock is None:
            self.clock = (now, step)
        elif not last:
            eta = (now - self.clock[0]) / (step - self.clock[1]) * (self.steps - 1 - step)
            line += f"  ETA {format_eta(eta)}"
        if self.tty:
            end = "\n" if "eval_loss" in record or last else ""
            print("\r" + line + "\x1b[K", end=end, file=self.stream, flush=True)
            self.open_line = not end
        elif step % self.log_every == 0 or last or "eval_loss" in record:
            print(line, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """One line of its own (a checkpoint saved), below the progress line."""
        print(("\n" if self.open_line else "") + text, file=self.stream, flush=True)
        self.open_line = False


class Profile:
    """A jax.profiler trace of the steps `first + 1 .. first + 3` (the first one compiles)."""

    def __init__(self, directory: str | None, first: int):
        self.directory, self.start, self.stop, self.on = directory, first + 1, first + 3, False

    def after(self, step: int, last: bool) -> None:
        """Call after each step: starts before step `start`, stops after step `stop`."""
        import jax

        if self.directory and step == self.start - 1 and not last:
            jax.profiler.start_trace(self.directory)
            self.on = True
        elif self.on and (step == self.stop or last):
            self.close()
            print(f"profile of steps {self.start}..{step} written to {self.directory} "
                  "(open with TensorBoard's profile plugin or Perfetto)")

    def close(self) -> None:
        if self.on:
            import jax

            self.on = False
            jax.profiler.stop_trace()
