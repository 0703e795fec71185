"""Errors a user can fix: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to change."""


class ConfigError(UserError):
    """A configuration value or key is invalid."""


class DataError(UserError):
    """A dataset is missing, empty or of the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint file is corrupt, of another architecture or of an unknown format."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; finished layers are kept on disk."""


class WeightsError(UserError):
    """Pretrained weights are missing (offline) or belong to another architecture."""
