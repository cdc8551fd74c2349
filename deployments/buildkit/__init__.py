"""What runs inside a model's own environment: the generated handler and the probe.

Nothing in this package is imported by ServeML's web or worker processes; the
files are rendered or copied next to the model and run by the deployment's
environment interpreter inside the sandbox.
"""

from pathlib import Path

HERE = Path(__file__).parent
PROBE = HERE / "probe.py"
MODEL_SERVER = HERE / "model_server.py"
TEMPLATES = HERE / "templates"
