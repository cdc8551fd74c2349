import io
import pickle

import joblib
import pytest

from deployments.allowlist import corpus, disallowed
from deployments.inspection import Global, InspectionError, scan_model_file
from tests import payloads

# The allowlist includes what operators added in the admin.
pytestmark = pytest.mark.django_db


def scan(data: bytes):
    return scan_model_file(io.BytesIO(data))


@pytest.mark.parametrize("name", sorted(corpus.MODELS))
@pytest.mark.parametrize("fmt", ["pickle", "joblib", "joblib-zlib", "joblib-lz4"])
def test_every_corpus_model_imports_only_allowlisted_names(name, fmt):
    model = corpus.MODELS[name]()
    buffer = io.BytesIO()
    if fmt == "pickle":
        pickle.dump(model, buffer)
    else:
        joblib.dump(model, buffer, compress={"joblib": 0, "joblib-zlib": 3, "joblib-lz4": ("lz4", 3)}[fmt])
    result = scan(buffer.getvalue())
    assert disallowed(result.globals) == []
    assert result.format == ("pickle" if fmt == "pickle" else "joblib")
    assert result.sklearn_version


@pytest.mark.parametrize(
    "name", [n for n in sorted(payloads.payloads("/tmp/x")) if n != "hidden after a valid estimator"]
)
def test_it_lists_the_dangerous_import_of_each_payload(name, tmp_path):
    canary = tmp_path / "canary"
    result = scan(payloads.payloads(canary)[name])
    refused = {str(g) for g in disallowed(result.globals)}
    assert refused, f"{name} passed the allowlist"
    assert not canary.exists()


def test_it_refuses_a_payload_hidden_after_a_valid_estimator(tmp_path):
    with pytest.raises(InspectionError, match="more data after the end of the model"):
        scan(payloads.payloads(tmp_path / "canary")["hidden after a valid estimator"])


def test_it_resolves_stack_global_operands_hidden_in_the_memo(tmp_path):
    result = scan(payloads.call("os", "system", "true", via_memo=True))
    assert Global("os", "system") in result.globals


def test_it_refuses_a_global_it_cannot_resolve_statically():
    with pytest.raises(InspectionError, match="cannot be resolved"):
        scan(payloads.computed_global())


def test_it_reads_the_scikit_learn_version_the_model_was_saved_with():
    import sklearn

    assert scan(pickle.dumps(corpus.random_forest())).sklearn_version == sklearn.__version__


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"scikit-learn==1.5.2\nthis is text\n", "not a model file ServeML can read"),
        (b"(lp0\nI1\na.", "protocol 0 or 1"),
        (b"\x89PNG\r\n\x1a\n....", "not a model file ServeML can read"),
    ],
)
def test_it_explains_files_that_are_not_models(data, message):
    with pytest.raises(InspectionError, match=message):
        scan(data)


def test_it_refuses_a_truncated_pickle():
    with pytest.raises(InspectionError, match="not a complete pickle"):
        scan(payloads.truncated(pickle.dumps(corpus.random_forest())))


def test_the_reviewed_allowlist_names_only_modules_of_the_packages_models_are_made_of():
    from deployments.allowlist import reviewed_globals

    # `_loss` is scikit-learn 1.5-1.8's name for sklearn._loss._loss: the loader imports it only under that.
    packages = {
        "sklearn",
        "numpy",
        "scipy",
        "pandas",
        "joblib",
        "builtins",
        "__builtin__",
        "copyreg",
        "collections",
        "datetime",
        "_codecs",
        "_loss",
    }
    outside = sorted(str(g) for g in reviewed_globals() if g.module.split(".")[0] not in packages)
    assert outside == []
    # Callables that run code or read files, even inside those packages, stay out.
    runs_code_or_reads_files = {
        "numpy.load",
        "numpy.testing._private.utils.runstring",
        "pandas.read_pickle",
        "builtins.eval",
        "builtins.exec",
        "builtins.getattr",
        "builtins.__import__",
        "numpy.core._ufunc_reconstruct",
    }
    assert runs_code_or_reads_files & {str(g) for g in reviewed_globals()} == set()


ARRAYS = {
    "float64": lambda np: np.arange(6.0).reshape(2, 3),
    "fortran order": lambda np: np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "big-endian": lambda np: np.arange(5, dtype=">f8"),
    "bool": lambda np: np.array([True, False]),
    "complex64": lambda np: np.arange(3, dtype=np.complex64),
    "longdouble": lambda np: np.arange(3, dtype=np.longdouble),
    "datetime64": lambda np: np.array(["2020-01-01", "2021-06-01"], dtype="datetime64[D]"),
    "unicode": lambda np: np.array(["a", "bcd"]),
    "bytes": lambda np: np.array([b"a", b"bcd"]),
    "structured": lambda np: np.zeros(3, dtype=[("a", "<i4"), ("b", "S3"), ("c", "<U2")]),
    "structured with objects": lambda np: np.array([(1, "x")], dtype=[("a", "<i4"), ("b", "O")]),
    "objects": lambda np: np.array(["a", 1, None, {"k": (1, 2)}], dtype=object),
    "nested objects": lambda np: np.array([np.arange(2), np.array(["x"], dtype=object)], dtype=object),
    "empty": lambda np: np.zeros((0, 3)),
    "zero-dimensional": lambda np: np.array(3.0),
    "matrix": lambda np: np.matrix([[1, 2], [3, 4]]),
}


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lz4", 3)], ids=str)
@pytest.mark.parametrize("kind", ARRAYS)
def test_it_reads_every_kind_of_array_joblib_writes(kind, compress):
    import numpy as np

    buffer = io.BytesIO()
    joblib.dump({"array": ARRAYS[kind](np), "after": "the array"}, buffer, compress=compress)
    result = scan(buffer.getvalue())
    assert result.format == "joblib"
    assert Global("joblib.numpy_pickle", "NumpyArrayWrapper") in result.globals
