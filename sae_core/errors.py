class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad flag, bad file).

    The CLI prints these as one clear message without a traceback; everything else is a bug and keeps its traceback.
    """


class CheckpointError(UserError):
    """A checkpoint folder or file that cannot be loaded as it is."""


class InputValueError(UserError, ValueError):
    """A bad argument value at the SparseCoder API (wrong shape, index out of range, zero total variance).

    A ValueError for library users, and a UserError so the trainer and the CLI report it in one line."""


class InputTypeError(UserError, TypeError):
    """A bad argument type at the SparseCoder API (not the backend's array type, wrong dtype)."""
