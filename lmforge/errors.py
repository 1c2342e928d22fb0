"""One error hierarchy for lmforge.

Every error a user can cause (a bad config, a missing file, an unsupported
architecture) is an `LMForgeError` whose message says what went wrong and how
to fix it, so the CLI and server can show it instead of a raw traceback.
"""


class LMForgeError(Exception):
    """Base class of every error lmforge raises on purpose."""


class ConfigError(LMForgeError, ValueError):
    """A model configuration is inconsistent (e.g. heads do not divide the hidden size)."""


class CheckpointError(LMForgeError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model."""


class UnsupportedError(LMForgeError):
    """An architecture, head, tensor type or option that lmforge does not implement."""


class ModelNotFoundError(LMForgeError, FileNotFoundError):
    """A model reference resolves to nothing (no embedded model, folder or file of that name)."""


class InputError(LMForgeError, ValueError):
    """Inputs that the model cannot process (e.g. longer than its maximum positions)."""


class ValidationError(InputError):
    """A request or parameter has an invalid value; the message names the field."""


def require_counts(owner: str, values: dict[str, object]) -> None:
    """Raise a ValidationError naming `owner.field` for the first value that is not an integer >= 1.

    Leave out optional fields that are None.
    """
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValidationError(f"{owner}.{name} must be an integer >= 1, got {value!r}.")


class KVCacheError(LMForgeError, RuntimeError):
    """The KV block bookkeeping was driven wrongly (a double free, allocating without room): an engine bug."""


class DistributedError(LMForgeError, RuntimeError):
    """A process of a multi-process job (a tensor-parallel worker) died or could not start."""
