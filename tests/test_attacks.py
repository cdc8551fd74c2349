"""Attacks on the layers behind the static scan, as someone who has read the source would try them.

- requirements.txt naming a package whose wheel holds a `.pth` file (code that runs whenever the
  environment's interpreter starts), served from the operator's index;
- a model file that the scan reads differently from joblib (so the scan misses an import): the
  restricted loader must still refuse it, in today's joblib and in an older one that loads object
  arrays with plain pickle.load;
- joblib's old NDArrayWrapper format, which loads a second pickle from a path named in the file.
"""

import base64
import hashlib
import http.server
import io
import pickle
import threading
import zipfile
from pathlib import Path

import joblib
import numpy
import pytest
import sklearn

from deployments import sandbox, services
from deployments.environments import ensure_environment
from deployments.inspection import scan_model_file
from deployments.pipeline import stages
from deployments.pipeline.errors import StageError
from deployments.requirements import RequirementsError, parse_requirements
from tests import payloads
from tests.conftest import SKLEARN_PIN

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]


# ------------------------------------------------------------------ a .pth wheel in requirements.txt


def pth_wheel(folder: Path, canary: Path) -> Path:
    """A valid wheel of `evil-pth` 1.0 holding nothing but a .pth line that creates `canary`
    and says, on stderr, which uid it ran as."""
    line = (
        f"import os, sys; sys.stderr.write('PTH-RAN uid=%d\\n' % os.getuid()); "
        f"open({str(canary)!r}, 'w').write('pwned')\n"
    )
    files = {
        "evil_pth.pth": line.encode(),
        "evil_pth-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: evil-pth\nVersion: 1.0\n",
        "evil_pth-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("evil_pth-1.0.dist-info/RECORD,,")
    files["evil_pth-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / "evil_pth-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def hostile_index(tmp_path):
    """A PEP 503 index on loopback serving only the .pth wheel, as the operator's index would."""
    canary = tmp_path / "host-only" / "canary"
    canary.parent.mkdir()
    root = tmp_path / "index"
    (root / "simple" / "evil-pth").mkdir(parents=True)
    wheel = pth_wheel(root, canary)
    (root / "simple" / "evil-pth" / "index.html").write_text(
        f'<html><body><a href="/{wheel.name}">{wheel.name}</a></body></html>'
    )
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple", canary
    server.shutdown()


def test_the_package_list_refuses_an_unreviewed_package_and_says_who_can_add_it(settings):
    with pytest.raises(
        RequirementsError,
        match="evil-pth is not on this ServeML's list of reviewed packages.*ask an operator to review it and add it",
    ):
        parse_requirements("evil-pth==1.0\nscikit-learn==1.5.2\n", allowed_packages=settings.SERVEML_ALLOWED_PACKAGES)
    parse_requirements(
        SKLEARN_PIN + "numpy\npandas\nscipy\njoblib\nskops\nthreadpoolctl\n",
        allowed_packages=settings.SERVEML_ALLOWED_PACKAGES,
    )


def test_a_pth_package_never_runs_on_the_host_while_its_environment_is_built(hostile_index, settings, tmp_path):
    index_url, canary = hostile_index
    settings.SERVEML_PACKAGE_INDEX_URL = index_url
    settings.DATA_DIR = tmp_path / "data"  # a fresh environment, built now
    environment = ensure_environment(parse_requirements("evil-pth==1.0\n"))
    assert not canary.exists()
    site = next(environment.path.glob("lib/python*/site-packages"))
    assert (site / "evil_pth.pth").exists()  # installed, so the interpreter runs it at every start
    # Started in the sandbox, it runs, as the deployment's uid, and cannot reach the host's folder.
    launched = sandbox.launch(
        uid=sandbox.uid_for(5),
        environment=environment.path,
        args=["-c", "pass"],
        limits=sandbox.Limits(memory_bytes=1024**3, cpu_seconds=10),
    )
    result = sandbox.run(launched, wall_seconds=30)
    assert f"PTH-RAN uid={65534}" in result.stderr.decode()  # nobody inside its own user namespace
    assert not canary.exists()
    # Sealed: owned by ServeML, nothing in it writable by the uid that compiled it.
    for path in environment.path.rglob("*"):
        if not path.is_symlink():
            assert path.stat().st_uid == 0 and not path.stat().st_mode & 0o022, path


# ------------------------------------------------------------------ scan fooled, loader holds


def joblib_with_hidden_call(canary: Path) -> bytes:
    """A real model plus an object array whose element calls os.system: joblib writes object
    arrays as a nested pickle, read by a second unpickler."""
    hidden = numpy.empty(1, dtype=object)
    hidden[0] = payloads.Reduce(__import__("os").system, f"touch {canary}")
    buffer = io.BytesIO()
    joblib.dump(
        {"model": __import__("deployments.allowlist.corpus", fromlist=["x"]).logistic_regression(), "extra": hidden},
        buffer,
    )
    return buffer.getvalue()


def as_if_the_scan_missed(deployment, model_bytes: bytes, missed: set[tuple[str, str]]):
    """What a scan fooled by a desynchronised stream would have recorded: everything but `missed`."""
    found = {(g.module, g.name) for g in scan_model_file(io.BytesIO(model_bytes)).globals}
    assert missed <= found  # today's scan does see it: we take it out on purpose
    services.deployment_update(deployment=deployment, allowed_globals=sorted(map(list, found - missed)))


@pytest.mark.parametrize("joblib_pin", ["", "joblib==1.5.2\n"])
def test_a_call_the_scan_missed_is_refused_by_the_loader_in_the_sandbox(user, make_deployment, tmp_path, joblib_pin):
    """joblib 1.6 reads object arrays with a second pure-Python unpickler, older ones with plain
    pickle.load (1.5 and older): both paths go through the restricted loader."""
    canary = tmp_path / "canary"
    model_bytes = joblib_with_hidden_call(canary)
    deployment = make_deployment(user, model_bytes=model_bytes, fmt="joblib", requirements=SKLEARN_PIN + joblib_pin)
    as_if_the_scan_missed(deployment, model_bytes, {("posix", "system")})
    stages.environment(deployment)
    with pytest.raises(StageError, match="imports posix.system, which ServeML did not check and allow"):
        stages.validate(deployment)
    assert not canary.exists()


def test_the_loader_maps_the_bare_loss_module_to_scikit_learns_own(tmp_path):
    """scikit-learn 1.5-1.8 pickle `_loss.<name>`; a top-level `_loss` module must never be imported."""
    import sys

    sys.path.insert(0, str(Path(stages.buildkit.LOADER).parent))
    try:
        import serveml_loader
    finally:
        sys.path.pop(0)
    data = b"\x80\x04" + payloads._str("_loss") + payloads._str("CyHalfSquaredError") + b"\x93)\x81."
    with serveml_loader.restricted([("_loss", "CyHalfSquaredError")]):
        loaded = pickle.loads(data)
    assert type(loaded).__module__ == "sklearn._loss._loss"
    with serveml_loader.restricted([]), pytest.raises(serveml_loader.RefusedGlobal):
        pickle.loads(data)
    assert pickle.loads(pickle.dumps({"a": 1})) == {"a": 1}  # restored afterwards


# ------------------------------------------------------------------ joblib's old NDArrayWrapper


def ndarray_wrapper_pointing_at(path: Path) -> bytes:
    """joblib < 0.10's format: the wrapper names a file that joblib loads with np.load(allow_pickle=True)."""

    def text(value: str) -> bytes:
        data = value.encode()
        return b"\x8c" + bytes([len(data)]) + data

    state = b"}(" + text("filename") + text(str(path)) + text("subclass") + text("ndarray") + b"u"
    return b"\x80\x04" + text("joblib.numpy_pickle_compat") + text("NDArrayWrapper") + b"\x93)\x81" + state + b"b."


def test_an_ndarray_wrapper_pointing_at_itself_or_another_upload_is_refused(user, make_deployment, tmp_path):
    canary = tmp_path / "canary"
    other_upload = make_deployment(user, model_bytes=payloads.call("os", "system", f"touch {canary}"))
    for target in (Path(other_upload.model_file.path), Path("model.pkl")):
        deployment = make_deployment(user, model_bytes=ndarray_wrapper_pointing_at(target))
        with pytest.raises(StageError, match="joblib.numpy_pickle_compat.NDArrayWrapper"):
            stages.inspect(deployment)
        # And were the scan fooled, the loader refuses it too.
        services.deployment_update(
            deployment=deployment,
            model_format="joblib",
            allowed_globals=[["joblib.numpy_pickle", "NumpyArrayWrapper"], ["numpy", "ndarray"]],
        )
        stages.environment(deployment)
        with pytest.raises(StageError, match="imports joblib.numpy_pickle_compat.NDArrayWrapper, which ServeML"):
            stages.validate(deployment)
    assert not canary.exists()
