"""What the sandboxed probe reports about a model, as typed values.

The probe (deployments/buildkit/probe.py) runs inside the model's sandbox, next to the
user's code: its report is written by someone else. Every key is parsed here against an
explicit type and bound before ServeML keeps it. Keys this module does not know are
dropped; a known key of the wrong type, or out of bounds, refuses the whole report
(ServeML's own probe never writes one). A signature is stored as JSON on
`Deployment.signature` and read back through `ModelSignature.from_stored`.

Stdlib only: the web process reads signatures too.
"""

import logging
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

METHODS = ("predict", "predict_proba", "decision_function")
INPUTS = ("numbers", "records", "text")
MAX_ITEMS = 100_000  # feature names, classes
MAX_STEPS = 1_000
MAX_FEATURES = 100_000_000
MAX_TEXT = 1_000  # a feature name, a class label
MAX_ERROR = 4_000
VERSION = re.compile(r"[0-9A-Za-z.+!_-]{1,64}")
DOTTED = re.compile(r"[A-Za-z_][\w.]{0,299}")


class SignatureError(ValueError):
    """The probe's report is not what ServeML's probe writes; str(error) says which key."""


@dataclass(frozen=True)
class ModelSignature:
    """A loaded model as the probe saw it. Empty (no model_type) until the validate stage ran."""

    model_type: str = ""  # the estimator's class name
    estimator: str = ""  # module.Class
    steps: list[str] = field(default_factory=list)  # a Pipeline's steps' class names
    n_features_in: int | None = None
    feature_names_in: list[str] | None = None  # fitted on a pandas DataFrame
    classes: list | None = None  # a classifier's labels: JSON scalars (lists of them for multi-output)
    methods: list[str] = field(default_factory=list)  # of METHODS, those the model has
    sklearn_version: str = ""  # installed in the model's environment
    python_version: str = ""
    input: str | None = None  # of INPUTS: how the example was given, once a prediction worked
    example_outputs: dict[str, Any] | None = None  # each method's answer to the example, from the model itself

    @classmethod
    def parse(cls, data: Any) -> "ModelSignature":
        """The probe's `signature` object; raises SignatureError on a key of the wrong type."""
        if not isinstance(data, dict):
            raise SignatureError(f"the signature is a {type(data).__name__}, not an object")
        unknown = sorted(str(key)[:40] for key in data if key not in PROBE_KEYS)
        if unknown:
            log.warning("the probe reported unknown signature keys, dropped: %s", ", ".join(unknown[:20]))
        values = {}
        for key, parser in PARSERS.items():
            if key in data and key in PROBE_KEYS:
                try:
                    values[key] = parser(data[key])
                except SignatureError as exc:
                    raise SignatureError(f"{key}: {exc}") from None
        if not values.get("model_type"):
            raise SignatureError("model_type: missing")
        return cls(**values)

    @classmethod
    def from_stored(cls, data: Any) -> "ModelSignature":
        """A stored signature (Deployment.signature). Written through `parse`, so it reads back whole;
        a row stored before signatures were parsed loses only the keys that do not parse."""
        if not isinstance(data, dict) or not data:
            return cls()
        values = {}
        for key, parser in PARSERS.items():
            if key in data:
                try:
                    values[key] = parser(data[key])
                except SignatureError:
                    continue
        return cls(**values)

    def as_json(self) -> dict:
        """The stored form, and the API's `signature`: input and example_outputs only once known."""
        if not self.model_type:
            return {}
        data = asdict(self)
        for key in ("input", "example_outputs"):
            if data[key] is None:
                del data[key]
        return data

    def with_outputs(self, outputs: dict[str, Any]) -> "ModelSignature":
        return replace(self, example_outputs=outputs)

    def features(self) -> str:
        """How the model takes its input, in a few words."""
        if self.feature_names_in:
            return f"{len(self.feature_names_in)} named features"
        if self.n_features_in:
            return f"{self.n_features_in} features"
        return "text input"


