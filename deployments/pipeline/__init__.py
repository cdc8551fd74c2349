"""The deployment pipeline: plain, idempotent stage functions run in order.

`runner.run` is what the Celery task calls. Each stage takes the deployment, returns
a one-line summary for the event log (or raises StageError with a message for the
user), and may record extra events; the runner times it and records the event. The
stages every target shares are in `stages`; each target's own are in deployments/targets/.
"""
