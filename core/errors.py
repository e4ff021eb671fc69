"""Every error a user's input or a busy resource can end a command with, in one place.

A command ends on one of these with `error: MESSAGE` (`pipeline.runs.user_errors`), never a
traceback: each message names the file, line, key or run and what was expected. Any other
exception is a bug and keeps its traceback. The modules that raise them import them from here.
"""
from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input, named in the message: what a user can fix by changing a key, a file or a command."""


class ConfigError(UserError):
    """A config key with an unknown name, a wrong type or a value out of range; the message names the key."""


class RoutingError(UserError):
    """An override no stage can take as given; the message says what to write instead."""


class DataError(UserError):
    """Bad input data; the message names the file (and line) and what was expected."""


class StaleArtifactError(UserError):
    """An artifact made from inputs whose fingerprints no longer match the files on disk."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, unsafe to load, or made from other data or settings."""


class RecordError(UserError):
    """A run record that cannot be used; the message names the file and what is wrong with it."""


class SettingsMismatch(UserError):
    """A recorded run made with other settings than this invocation's; the message names the run,
    the keys that differ and how to proceed."""


class BusyError(RuntimeError):
    """Another process holds the lock of what this one was about to write; `path` is the lock file
    (a caller that would rather wait takes `exclusive_lock(path)`, then tries again)."""

    def __init__(self, path: Path, what: str = ""):
        super().__init__(f"{path}: held by another process{f' ({what})' if what else ''}")
        self.path = Path(path)


class TrainingPaused(RuntimeError):
    """Not an error: a training stopped at an epoch end because the process's time limit passed; its
    resume file holds everything to continue it exactly (the command exits with PAUSED_EXIT_CODE)."""


PAUSED_EXIT_CODE = 75  # EX_TEMPFAIL: run the same command again to continue
