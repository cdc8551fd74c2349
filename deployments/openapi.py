"""One deployment's prediction URL as an OpenAPI 3 document, built from its signature.

A pure function of plain data (the signature the sandboxed probe reported, the
example request, the URL, whether it is private): the web app serves it at
`/api/deployments/<id>/openapi.json` and the runtime may serve the same document
beside the prediction URL. Stdlib only, no Django.

The signature came out of a user's model, so every string in it (feature names,
class labels, the model type) is untrusted: it only ever lands in JSON values and
keys (serialised by a JSON encoder, never pasted into markup), and it is bounded:
past the limits below the document describes rows without naming every column.
"""

from urllib.parse import urlsplit

OPENAPI_VERSION = "3.0.3"
METHODS = ("predict", "predict_proba", "decision_function")
MAX_NAMED_FEATURES = 2000  # more than this: rows are described by their length only
MAX_LISTED_CLASSES = 1000  # more than this: predictions are described by their type only
MAX_STRING = 200  # a longer feature name or class label is not described one by one
MAX_TITLE = 100
SCALARS = (str, int, float, bool)
# null is a missing value (NaN): models that take them (forests, gradient boosting) predict,
# the others answer 400, so the document cannot promise either and allows it.
FEATURE_NUMBER = {"type": "number", "nullable": True}

ERRORS = {
    "400": "The input does not fit the model; `error` says what to change. Never a 500.",
    "401": "The deployment is private: send one of its API keys.",
    "404": "No deployment answers at this URL (unknown or stopped).",
    "413": "The request body is larger than 10 MB: send fewer rows per request.",
    "502": "The model process crashed or answered too much; it is restarted on the next request.",
    "503": "The model process could not start or load the model; try again shortly.",
    "504": "The model took too long to answer.",
}


def prediction_document(
    *,
    title: str,
    endpoint_url: str,
    signature: dict,
    example_request: dict | None = None,
    private: bool = False,
) -> dict:
    """The OpenAPI document of one prediction URL (`POST endpoint_url`)."""
    parts = urlsplit(endpoint_url)
    server = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    path = parts.path or "/"
    signature = signature if isinstance(signature, dict) else {}
    methods = [m for m in METHODS if m in _list(signature.get("methods"))] or ["predict"]
    model_type = _short_text(signature.get("model_type")) or "model"
    row = _row_schema(signature, _example_row(example_request))

    method_schema = {
        "type": "string",
        "enum": methods,
        "default": "predict",
        "description": "Which of the model's methods answers.",
    }
    one_row = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"$ref": "#/components/schemas/Row"}, "method": method_schema},
    }
    many_rows = {
        "type": "object",
        "required": ["instances"],
        "properties": {
            "instances": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Row"}},
            "method": method_schema,
        },
    }
    output = _output_schema(signature, methods)
    components = {
        "schemas": {
            "Row": row,
            "OneRow": one_row,
            "ManyRows": many_rows,
            "PredictionRequest": {
                "anyOf": [
                    {"$ref": "#/components/schemas/OneRow"},
                    {"$ref": "#/components/schemas/ManyRows"},
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {"$ref": "#/components/schemas/Row"},
                        "description": "A bare list of rows: the same as `instances`.",
                    },
                ]
            },
            "Output": output,
            "Prediction": {
                "type": "object",
                "required": ["prediction", "model_type"],
                "properties": {"prediction": {"$ref": "#/components/schemas/Output"}, "model_type": {"type": "string"}},
            },
            "Predictions": {
                "type": "object",
                "required": ["predictions", "model_type"],
                "properties": {
                    "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Output"}},
                    "model_type": {"type": "string"},
                },
            },
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        }
    }
    responses = {
        "200": {
            "description": "`prediction` for `data`, `predictions` (one per row) for `instances`.",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/Prediction"},
                            {"$ref": "#/components/schemas/Predictions"},
                        ]
                    },
                    **_response_example(signature, model_type),
                }
            },
        }
    }
    for code, description in ERRORS.items():
        if code == "401" and not private:
            continue
        responses[code] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    operation = {
        "operationId": "predict",
        "summary": f"Predict with this {model_type}",
        "description": _describe(signature, methods),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/PredictionRequest"},
                    **_request_examples(example_request, methods),
                }
            },
        },
        "responses": responses,
    }
    if private:
        components["securitySchemes"] = {
            "bearerKey": {"type": "http", "scheme": "bearer", "description": "One of the deployment's API keys."},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        operation["security"] = [{"bearerKey": []}, {"apiKeyHeader": []}]
    document = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": (_short_text(title, MAX_TITLE) or "model") + " — ServeML prediction URL",
            "version": str(signature.get("sklearn_version") or "1")[:40],
            "description": "Generated by ServeML from the model's signature, as its sandboxed validation reported it.",
        },
        "paths": {path: {"post": operation}},
        "components": components,
    }
    if server:
        document["servers"] = [{"url": server}]
    return document


def deployment_document(deployment) -> dict | None:
    """The document of a Deployment row's URL, or None while it has none. A deployment's stable URL
    answers with the version it serves, so that version's signature describes it; a version's own
    URL, with its own. Privacy is the deployment's. (The row is duck-typed: no Django import here.)"""
    described = deployment if deployment.version_of_id else deployment.serving_version()
    if not deployment.endpoint_url or not isinstance(described.signature, dict):
        return None
    if not described.signature.get("methods"):
        return None
    return prediction_document(
        title=deployment.name,
        endpoint_url=deployment.endpoint_url,
        signature=described.signature,
        example_request=described.example_request,
        private=deployment.root.is_private,
    )


