"""A sample of the compatibility matrix (deployments/allowlist/compat.py, `make compat`) through ServeML's
real pipeline: one estimator per scikit-learn family, generated in the sandbox by the oldest and the newest
supported release in turn, in a format that turns too, so that each of the two releases meets all four
formats. Each file goes through inspect (scan + allowlist), environment (uv, binary wheels, cached in the
data folder's envs/) and validate (the probe with the restricted loader in the sandbox), and must predict
exactly what the fitted model predicted in the generator. The full matrix is `make compat`."""

import io
import pickle
import sys
from pathlib import Path

import pytest

from deployments import buildkit, services
from deployments.allowlist import compat, pack_globals, packs, review, reviewed_globals
from deployments.inspection import Global, scan_model_file
from deployments.models import AllowedPackage, Deployment
from deployments.pipeline import stages
from deployments.pipeline.errors import StageError
from tests import payloads
from tests.conftest import upload

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]

OLDEST, NEWEST = compat.RELEASES_BY_LABEL["1.2.2"], compat.RELEASES_BY_LABEL["1.9.1"]
# The bare `_loss` module is written by 1.5.2-1.8.0 only.
LOSS_RELEASE = compat.RELEASES_BY_LABEL["1.6.1"]
# One estimator per family; each has predict, as the probe asks it to.
SAMPLE = {
    "linear_model": "SGDClassifier",
    "tree": "DecisionTreeRegressor",
    "ensemble: forests": "RandomForestClassifier",
    "ensemble: gradient boosting": "GradientBoostingClassifier",
    "ensemble: histogram gradient boosting": "HistGradientBoostingRegressor",
    "ensemble: stacking": "StackingClassifier",
    "neighbors": "KNeighborsClassifier",
    "svm": "SVC",
    "naive_bayes": "GaussianNB",
    "neural_network": "MLPClassifier",
    "gaussian_process": "GaussianProcessRegressor",
    "discriminant_analysis": "QuadraticDiscriminantAnalysis",
    "cluster": "BisectingKMeans",
    "covariance": "EllipticEnvelope",
    "mixture": "GaussianMixture",
    "semi_supervised": "LabelSpreading",
    "multiclass": "OutputCodeClassifier",
    "multioutput": "MultiOutputRegressor",
    "calibration": "CalibratedClassifierCV",
    "model_selection": "HalvingGridSearchCV",
    "compose": "TransformedTargetRegressor",
    "kernel_ridge": "KernelRidge",
    "dummy": "DummyClassifier",
    "cross_decomposition": "PLSRegression",
    "feature_selection": "Pipeline[SelectKBest,LogisticRegression]",
    "preprocessing": "Pipeline[SplineTransformer,Ridge]",
    "decomposition": "Pipeline[PCA,LogisticRegression]",
    "impute": "Pipeline[IterativeImputer,LinearRegression]",
    "manifold": "Pipeline[Isomap,LogisticRegression]",
    "kernel_approximation": "Pipeline[Nystroem,LogisticRegression]",
}
UPLOAD_FORMAT = {"pickle": "pickle", "joblib": "joblib", "joblib-zlib": "joblib", "skops": "skops"}


