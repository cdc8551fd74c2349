"""Imports run one way: views/api/admin → services → pipeline and targets → models.

Tasks are thin (services and the runner); nothing imports upward, no import hides in a
function, and the web process never loads the aws target's SDKs (docker, boto3).
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "deployments"
HEAVY = ("docker", "boto3", "botocore")
WEB = ["deployments.views", "deployments.api", "deployments.admin", "deployments.urls", "serveml.urls"]

# Higher imports lower, never the other way. Modules not listed (inspection, sandbox,
# environments, builds, runtime, buildkit, allowlist, …) are tools the layers share:
# they import models at most.
RANKS = {
    "deployments.views": 5,
    "deployments.api": 5,
    "deployments.admin": 5,
    "deployments.forms": 5,
    "deployments.urls": 5,
    "deployments.signin": 5,
    "deployments.management": 5,
    "deployments.tasks": 4,
    "deployments.pipeline.runner": 3,
    "deployments.services": 2,
    "deployments.pipeline": 1,
    "deployments.targets": 1,
    "deployments.pipeline.errors": 0,  # the stage contract: every layer may raise or catch it
    "deployments.models": 0,
    "deployments.signatures": 0,
}
TOOLS = 0.5
# Django imports an app's modules in AppConfig.ready(), the one place that wires the layers.
WIRING = {"deployments.apps"}


def rank(module: str) -> float:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in RANKS:
            return RANKS[".".join(parts[:end])]
    return TOOLS


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(APP.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function?) for each deployments module `path` imports."""
    tree = ast.parse(path.read_text(), str(path))
    nested = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        found += [(name, node.lineno, id(node) in nested) for name in names if name.split(".")[0] == "deployments"]
    return found


def test_no_module_imports_a_layer_above_its_own():
    known = modules()
    upward = [
        f"{name} (line {line}) imports {imported}"
        for name, path in known.items()
        if name not in WIRING
        for imported, line, _ in imports(path, known)
        if rank(imported) > rank(name)
    ]
    assert upward == []


def test_the_layers_import_nothing_of_deployments_inside_functions():
    known = modules()
    hidden = [
        f"{name} (line {line}) imports {imported} inside a function"
        for name, path in known.items()
        if (rank(name) != TOOLS or name.startswith("deployments.runtime")) and name not in WIRING
        for imported, line, inside in imports(path, known)
        if inside
    ]
    assert hidden == []


def test_the_module_imports_form_no_cycle():
    known = modules()
    graph = {
        name: {imported for imported, _, inside in imports(path, known) if not inside and imported in known}
        for name, path in known.items()
    }
    cycles, state = [], {}

    def visit(name, trail):
        state[name] = "open"
        for imported in sorted(graph.get(name, ())):
            if state.get(imported) == "open":
                cycles.append(" → ".join([*trail[trail.index(imported) :], imported]))
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def loaded(*names: str) -> set[str]:
    """The modules a fresh interpreter holds after Django's setup and importing `names`."""
    code = (
        "import json, sys, django\n"
        "django.setup()\n"
        f"for name in {list(names)!r}:\n"
        "    __import__(name)\n"
        "print('MODULES', json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "serveml.settings"}
    env.pop("AWS_STORAGE_BUCKET_NAME", None)  # S3 storage would load boto3, and rightly
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("MODULES ")]
    return set(json.loads(line.removeprefix("MODULES ")))


def heavy(modules: set[str]) -> list[str]:
    return sorted(name for name in modules if name.split(".")[0] in HEAVY)


def test_the_web_process_never_loads_docker_or_boto3():
    assert heavy(loaded(*WEB)) == []


@pytest.mark.parametrize(
    "name",
    ["deployments.models", "deployments.services", "deployments.pipeline.stages", "deployments.targets.local"],
)
def test_below_the_aws_target_no_layer_loads_docker_or_boto3(name):
    assert heavy(loaded(name)) == []


def test_the_worker_loads_each_targets_stages_when_it_runs_them():
    modules = loaded("deployments.tasks")
    assert "deployments.targets.aws" not in modules and heavy(modules) == []
    code = (
        "import django; django.setup()\n"
        "from deployments.pipeline import runner\n"
        "print({target: [stage.value for stage, _ in runner.PIPELINES[target]] for target in ('local', 'aws')})\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "serveml.settings"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(
        {
            "local": ["inspect", "environment", "validate", "package", "provision", "verify"],
            "aws": ["inspect", "environment", "validate", "package", "build", "push", "provision", "verify"],
        }
    )
