import os

from django.apps import AppConfig
from django.conf import settings


class DeploymentsConfig(AppConfig):
    name = "deployments"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        # Data at rest (uploads, the SQLite database, build contexts, logs) is ServeML's alone:
        # every file this process creates is private unless the code says otherwise
        # (environments and build contexts are made readable on purpose, for the sandbox).
        os.umask(0o077)
        settings.DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        settings.DATA_DIR.chmod(0o700)
        settings.STATIC_ROOT.mkdir(exist_ok=True)  # WhiteNoise looks for it even when it is empty
        # Registered here, in every process: the system checks, and the Celery tasks, which
        # services send by name (tasks import services, so services never import tasks).
        from deployments import checks, tasks  # noqa: F401