def plan():
    """[(release, estimator, format)]: each family once, alternately from the oldest and the newest
    release, the format turning every two families, so that each release meets every format."""
    return [
        ((OLDEST, NEWEST)[number % 2], name, compat.FORMATS[(number // 2) % len(compat.FORMATS)])
        for number, name in enumerate(SAMPLE.values())
    ]


@pytest.fixture(scope="module")
def generated():
    """{release label: {estimator: record}}, generated in each release's environment, in the sandbox."""
    wanted = {
        OLDEST.label: {"GradientBoostingClassifier"},
        NEWEST.label: set(),
        LOSS_RELEASE.label: {"HistGradientBoostingClassifier"},
    }
    for release, name, _ in plan():
        wanted[release.label].add(name)
    out = {}
    for release in (OLDEST, NEWEST, LOSS_RELEASE):
        env = compat.environment(release)
        out[release.label] = compat.generate(release, env, only=sorted(wanted[release.label]))
    return out


def model_bytes(release, record, fmt) -> bytes:
    return (compat.release_dir(release) / "files" / record["files"][fmt]["file"]).read_bytes()


def deploy(user, release, record, fmt) -> Deployment:
    """inspect, environment, validate: the real stages, in order, on the real files."""
    deployment = services.deployment_create(
        owner=user,
        name=f"{release.label} {record['estimator']} {fmt}",
        target="local",
        model_format=UPLOAD_FORMAT[fmt],
        model_upload=upload(model_bytes(release, record, fmt), f"model.{fmt}"),
        requirements_upload=upload("\n".join(release.requirements).encode() + b"\n", "requirements.txt"),
    )
    for stage in (stages.inspect, stages.environment, stages.validate):
        stage(deployment)
    deployment.refresh_from_db()
    return deployment


def test_one_estimator_per_family_from_the_oldest_and_newest_release_deploys_in_every_format(user, generated):
    failures = []
    for release, name, fmt in plan():
        record = generated[release.label][name]
        assert "unfit" not in record, f"{release.label} {name}: {record['unfit']}"
        assert record["probe_outputs"], f"{release.label} {name}: the generator recorded no probe answer"
        try:
            deployment = deploy(user, release, record, fmt)
        except StageError as exc:
            failures.append(f"{release.label} {name} ({fmt}): {exc}")
            continue
        outputs = deployment.signature["example_outputs"]
        if outputs != record["probe_outputs"]:
            failures.append(f"{release.label} {name} ({fmt}): {outputs} != {record['probe_outputs']}")
        assert deployment.signature["sklearn_version"] == release.label
    assert failures == []
    assert {(r.label, f) for r, _, f in plan()} == {(r.label, f) for r in (OLDEST, NEWEST) for f in compat.FORMATS}


def test_a_histogram_gradient_boosting_model_with_bare_loss_names_loads_them_from_scikit_learn(user, generated):
    """scikit-learn 1.5-1.8 write `_loss.<name>`: the scan accepts those pairs, the loader imports
    them only as sklearn._loss._loss.<name>, and the model predicts as it did."""
    record = generated[LOSS_RELEASE.label]["HistGradientBoostingClassifier"]
    for fmt in compat.FORMATS:
        scan = scan_model_file(io.BytesIO(model_bytes(LOSS_RELEASE, record, fmt)))
        bare = {g for g in scan.globals if g.module == "_loss"}
        assert bare, f"{fmt}: 1.6.1 writes the bare _loss module"
        assert bare <= reviewed_globals()
        deployment = deploy(user, LOSS_RELEASE, record, fmt)
        assert deployment.signature["example_outputs"] == record["probe_outputs"]


def test_a_model_its_environment_cannot_load_fails_with_what_to_pin(user, generated, make_deployment):
    """1.2.2's GradientBoostingClassifier keeps sklearn.ensemble._gb_losses, which 1.9.1 no longer has.
    inspect already refuses such pins; were they to get past it, the loader says what to pin."""
    record = generated[OLDEST.label]["GradientBoostingClassifier"]
    data = model_bytes(OLDEST, record, "pickle")
    deployment = make_deployment(user, data, "\n".join(NEWEST.requirements), name="old model, new pins")
    with pytest.raises(StageError, match=r"Pin scikit-learn==1\.2\.2"):
        stages.inspect(deployment)
    found = scan_model_file(io.BytesIO(data)).globals
    services.deployment_update(deployment=deployment, allowed_globals=sorted([g.module, g.name] for g in found))
    stages.environment(deployment)
    with pytest.raises(
        StageError,
        match=r"saved with scikit-learn 1\.2\.2, and scikit-learn 1\.9\.1 installed "
        r"here cannot load it .*Pin scikit-learn==1\.2\.2 in requirements.txt",
    ):
        stages.validate(deployment)


def test_the_loader_never_imports_a_top_level_loss_module_even_when_one_is_importable(tmp_path, monkeypatch):
    """A package could ship `_loss.py`: the restricted loader resolves `_loss.X` in scikit-learn only."""
    (tmp_path / "_loss.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').touch()\nclass CyHalfSquaredError:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "_loss", raising=False)
    loader = load_loader(monkeypatch)
    data = b"\x80\x04" + payloads._str("_loss") + payloads._str("CyHalfSquaredError") + b"\x93)\x81."
    with loader.restricted([("_loss", "CyHalfSquaredError")]):
        loaded = pickle.loads(data)
    assert type(loaded).__module__ == "sklearn._loss._loss"
    assert not (tmp_path / "ran").exists()


def load_loader(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(buildkit.LOADER).parent))
    import serveml_loader

    return serveml_loader


class PathTaker:
    """Stands for xgboost's and lightgbm's Booster: a constructor that reads a file by name."""

    opened = []

    def __init__(self, model_file=None):
        PathTaker.opened.append(model_file)

    def __setstate__(self, state):
        self.__dict__.update(state)


def test_a_construct_only_class_is_rebuilt_but_never_called_while_a_model_loads(monkeypatch):
    loader = load_loader(monkeypatch)
    pair = (__name__, "PathTaker")
    monkeypatch.setattr(loader, "CONSTRUCT_ONLY", {pair})
    rebuilt = pickle.dumps(PathTaker.__new__(PathTaker))  # NEWOBJ, then BUILD: how pickle saves one
    with loader.restricted([pair]):
        assert type(pickle.loads(rebuilt)) is PathTaker
    called = (
        b"\x80\x04"
        + payloads._str(__name__)
        + payloads._str("PathTaker")
        + b"\x93"
        + payloads._str("/etc/passwd")
        + b"\x85R."
    )  # PathTaker("/etc/passwd")
    with loader.restricted([pair]), pytest.raises(loader.RefusedGlobal, match="calls tests.test_compat.PathTaker"):
        pickle.loads(called)
    assert PathTaker.opened == []
    PathTaker("restored")  # the guard is lifted after the load
    assert PathTaker.opened == ["restored"]


def test_the_reviewed_allowlist_holds_only_pairs_the_review_finds_harmless():
    for g in reviewed_globals():
        allowed, why = review.verdict(g.module, g.name)
        assert allowed, f"{g}: {why}"
    for name in [
        "builtins.getattr",
        "numpy.load",
        "joblib.load",
        "pandas.io.pickle.read_pickle",
        "scipy.io._matlab._mio.loadmat",
        "sklearn.metrics._scorer._Scorer",
        "functools.partial",
    ]:
        module, _, attr = name.rpartition(".")
        assert Global(module, attr) not in reviewed_globals()
        assert review.verdict(module, attr)[0] is False


def test_packs_apply_only_when_the_operator_allows_their_package(settings):
    from deployments.allowlist import allowed_globals, enabled_packs

    xgb = Global("xgboost.sklearn", "XGBClassifier")
    assert set(packs()) == {"xgboost", "lightgbm"}
    assert xgb in pack_globals(("xgboost",)) and xgb not in reviewed_globals()
    settings.SERVEML_ALLOWED_PACKAGES = ["scikit-learn", "numpy"]
    assert enabled_packs() == () and xgb not in allowed_globals()
    AllowedPackage.objects.create(name="XGBoost")
    assert enabled_packs() == ("xgboost",) and xgb in allowed_globals()
    assert Global("lightgbm.basic", "Booster") not in allowed_globals()


def test_a_pipeline_with_an_xgboost_model_and_a_users_own_transformer_is_refused_with_how_to_ask(
    user, settings, make_deployment
):
    settings.SERVEML_ALLOWED_PACKAGES = [*settings.SERVEML_ALLOWED_PACKAGES, "xgboost"]
    from tests.payloads import _str

    # A Pipeline whose steps name xgboost's classifier and a class of the user's own.
    data = (
        b"\x80\x04("
        + _str("sklearn.pipeline")
        + _str("Pipeline")
        + b"\x93"
        + _str("xgboost.sklearn")
        + _str("XGBClassifier")
        + b"\x93"
        + _str("my_project.features")
        + _str("MyScaler")
        + b"\x93t."
    )
    deployment = make_deployment(user, data, "scikit-learn==1.9.1\nxgboost==3.2.0\n", name="custom")
    with pytest.raises(StageError) as refusal:
        stages.inspect(deployment)
    message = str(refusal.value)
    assert "my_project.features.MyScaler" in message and "XGBClassifier" not in message
    assert "ask an operator" in message
