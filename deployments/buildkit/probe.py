"""The validate stage's probe: load the model in its sandbox and describe it.

Run as `python -I probe.py` by the deployment's environment interpreter, in the
sandbox, in a folder holding the model, `serveml.json` (model file, format, the
globals it may import) and serveml_loader.py: the handler's own loader. It
prints one JSON object on its own stdout: the model's signature, an example
request built from that signature, and what the model itself answers to it,
computed with the estimator's own methods (the verify stage checks the
deployed handler against these numbers).
"""

import json
import os
import platform
import sys
import traceback

# -I leaves the script's folder off sys.path; it holds only ServeML's read-only files.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serveml_loader  # noqa: E402


def categories(estimator, out):
    """Map column name -> first known category, from every fitted encoder inside the model."""
    transformers = getattr(estimator, "transformers_", None)
    if transformers:
        for _, transformer, columns in transformers:
            encoder = transformer
            if hasattr(transformer, "steps"):
                encoder = next((s for _, s in transformer.steps if hasattr(s, "categories_")), None)
            if encoder is not None and hasattr(encoder, "categories_") and isinstance(columns, (list, tuple)):
                for column, known in zip(columns, encoder.categories_, strict=False):
                    if len(known):
                        out[str(column)] = known[0].item() if hasattr(known[0], "item") else known[0]
    for _, step in getattr(estimator, "steps", []):
        categories(step, out)
    return out


def plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


def example_row(model, feature_names, n_features):
    if feature_names is not None:
        known = categories(model, {})
        return {name: known.get(name, 0.0) for name in feature_names}
    if n_features is not None:
        return [0.0] * n_features
    return "an example text"


def as_input(row, feature_names):
    if isinstance(row, dict):
        import pandas

        return pandas.DataFrame([row], columns=feature_names)
    if isinstance(row, str):
        return [row]
    import numpy

    return numpy.asarray([row], dtype=float)


def main():
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        with open("serveml.json", "rb") as handle:
            config = json.load(handle)
        model = serveml_loader.load(config["model_file"], config["format"], config["allowed_globals"])
    except BaseException as exc:
        traceback.print_exc()
        channel.write(json.dumps({"error": f"loading the model failed: {type(exc).__name__}: {exc}"}))
        return 0
    names = getattr(model, "feature_names_in_", None)
    names = [str(n) for n in names] if names is not None else None
    n_features = getattr(model, "n_features_in_", None)
    n_features = int(n_features) if n_features is not None else None
    classes = getattr(model, "classes_", None)
    methods = [m for m in ("predict", "predict_proba", "decision_function") if hasattr(model, m)]
    import sklearn

    signature = {
        "model_type": type(model).__name__,
        "estimator": f"{type(model).__module__}.{type(model).__name__}",
        "steps": [type(s).__name__ for _, s in getattr(model, "steps", [])],
        "n_features_in": n_features,
        "feature_names_in": names,
        "classes": plain(classes) if classes is not None else None,
        "methods": methods,
        "sklearn_version": sklearn.__version__,
        "python_version": platform.python_version(),
    }
    if "predict" not in methods:
        channel.write(json.dumps({"signature": signature, "error": f"{signature['model_type']} has no predict method"}))
        return 0
    row = example_row(model, names, n_features)
    try:
        X = as_input(row, names)
        outputs = {method: plain(getattr(model, method)(X))[0] for method in methods}
    except Exception as exc:
        channel.write(
            json.dumps(
                {
                    "signature": signature,
                    "error": f"the model could not predict on an example input built from its signature "
                    f"({json.dumps(row)[:200]}): {type(exc).__name__}: {exc}",
                }
            )
        )
        return 0
    signature["input"] = "records" if isinstance(row, dict) else "text" if isinstance(row, str) else "numbers"
    channel.write(json.dumps({"signature": signature, "example": row, "outputs": outputs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
