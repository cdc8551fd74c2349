"""What runs inside a model's own environment: the handler, its loader, the probe, the model server.

Nothing in this package is imported by ServeML's web or worker processes; the
files are copied next to the model (the build context, a sandbox's /work) and
run by the deployment's environment interpreter inside the sandbox, or in the
Lambda image. They use only the stdlib and the model's requirements.
"""

from pathlib import Path

HERE = Path(__file__).parent
PROBE = HERE / "probe.py"
MODEL_SERVER = HERE / "model_server.py"
LOADER = HERE / "serveml_loader.py"
HANDLER = HERE / "serveml_handler.py"
V2 = HERE / "serveml_v2.py"
TEMPLATE = HERE / "serveml_template.py"
USERNS = HERE / "serveml_userns.py"
KEYRING = HERE / "serveml_keyring.py"
TEMPLATES = HERE / "templates"
CONFIG_FILE = "serveml.json"
# What a build context holds besides the model, serveml.json and the Dockerfile.
HANDLER_FILES = {"serveml_handler.py": HANDLER, "serveml_loader.py": LOADER, "serveml_v2.py": V2}
