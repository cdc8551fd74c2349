"""The deployment pipeline: plain, idempotent stage functions run in order.

`run` is what the Celery task calls. Each stage takes the deployment, returns
a one-line summary for the event log (or raises StageError with a message for
the user), and may record extra events; `run` times it and records the event.
"""

from deployments.pipeline.runner import run

__all__ = ["run"]
