"""User-facing errors.

Every error a user can cause by what they pass (a wrong file, a missing key, a
broken dataset) is raised as a subclass of :class:`FourmEvalError`. The CLI
prints these as one readable message (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class FourmEvalError(Exception):
    """Base class for errors caused by the user's input or environment."""


class CheckpointError(FourmEvalError):
    """A checkpoint file is missing, unreadable, unsafe or does not fit the model."""


class ConfigError(FourmEvalError):
    """A configuration value or option is invalid."""


class PredictionsError(FourmEvalError):
    """A predictions file or folder is incomplete or holds files not in the task's format."""


class DownloadError(FourmEvalError):
    """A dataset file could not be fetched (host unreachable, HTTP error, connection lost past the retries)
    or unpacked (a broken or unsafe archive); the message names the URL or file and what to do."""


class ChecksumError(DownloadError):
    """A downloaded (or hand-placed) file's size or checksum differs from the published value; the file
    was moved aside (``DEST/.download/rejected/``) and is never extracted or used."""


class FourmEvalWarning(UserWarning):
    """A value was inferred from a partial signal (a file's kind, an architecture from
    tensor shapes); if the inference is wrong, so is the number. Shown loudly and
    written into the run's record."""
