"""The compatibility matrix's worker: runs inside one scikit-learn version's own environment, in the sandbox.

    python -I -B compat_worker.py list                    JSON list of the estimators all_estimators() names
    python -I -B compat_worker.py generate NAME [NAME …]  a tar on stdout: for each estimator that fits on toy
                                                          data, its model saved in every format, and record.json
    python -I -B compat_worker.py check manifest.json     load each file of models.tar with ServeML's restricted
                                                          loader, one JSON line per file on stdout

It must run unchanged on every scikit-learn from 1.2 to the newest, so it uses
only what all of them have, and the stdlib. Nothing here trusts its input more
than ServeML would: `check` loads every model through serveml_loader, resolving
only the globals ServeML's scan found in that file.

The generator fits each estimator with its default parameters (a meta-estimator
gets a simple base estimator), saves it, loads every file back with plain
pickle / joblib / skops in this same environment and keeps only files that
predict exactly like the fitted model: those are the models a user could upload.
Beside each file it records the model's outputs on a fixed input; `check`
computes the same outputs from the file the restricted loader built, and the
host compares the two byte for byte.
"""

import base64
import functools
import inspect
import io
import json
import os
import pickle
import sys
import tarfile
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
# Bumped whenever datasets() changes: `check` rebuilds the fixed input, so records made with other data are stale.
DATA_VERSION = 2
# Bumped whenever outputs() or encode() changes: loads checked with other code are stale.
OUTPUTS_VERSION = 1
N_FEATURES = 10
METHODS = ("predict", "predict_proba", "decision_function", "score_samples", "transform", "mahalanobis", "kneighbors")
# What the validate stage's probe asks a model (its example input is a row of zeros).
PROBE_METHODS = ("predict", "predict_proba", "decision_function")
FORMATS = {"pickle": ".pkl", "joblib": ".joblib", "joblib-zlib": ".joblib.z", "skops": ".skops"}


# ---------------------------------------------------------------- toy data


@functools.lru_cache(maxsize=1)
def datasets():
    """Every kind of toy data an estimator might need: fit data and a fixed input to answer."""
    import numpy as np
    from sklearn.datasets import make_classification, make_regression

    X, y = make_classification(
        n_samples=120,
        n_features=N_FEATURES,
        n_informative=4,
        n_redundant=0,
        n_classes=3,
        n_clusters_per_class=1,
        random_state=0,
    )
    Xb, yb = make_classification(n_samples=120, n_features=N_FEATURES, n_informative=4, n_redundant=0, random_state=1)
    Xr, yr = make_regression(n_samples=120, n_features=N_FEATURES, n_informative=4, noise=1.0, random_state=0)
    rng = np.random.RandomState(0)
    Xp = rng.randint(0, 5, size=(120, N_FEATURES)).astype(float)
    words = ["good", "great", "bad", "awful", "film", "movie", "plot", "actor", "loved", "hated"]
    docs = [" ".join(rng.choice(words, 5)) for _ in range(60)]
    cities = ["paris", "lyon", "nice"]
    dicts = [{"city": cities[i % 3], "temp": float(rng.randint(0, 30)), "wet": float(i % 2)} for i in range(60)]
    labels = np.array(["cat", "dog", "bird"])[y]
    multilabels = [sorted({str(a), str(b)}) for a, b in zip(y, yb, strict=True)]
    y_multi = np.column_stack([y == 0, X[:, 0] > 0]).astype(int)
    y_multi_reg = np.column_stack([yr, 2 * Xr[:, 0] + rng.normal(size=120)])
    images = rng.rand(6, 8, 8)
    kernel = X @ X.T
    import pandas as pd

    frame = pd.DataFrame(
        {
            "age": X[:, 0] * 10 + 40,
            "income": X[:, 1] * 1e4 + 5e4,
            "city": np.array(cities)[y],
            "wet": (X[:, 2] > 0).astype(float),
        }
    )
    t = slice(100, 120)  # the fixed input: rows the models were fitted on too (transductive ones answer them)
    return {
        # name: (fit args, input for the methods)
        "classification": ((X, y), X[t]),
        "binary": ((Xb, yb), Xb[t]),
        "regression": ((Xr, yr), Xr[t]),
        "positive-regression": ((Xr, np.abs(yr) + 1.0), Xr[t]),
        "counts": ((Xp, y), Xp[t]),
        "multi-output-classification": ((X, y_multi), X[t]),
        "multi-output-regression": ((Xr, y_multi_reg), Xr[t]),
        "text": ((docs, y[:60]), docs[40:]),
        "dicts": ((dicts, y[:60]), dicts[40:]),
        "one-feature": ((X[:, 0], yr), X[t, 0]),
        "labels": ((labels,), labels[t]),
        "multilabels": ((multilabels,), multilabels[100:]),
        "images": ((images,), images[:2]),
        "kernel": ((kernel, y), kernel[t]),
        "mixed-frame": ((frame, y), frame.iloc[t]),
    }


