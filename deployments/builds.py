"""Where a deployment's build context lives on this host (the package stage writes it).

Shared by the pipeline, which writes it, and the runtime, which serves from it:
the files are world-readable and read-only (sandboxes bind them without a copy),
the folders above them ServeML's alone.
"""

import tarfile
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage

from deployments import buildkit


def build_dir(deployment) -> Path:
    return settings.DATA_DIR / "builds" / str(deployment.public_id)


def restore_context(deployment) -> Path:
    """The build context on local disk, unpacked from storage when this host lacks it."""
    directory = build_dir(deployment)
    if not (directory / buildkit.CONFIG_FILE).exists() and deployment.artifact:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with default_storage.open(deployment.artifact, "rb") as handle:
            with tarfile.open(fileobj=handle, mode="r:gz") as archive:
                archive.extractall(directory, filter="data")  # keeps the files' 0444
    return directory