# ------------------------------------------------------------------ pieces


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _short_text(value, limit: int = MAX_STRING) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _feature_names(signature: dict) -> list[str] | None:
    names = signature.get("feature_names_in")
    if not isinstance(names, list) or not names or len(names) > MAX_NAMED_FEATURES:
        return None
    if not all(isinstance(n, str) and len(n) <= MAX_STRING for n in names) or len(set(names)) != len(names):
        return None
    return names


def _n_features(signature: dict) -> int | None:
    n = signature.get("n_features_in")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _example_row(example_request):
    return example_request.get("data") if isinstance(example_request, dict) else None


def _row_schema(signature: dict, example) -> dict:
    names = _feature_names(signature)
    n_features = _n_features(signature)
    kind = signature.get("input")
    if kind == "text" or (kind is None and names is None and n_features is None):
        return {"type": "string", "description": "One text, for a model that takes raw text."}
    if names is not None:
        # Column types from the probe's example: categories it found are strings, the rest numbers.
        example = example if isinstance(example, dict) else {}
        properties = {name: _column_schema(example.get(name)) for name in names}
        record = {
            "type": "object",
            "description": "One row as a record: every feature by name (a DataFrame row).",
            "required": names,
            "properties": properties,
            "additionalProperties": False,
        }
        in_order = {
            "type": "array",
            "description": f"One row as a list of {len(names)} values in the model's column order: {_join(names)}.",
            "minItems": len(names),
            "maxItems": len(names),
            "items": {"anyOf": [FEATURE_NUMBER, {"type": "string"}]},
        }
        return {"anyOf": [record, in_order]}
    row = {
        "type": "array",
        "description": "One row: the feature values in the order the model was fitted with.",
        "items": FEATURE_NUMBER,
    }
    if n_features is not None:
        row["minItems"] = row["maxItems"] = n_features
        row["description"] = f"One row: {n_features} feature values in the order the model was fitted with."
    return row


def _column_schema(example) -> dict:
    if isinstance(example, str):
        return {"type": "string", "example": example[:MAX_STRING]}
    return dict(FEATURE_NUMBER)


def _join(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _classes(signature: dict) -> list | None:
    classes = signature.get("classes")
    if not isinstance(classes, list) or not classes or len(classes) > MAX_LISTED_CLASSES:
        return None
    if not all(isinstance(c, SCALARS) and (not isinstance(c, str) or len(c) <= MAX_STRING) for c in classes):
        return None  # a multi-output model's classes are a list per output
    return classes


def _output_schema(signature: dict, methods: list[str]) -> dict:
    classes = _classes(signature)
    number = {"type": "number", "nullable": True}  # a non-finite result is sent as null
    numbers = {"type": "array", "items": number}
    choices = []
    if classes is not None:
        choices.append({"enum": classes, "description": "predict: one of the model's classes."})
    elif signature.get("classes") is not None:
        choices.append({"type": "array", "description": "predict: one class per output."})
    else:
        choices += [number, numbers]
    if signature.get("classes") is not None and ("predict_proba" in methods or "decision_function" in methods):
        per_class = dict(numbers, description="predict_proba / decision_function: one number per class.")
        if classes is not None and "decision_function" not in methods:  # ovo shapes differ
            per_class["minItems"] = per_class["maxItems"] = len(classes)
        choices.append(per_class)
        if "decision_function" in methods:
            choices.append(dict(number, description="decision_function of a binary model: one score."))
    unique = []
    for choice in choices:
        if choice not in unique:
            unique.append(choice)
    return unique[0] if len(unique) == 1 else {"anyOf": unique}


def _describe(signature: dict, methods: list[str]) -> str:
    names = _feature_names(signature)
    n_features = _n_features(signature)
    if names is not None:
        rows = f"{len(names)} named features ({_join(names)}), as records or lists in that order"
    elif n_features is not None:
        rows = f"{n_features} numeric features per row"
    else:
        rows = "one text per row"
    classes = _classes(signature)
    lines = [
        f"Rows: {rows}.",
        f"Methods: {', '.join(methods)} (choose with `method`; `predict` by default).",
        'Send one row as `{"data": row}` or several as `{"instances": [row, …]}`.',
    ]
    if classes is not None:
        lines.append(f"Classes: {', '.join(str(c) for c in classes[:20])}{' …' if len(classes) > 20 else ''}.")
    return "\n\n".join(lines)


def _request_examples(example_request, methods: list[str]) -> dict:
    if not isinstance(example_request, dict) or "data" not in example_request:
        return {}
    row = example_request["data"]
    examples = {
        "one_row": {"summary": "One row", "value": {"data": row}},
        "several_rows": {"summary": "Several rows", "value": {"instances": [row, row]}},
    }
    if "predict_proba" in methods:
        examples["probabilities"] = {
            "summary": "Class probabilities",
            "value": {"instances": [row], "method": "predict_proba"},
        }
    return {"examples": examples}


def _response_example(signature: dict, model_type: str) -> dict:
    outputs = signature.get("example_outputs")
    if not isinstance(outputs, dict) or "predict" not in outputs:
        return {}
    return {"example": {"prediction": outputs["predict"], "model_type": model_type}}