@dataclass(frozen=True)
class ProbeReport:
    """The probe's whole answer: a signature, and either an error or an example with its outputs."""

    signature: ModelSignature | None
    error: str = ""
    example: Any = None  # one row: numbers, a record {feature: value} or a text
    outputs: dict[str, Any] = field(default_factory=dict)  # method -> what the model answered

    @classmethod
    def parse(cls, data: Any) -> "ProbeReport":
        if not isinstance(data, dict):
            raise SignatureError(f"the report is a {type(data).__name__}, not an object")
        signature = ModelSignature.parse(data["signature"]) if data.get("signature") is not None else None
        if "error" in data:
            error = _text(data["error"], MAX_ERROR, "error")
            return cls(signature=signature, error=error or "the model's probe failed without saying why")
        if signature is None:
            raise SignatureError("signature: missing")
        outputs = _outputs(data.get("outputs"))
        if "predict" not in outputs:
            raise SignatureError("outputs: no predict output")
        if set(outputs) - set(signature.methods):
            raise SignatureError("outputs: a method the signature does not list")
        try:
            example = _example(data.get("example"))
        except SignatureError as exc:
            raise SignatureError(f"example: {exc}") from None
        return cls(signature=signature, example=example, outputs=outputs)


# ------------------------------------------------------------------ one parser per key


def _text(value: Any, limit: int, what: str = "value") -> str:
    if not isinstance(value, str):
        raise SignatureError(f"{what} is a {type(value).__name__}, not a string")
    return value[:limit]


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not value.isidentifier() or len(value) > 200:
        raise SignatureError("not a class name")
    return value


def _dotted(value: Any) -> str:
    if not isinstance(value, str) or not DOTTED.fullmatch(value):
        raise SignatureError("not a dotted class name")
    return value


def _version(value: Any) -> str:
    if not isinstance(value, str) or not VERSION.fullmatch(value):
        raise SignatureError("not a version")
    return value


def _count(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_FEATURES:
        raise SignatureError("not a count of features")
    return value


def _list(value: Any, limit: int) -> list:
    if not isinstance(value, list):
        raise SignatureError(f"a {type(value).__name__}, not a list")
    if len(value) > limit:
        raise SignatureError(f"more than {limit} items")
    return value


def _steps(value: Any) -> list[str]:
    return [_identifier(item) for item in _list(value, MAX_STEPS)]


def _names(value: Any) -> list[str] | None:
    if value is None:
        return None
    names = _list(value, MAX_ITEMS)
    if not all(isinstance(name, str) and len(name) <= MAX_TEXT for name in names):
        raise SignatureError("a feature name that is not a short string")
    return names


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_TEXT
    return value is None or isinstance(value, (bool, int, float))


def _classes(value: Any) -> list | None:
    if value is None:
        return None
    classes = _list(value, MAX_ITEMS)
    for label in classes:
        if not (_scalar(label) or (isinstance(label, list) and len(label) <= MAX_ITEMS and all(map(_scalar, label)))):
            raise SignatureError("a class label that is not a number, a string or a list of them")
    return classes


def _methods(value: Any) -> list[str]:
    methods = _list(value, len(METHODS))
    if not all(isinstance(method, str) and method in METHODS for method in methods) or len(set(methods)) < len(methods):
        raise SignatureError(f"not a list of distinct methods among {', '.join(METHODS)}")
    return methods


def _input(value: Any) -> str | None:
    if value is not None and value not in INPUTS:
        raise SignatureError(f"not one of {', '.join(INPUTS)}")
    return value


def _json_value(value: Any, depth: int = 0) -> bool:
    """A JSON value ServeML can compare and show: bounded depth, finite numbers."""
    if depth > 32:
        return False
    if isinstance(value, list):
        return all(_json_value(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _json_value(item, depth + 1) for key, item in value.items())
    if isinstance(value, float):
        return not math.isinf(value)  # NaN is a model's answer (a regressor's); infinity is not JSON
    return value is None or isinstance(value, (bool, int, str))


def _outputs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(method in METHODS for method in value):
        raise SignatureError("outputs: not an object of methods")
    if not all(_json_value(output) for output in value.values()):
        raise SignatureError("outputs: not plain JSON")
    return dict(value)


def _example(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, list):
        if len(value) > MAX_FEATURES or not all(isinstance(item, (int, float)) for item in value):
            raise SignatureError("a row that is not a list of numbers")
        return value
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS or not all(_scalar(item) for item in value.values()):
            raise SignatureError("a record whose values are not numbers or strings")
        return value
    raise SignatureError(f"a {type(value).__name__}, not a row")


PARSERS = {
    "model_type": _identifier,
    "estimator": _dotted,
    "steps": _steps,
    "n_features_in": _count,
    "feature_names_in": _names,
    "classes": _classes,
    "methods": _methods,
    "sklearn_version": _version,
    "python_version": _version,
    "input": _input,
    "example_outputs": _outputs,
}
# example_outputs is ServeML's record of the report's outputs, never a key of the probe's signature.
PROBE_KEYS = set(PARSERS) - {"example_outputs"}
