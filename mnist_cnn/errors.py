"""The errors a user can fix: each message names the file or flag and what was expected.

The command-line tools print them as one line and exit with status 2.
"""


class InputError(ValueError):
    """Bad input from the user: a flag, a data file, a model file."""


class UsageError(InputError):
    """A flag or config value that cannot be used; the message names the flag."""


class DataError(InputError):
    """A data file or folder that cannot be used; the message names it."""


class ModelFileError(InputError):
    """A model file that is missing, unreadable or not a CNN of this package."""


class BackendError(UsageError):
    """Training under a Keras backend other than TensorFlow."""

    @classmethod
    def training(cls, what: str, backend: str) -> "BackendError":
        return cls(f"{what} needs KERAS_BACKEND=tensorflow (this process runs {backend}); "
                   "inference works under any backend")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped at that batch."""


class StorageError(RuntimeError):
    """A file could not be written (disk full, file too large, read-only); names the file.

    The previous version of that file is intact, and a killed or stopped run resumes
    once the cause is fixed: ``run_dir`` names the run to resume, where there is one (the
    command line turns it into the command to paste).
    """

    def __init__(self, message, run_dir=None):
        super().__init__(message)
        self.run_dir = run_dir


class Interrupted(Exception):
    """Ctrl-C during training; the run folder ``run_dir`` can be resumed."""

    def __init__(self, run_dir):
        super().__init__("interrupted")
        self.run_dir = run_dir
