class StageError(Exception):
    """A stage failed for a reason the user can act on; str(error) is shown to them."""


class TransientStageError(StageError):
    """A stage failed for a reason that may pass (network, throttling): the task retries it."""
