class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad flag, bad file).

    The CLI prints these as one clear message without a traceback; everything else is a bug and keeps its traceback.
    """


class CheckpointError(UserError):
    """A checkpoint folder or file that cannot be loaded as it is."""