SPECIAL_DATA = {
    "CountVectorizer": "text",
    "TfidfVectorizer": "text",
    "HashingVectorizer": "text",
    "DictVectorizer": "dicts",
    "FeatureHasher": "dicts",
    "LabelEncoder": "labels",
    "LabelBinarizer": "labels",
    "MultiLabelBinarizer": "multilabels",
    "IsotonicRegression": "one-feature",
    "PatchExtractor": "images",
    "KernelCenterer": "kernel",
    "MultiOutputClassifier": "multi-output-classification",
    "ClassifierChain": "multi-output-classification",
    "MultiOutputRegressor": "multi-output-regression",
    "RegressorChain": "multi-output-regression",
    "MultiTaskLasso": "multi-output-regression",
    "MultiTaskElasticNet": "multi-output-regression",
    "MultiTaskLassoCV": "multi-output-regression",
    "MultiTaskElasticNetCV": "multi-output-regression",
    "CCA": "multi-output-regression",
    "PLSCanonical": "multi-output-regression",
    "PLSSVD": "multi-output-regression",
}
FALLBACK_DATA = [
    "classification",
    "binary",
    "counts",
    "regression",
    "positive-regression",
    "multi-output-regression",
    "multi-output-classification",
]


def data_order(name, model):
    from sklearn.base import is_regressor

    if name in SPECIAL_DATA:
        return [SPECIAL_DATA[name]]
    try:
        first = "regression" if is_regressor(model) else "classification"
    except Exception:
        first = "classification"
    return [first] + [d for d in FALLBACK_DATA if d != first]


# ---------------------------------------------------------------- estimators


def base_estimator(kind):
    from sklearn.linear_model import LinearRegression, LogisticRegression

    return LinearRegression() if kind == "regressor" else LogisticRegression()


