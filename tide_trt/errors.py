"""User-facing error types: anything raised as TideError is reported as one clear line, no traceback."""


class TideError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched checkpoint)."""


class ConfigError(TideError):
    """Invalid configuration value or unknown key."""


class CheckpointError(TideError):
    """A draft checkpoint is missing, corrupt or does not match the target."""


class RequestError(TideError):
    """A generation request has an invalid field."""
