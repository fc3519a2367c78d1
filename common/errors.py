"""The one error hierarchy of fedtune.

Every message names what was expected and what arrived, so a user can fix the input
without reading the source.
"""


class FedtuneError(Exception):
    """Base class of every error fedtune raises on purpose."""


class ConfigError(FedtuneError, ValueError):
    """A run-config or node-config value is unknown, out of range or malformed."""


class DataError(FedtuneError, ValueError):
    """A data file or data set is missing, malformed or inconsistent with the federation."""


class AdapterMismatchError(FedtuneError, ValueError):
    """An adapter state does not match the model's trainable weights."""


class CheckpointError(FedtuneError, RuntimeError):
    """A checkpoint is missing, corrupt or from an incompatible run."""


class PrivacyBudgetError(FedtuneError, RuntimeError):
    """A privacy budget would be exceeded."""


class FieldError(FedtuneError, ValueError):
    """A message record's field is missing or holds another type than the protocol's (common/fields.py)."""
