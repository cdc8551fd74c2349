"""A corpus of real, fitted scikit-learn models on small data.

Used to generate the reviewed allowlist and by the tests as the benign corpus
that must always deploy. Runs in whatever environment imports it (ServeML's
own, or a model environment when the allowlist is built across versions).
"""

import numpy as np


def iris():
    from sklearn.datasets import load_iris

    data = load_iris()
    return data.data, data.target


def iris_frame():
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True)
    return data.data, data.target


def mixed_frame():
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, 60).astype(float),
            "income": rng.normal(50_000, 10_000, 60),
            "city": rng.choice(["paris", "lyon", "nice"], 60),
        }
    )
    target = (frame["income"] > 50_000).astype(int)
    return frame, target


def texts():
    docs = ["good movie", "great film", "loved it", "bad movie", "awful film", "hated it"] * 3
    labels = [1, 1, 1, 0, 0, 0] * 3
    return docs, labels


def random_forest():
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=10, random_state=0).fit(*iris())


def logistic_regression():
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=500).fit(*iris())


def scaled_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(*iris())


def gradient_boosting_regressor():
    from sklearn.ensemble import GradientBoostingRegressor

    X, y = iris()
    return GradientBoostingRegressor(n_estimators=20, random_state=0).fit(X[:, :3], X[:, 3])


def hist_gradient_boosting():
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=20).fit(*iris())


def svc_pipeline():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(probability=True, random_state=0)).fit(*iris())


def column_transformer():
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    pre = ColumnTransformer(
        [("num", StandardScaler(), ["age", "income"]), ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])]
    )
    return Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=500))]).fit(*mixed_frame())


def text_pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    return make_pipeline(TfidfVectorizer(), LinearSVC()).fit(*texts())


def kmeans():
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=3, n_init=3, random_state=0).fit(iris()[0])


def isolation_forest():
    from sklearn.ensemble import IsolationForest

    return IsolationForest(n_estimators=20, random_state=0).fit(iris()[0])


def frame_random_forest():
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=10, random_state=0).fit(*iris_frame())


MODELS = {
    "random_forest": random_forest,
    "logistic_regression": logistic_regression,
    "scaled_logistic_regression": scaled_logistic_regression,
    "gradient_boosting_regressor": gradient_boosting_regressor,
    "hist_gradient_boosting": hist_gradient_boosting,
    "svc_pipeline": svc_pipeline,
    "column_transformer": column_transformer,
    "text_pipeline": text_pipeline,
    "kmeans": kmeans,
    "isolation_forest": isolation_forest,
    "frame_random_forest": frame_random_forest,
}
