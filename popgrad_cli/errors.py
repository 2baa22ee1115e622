"""The end states of a run, their exit codes, and the exceptions that carry them.

The exit codes are part of the command-line interface and documented in the
README; change them only with it.
"""

from __future__ import annotations

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_INVALID_CONFIG = 2
EXIT_DATA_ERROR = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 5

EXIT_CODES = {
    "completed": EXIT_COMPLETED,
    "failed": EXIT_FAILED,
    "invalid_config": EXIT_INVALID_CONFIG,
    "data_error": EXIT_DATA_ERROR,
    "diverged": EXIT_DIVERGED,
    "interrupted": EXIT_INTERRUPTED,
}


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm, with where it first appeared."""

    def __init__(self, epoch: int, step: int, quantity: str, value: float) -> None:
        super().__init__(f"non-finite {quantity} {value} at epoch {epoch}, step {step}")
        self.epoch = epoch
        self.step = step
        self.quantity = quantity
        self.value = value


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the run saved a checkpoint and stopped."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}; rerun into the same run directory to resume")
        self.signal_name = signal_name


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, or that was made with another config."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