def required_params(name, cls):
    """The parameters a meta-estimator cannot do without, each a simple base estimator."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    regressor = name.endswith("Regressor") or name == "RegressorChain"
    params = _parameters(cls)
    required = {
        p
        for p, spec in params.items()
        if spec.default is inspect.Parameter.empty
        and spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL)
        and p != "self"
    }
    values = {}
    for param in required:
        if param in ("estimator", "base_estimator"):
            values[param] = LinearRegression() if regressor else LogisticRegression()
            if name == "FrozenEstimator":
                data = datasets()["classification"][0]
                values[param] = LogisticRegression().fit(*data)
        elif param == "estimators":
            values[param] = (
                [("linear", LinearRegression()), ("tree", DecisionTreeRegressor(random_state=0))]
                if regressor
                else [("linear", LogisticRegression()), ("tree", DecisionTreeClassifier(random_state=0))]
            )
        elif param == "transformers":
            values[param] = [("scale", StandardScaler(), [0, 1])]
        elif param == "transformer_list":
            values[param] = [("scale", StandardScaler()), ("pca", PCA(n_components=2))]
        elif param == "steps":
            values[param] = [("scale", StandardScaler()), ("model", LogisticRegression())]
        elif param in ("param_grid", "param_distributions"):
            values[param] = {"C": [0.1, 1.0]}
        elif param == "dictionary":
            rng = np.random.RandomState(0)
            atoms = rng.normal(size=(3, N_FEATURES))
            values[param] = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
        else:
            raise TypeError(f"no value for the required parameter {param!r}")
    return values


def _parameters(cls):
    try:
        return dict(inspect.signature(cls.__init__).parameters) if isinstance(cls, type) else {}
    except (TypeError, ValueError):
        return {}


def fit(name, cls):
    """(fitted model, data name) for the first toy data it fits on with default parameters."""
    import numpy as np

    name, _, forced_data = name.partition("@")
    data = datasets()
    errors = []
    cls_name = name.split("(")[0]
    params = required_params(cls_name, getattr(cls, "wraps", cls))
    if forced_data == "mixed-frame" and cls_name == "ColumnTransformer":
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        params["transformers"] = [
            ("num", StandardScaler(), ["age", "income"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    attempts = [params]
    optional = {"estimator", "base_estimator"} & set(_parameters(getattr(cls, "wraps", cls))) - set(params)
    for param in sorted(optional):  # a default that does not fit alone (SelfTrainingClassifier 1.6+)
        regressor = cls_name.endswith("Regressor") or cls_name == "RegressorChain"
        attempts.append({**params, param: base_estimator("regressor" if regressor else "")})
    for attempt in attempts:
        try:
            order = [forced_data] if forced_data else data_order(cls_name, cls(**attempt))
        except Exception as exc:
            errors.append(f"construct: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        for kind in order:
            np.random.seed(0)
            try:
                model = cls(**attempt)
                model.fit(*data[kind][0])
                return model, kind, sorted(attempt)
            except Exception as exc:
                errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
    raise RuntimeError("; ".join(errors[:2]))


# ---------------------------------------------------------------- outputs


def encode(value):
    """A JSON value that is equal for two outputs exactly when they are equal, bit for bit."""
    import numpy as np

    if hasattr(value, "toarray"):
        value = value.toarray()
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    try:
        array = np.asarray(value)
    except Exception:
        return {"repr": repr(value)[:2000]}
    if array.dtype.kind in "biufcmM":
        array = np.ascontiguousarray(array)
        return {
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode(),
        }
    return {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "items": json.dumps(array.tolist(), default=repr, sort_keys=True)[:100_000],
    }


def outputs(model, kind):
    """What the model answers on the fixed input of its toy data, method by method."""
    import numpy as np

    X = datasets()[kind][1]
    answers = {}
    for method in METHODS:
        if not hasattr(model, method):
            continue
        np.random.seed(0)  # estimators that draw from numpy's global generator answer the same every time
        try:
            answers[method] = encode(getattr(model, method)(X))
        except Exception as exc:
            answers[method] = {"error": type(exc).__name__}
    if not [a for a in answers.values() if "error" not in a]:
        # Nothing to ask it (clustering, embeddings): what it learnt is the answer.
        for attribute, value in sorted(vars(model).items()):
            learnt = attribute.endswith("_") and not attribute.startswith("_")
            if learnt and isinstance(value, (np.ndarray, float, int)):
                answers[attribute] = encode(value)
    return answers


def probe_outputs(model):
    """What the validate stage's probe computes, as it computes it (buildkit/probe.py): each method's
    answer to one row of zeros (or to one text when the model does not say how many features it takes)."""
    import numpy as np

    n_features = getattr(model, "n_features_in_", None)
    if getattr(model, "feature_names_in_", None) is not None:
        return {}  # the probe builds a frame from the model's encoders: not compared here
    row = np.zeros((1, int(n_features))) if n_features is not None else ["an example text"]
    answers = {}
    for method in PROBE_METHODS:
        if hasattr(model, method):
            try:
                value = getattr(model, method)(row)
                answers[method] = json.loads(json.dumps(value.tolist()[0] if hasattr(value, "tolist") else value[0]))
            except Exception:
                return {}
    return answers


def deterministic(model, kind):
    """Outputs that come out the same twice in a row; those that do not cannot be compared."""
    first, second = outputs(model, kind), outputs(model, kind)
    return {m: v for m, v in first.items() if second.get(m) == v}, sorted(m for m in first if second.get(m) != first[m])


# ---------------------------------------------------------------- saving and plain loading


def save(model, fmt, path):
    if fmt == "pickle":
        with open(path, "wb") as handle:
            pickle.dump(model, handle)
    elif fmt == "skops":
        import skops.io

        skops.io.dump(model, path)
    else:
        import joblib

        joblib.dump(model, path, compress=3 if fmt == "joblib-zlib" else 0)


def plain_load(fmt, path):
    """How the model's owner loads it in their own environment: no restriction at all."""
    if fmt == "pickle":
        with open(path, "rb") as handle:
            return pickle.load(handle)
    if fmt == "skops":
        import skops.io

        return skops.io.load(path, trusted=skops.io.get_untrusted_types(file=path))
    import joblib

    return joblib.load(path)


def formats():
    try:
        import skops.io  # noqa: F401

        return list(FORMATS)
    except ImportError:
        return [f for f in FORMATS if f != "skops"]


def versions():
    import joblib
    import numpy
    import sklearn

    found = {
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "joblib": joblib.__version__,
        "python": sys.version.split()[0],
    }
    try:
        import skops

        found["skops"] = skops.__version__
    except ImportError:
        pass
    for package in ("xgboost", "lightgbm"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            pass
    return found


# ---------------------------------------------------------------- commands


def estimators():
    """{name: class}: every estimator scikit-learn lists, experimental ones enabled, plus the packs'."""
    try:
        from sklearn.experimental import enable_halving_search_cv, enable_iterative_imputer  # noqa: F401
    except ImportError:
        pass
    from sklearn.utils import all_estimators

    found = dict(all_estimators())
    found.update(pack_estimators())
    return found


def pack_estimators():
    """xgboost's and lightgbm's scikit-learn estimators, when installed."""
    found = {}
    for package, names in (
        ("xgboost", ("XGBClassifier", "XGBRegressor")),
        ("lightgbm", ("LGBMClassifier", "LGBMRegressor")),
    ):
        try:
            module = __import__(package)
        except ImportError:
            continue
        found.update({name: getattr(module, name) for name in names})
    return found


# Beyond default parameters: common settings that pickle internals the defaults do not (a binary
# target, other trees, distances and losses), and a scorer. Reported apart from the defaults' matrix.
VARIANTS = [
    "GradientBoostingClassifier@binary",
    "HistGradientBoostingClassifier@binary",
    "LogisticRegression@binary",
    "GradientBoostingRegressor(loss='huber')",
    "GradientBoostingRegressor(loss='absolute_error')",
    "GradientBoostingRegressor(loss='quantile')",
    "HistGradientBoostingRegressor(loss='absolute_error')",
    "HistGradientBoostingRegressor(loss='poisson')",
    "HistGradientBoostingRegressor(loss='quantile', quantile=0.5)",
    "SGDClassifier(loss='log_loss')",
    "SGDClassifier(loss='modified_huber')",
    "KNeighborsClassifier(algorithm='ball_tree')",
    "KNeighborsClassifier(metric='manhattan')",
    "KNeighborsClassifier(metric='chebyshev')",
    "KNeighborsRegressor(metric='minkowski', p=3)",
    "RandomForestClassifier(class_weight='balanced')",
    "GridSearchCV(scoring='accuracy')",
    "ColumnTransformer@mixed-frame",
]


def resolve(name, available):
    """A class, or a factory for a name of these forms (a data kind may follow an @):

    Pipeline[A,B,…]         a pipeline of default A, B, …
    Name(param=value, …)    Name with those parameters (Python literals)
    """
    import ast

    if name.startswith("Pipeline[") and name.endswith("]"):
        steps = [available[part] for part in name[len("Pipeline[") : -1].split(",")]

        def make():
            from sklearn.pipeline import make_pipeline

            return make_pipeline(*(step() for step in steps))

        make.__name__ = name
        return make
    if name.endswith(")") and "(" in name:
        base, _, arguments = name[:-1].partition("(")
        call = ast.parse(f"f({arguments})", mode="eval").body
        fixed = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        cls = available[base]

        def make(**params):
            return cls(**{**params, **fixed})

        make.__name__ = name
        make.wraps = cls
        return make
    return available[name]


# Modules whose classes a parameter chooses among (a kernel, a distance, a loss, a CV splitter): a model
# pickles whichever member its parameters picked, so the whole family is listed, as each release names it.
FAMILIES = [
    "sklearn.gaussian_process.kernels",
    "sklearn.metrics._dist_metrics",
    "sklearn.linear_model._sgd_fast",
    "sklearn._loss.loss",
    "sklearn._loss.link",
    "sklearn._loss._loss",
    "sklearn.ensemble._gb_losses",
    "sklearn.model_selection._split",
    "sklearn.neighbors._kd_tree",
    "sklearn.neighbors._ball_tree",
]


def family_members():
    """[[module, name]] as pickle names them (Cython classes of 1.5-1.8 say `_loss`), for FAMILIES."""
    import importlib

    found = []
    for module_name in FAMILIES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # not in this release (_gb_losses went in 1.4)
            continue
        for name, value in sorted(vars(module).items()):
            unpickler = name.startswith("__pyx_unpickle_") and callable(value)
            if not (isinstance(value, type) or unpickler) or name.startswith("__pyx_unpickle_Enum"):
                continue
            if isinstance(value, type) and (
                name.startswith("_")
                or value.__module__ not in (module_name, "_loss")
                and not value.__module__.endswith(module_name.rsplit(".", 1)[-1])
            ):
                continue  # private helpers and what the module only imports from elsewhere
            found.append([getattr(value, "__module__", None) or module_name, name])
    return found


def command_list():
    available = estimators()
    names = sorted(available)
    # Pack models are deployed alone and inside a Pipeline.
    names += [f"Pipeline[StandardScaler,{name}]" for name in sorted(pack_estimators())]
    names += [variant for variant in VARIANTS if variant.split("@")[0].split("(")[0] in available]
    # Every estimator class, fitted here or not: a user fits it on real data.
    classes = {name: [cls.__module__, cls.__qualname__] for name, cls in available.items()}
    return json.dumps(
        {
            "estimators": names,
            "classes": classes,
            "families": family_members(),
            "formats": formats(),
            "versions": versions(),
        }
    )


def command_generate(names, channel):
    """Stream a tar: <name>/<format file> and <name>/record.json for every estimator asked for."""
    import numpy as np

    available = estimators()
    workdir = os.environ.get("TMPDIR", "/tmp")
    with tarfile.open(fileobj=channel, mode="w|") as archive:
        for name in names:
            started = time.monotonic()
            record = {"estimator": name, "files": {}, "versions": versions(), "data_version": DATA_VERSION}
            try:
                cls = resolve(name.split("@")[0], available)
                model, kind, filled = fit(name, cls)
                expected, unstable = deterministic(model, kind)
                record.update(
                    data=kind,
                    filled=filled,
                    outputs=expected,
                    nondeterministic=unstable,
                    model_class=f"{type(model).__module__}.{type(model).__name__}",
                )
                np.random.seed(0)
                record["probe_outputs"] = probe_outputs(model)
                if not expected:
                    raise RuntimeError("none of its outputs is the same twice in a row")
            except Exception as exc:
                record["unfit"] = f"{type(exc).__name__}: {str(exc)[:600]}"
                _add(archive, f"{name}/record.json", json.dumps(record).encode())
                continue
            for fmt in formats():
                path = os.path.join(workdir, f"model{FORMATS[fmt]}")
                entry = {}
                try:
                    save(model, fmt, path)
                except Exception as exc:
                    entry["unsaved"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    record["files"][fmt] = entry
                    continue
                try:
                    again = plain_load(fmt, path)
                    np.random.seed(0)
                    answers = outputs(again, kind)
                    entry["plain_load"] = "same" if {m: answers.get(m) for m in expected} == expected else "different"
                except Exception as exc:
                    entry["plain_load"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                with open(path, "rb") as handle:
                    content = handle.read()
                os.unlink(path)
                entry["file"] = f"{name}/{fmt}{FORMATS[fmt]}"
                entry["bytes"] = len(content)
                _add(archive, entry["file"], content)
                record["files"][fmt] = entry
            record["seconds"] = round(time.monotonic() - started, 2)
            _add(archive, f"{name}/record.json", json.dumps(record).encode())
            channel.flush()


def _add(archive, name, content):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(content))


def command_check(manifest_path, channel):
    """Load every file with the restricted loader and answer the record's fixed input."""
    sys.path.insert(0, HERE)
    import serveml_loader

    with open(manifest_path) as handle:
        manifest = json.load(handle)
    workdir = os.environ.get("TMPDIR", "/tmp")
    with tarfile.open(os.path.join(HERE, manifest["archive"])) as archive:
        members = {m.name: m for m in archive.getmembers()}
        for item in manifest["files"]:
            started = time.monotonic()
            path = os.path.join(workdir, os.path.basename(item["file"]))
            with archive.extractfile(members[item["file"]]) as source, open(path, "wb") as target:
                target.write(source.read())
            answer = {"id": item["id"]}
            try:
                model = serveml_loader.load(path, item["format"], item["allowed_globals"])
            except BaseException as exc:
                answer["error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
                answer["traceback"] = traceback.format_exc()[-1500:]
            else:
                answer["outputs"] = outputs(model, item["data"])
            finally:
                os.unlink(path)
            answer["seconds"] = round(time.monotonic() - started, 3)
            channel.write((json.dumps(answer) + "\n").encode())
            channel.flush()


def main(argv):
    warnings.simplefilter("ignore")  # thousands of fits with default parameters: convergence and the like
    # Our stdout is the channel to the host; anything a library prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    command = argv[0]
    if command == "list":
        channel.write(command_list().encode())
    elif command == "generate":
        command_generate(argv[1:], channel)
    elif command == "check":
        command_check(argv[1], channel)
    else:
        raise SystemExit(f"unknown command {command!r}")
    channel.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
