"""The review behind allowlist.json: what each global does when a pickle calls it, and the verdict.

A pickle can call any allowed callable with any positional arguments at load time
(REDUCE), build any allowed class without its constructor (NEWOBJ) and hand any
object a state of its choosing (BUILD: __setstate__ or __dict__). So each pair
is reviewed as what it is, not as what scikit-learn uses it for:

* harmless: builds data (containers, arrays, estimators storing their
  parameters) or computes on arrays (`f_classif`, `numpy.mean`);
* refused: anything that runs code, imports by name, reaches attributes or
  calls methods by a name the file chooses (`getattr`, scorers), reads or
  writes files or takes a path (`numpy.load`, `joblib.load`, `pandas.read_*`,
  `scipy.io.*`), and what calls a callable it is given unless real models
  need it (FunctionTransformer, score_func: those callables must themselves be
  on this list, so all they add is keyword arguments, which every entry here is
  reviewed with too).

`verdict()` answers for one pair. build.py writes only pairs with a favourable
verdict, and stops on any pair nobody has reviewed yet: a new scikit-learn
release that pickles something new needs a person to read it and add it here.
"""

# ---------------------------------------------------------------- reviewed one by one

# Builds data; never runs code, imports or touches a file.
HELPERS = {
    # builtins: plain constructors of immutable or container values.
    **{
        f"builtins.{name}": "a built-in value type: builds a container or a number from its arguments"
        for name in (
            "slice",
            "set",
            "frozenset",
            "bytearray",
            "complex",
            "range",
            "object",
            "float",
            "int",
            "str",
            "bytes",
            "tuple",
            "list",
            "dict",
            "bool",
        )
    },
    # protocol-2 pickles written by Python 2 name the same types under __builtin__
    **{f"__builtin__.{name}": "the Python 2 name of a built-in value type" for name in ("bytes", "set", "slice")},
    "_codecs.encode": "how protocol-2 pickles write bytes: encodes a str with a codec (the codec is looked up "
    "by name among Python's own encodings package, which runs no code of the file's)",
    "collections.OrderedDict": "a dict",
    "collections.defaultdict": "a dict whose default factory must itself be an allowed callable",
    "copyreg._reconstructor": "protocol-2 object rebuild: base.__new__(cls) and base.__init__ — both must be "
    "allowed classes",
    "datetime.datetime": "a date value",
    "datetime.date": "a date value",
    "datetime.timedelta": "a duration",
    # numpy
    "numpy.dtype": "an array's element type",
    "numpy.ndarray": "an array (only from a shape, a type and bytes)",
    "numpy.core.multiarray._reconstruct": "numpy 1's array unpickling: an empty array of a given type",
    "numpy.core.multiarray.scalar": "numpy 1's scalar unpickling: a number from a dtype and bytes",
    "numpy._core.multiarray._reconstruct": "numpy 2's array unpickling: an empty array of a given type",
    "numpy._core.multiarray.scalar": "numpy 2's scalar unpickling: a number from a dtype and bytes",
    "numpy.core.numeric._frombuffer": "numpy 1's unpickling of arrays in protocol 5: an array over bytes",
    "numpy._core.numeric._frombuffer": "numpy 2's unpickling of arrays in protocol 5: an array over bytes",
    "numpy.ma.core._mareconstruct": "a masked array from a shape and type",
    "numpy.ma.core.MaskedArray": "a masked array",
    "numpy.ma.MaskedArray": "a masked array, as numpy 2 names it (search estimators' cv_results_)",
    **{
        f"numpy.{name}": "a numpy scalar type: a number"
        for name in ("float64", "int64", "uint64", "float32", "int32", "bool_", "str_", "intc")
    },
    "numpy.random._pickle.__randomstate_ctor": "a RandomState from a bit generator's name (one of numpy's own)",
    "numpy.random._pickle.__bit_generator_ctor": "a bit generator from its name (one of numpy's own, looked up "
    "in a fixed table)",
    "numpy.random._pickle.__generator_ctor": "a Generator from a bit generator's name (numpy's own table)",
    "numpy.random.__RandomState_ctor": "numpy 1.x's RandomState unpickling",
    "numpy.random._mt19937.MT19937": "a random bit generator",
    "numpy.random._pcg64.PCG64": "a random bit generator",
    "numpy.random.mtrand.RandomState": "a random number generator",
    "numpy.random._generator.Generator": "a random number generator",
    "numpy.random.bit_generator.SeedSequence": "a seed",
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence": "Cython's unpickle helper for SeedSequence",
    "numpy.mean": "arithmetic on an array (FeatureAgglomeration's default pooling_func)",
    # joblib
    "joblib.numpy_pickle.NumpyArrayWrapper": "joblib's array wrapper: the array's bytes follow it in the same "
    "file (not NDArrayWrapper, which reads a second file by name)",
    # scipy
    **{
        f"scipy.sparse.{module}.{name}": "a sparse matrix from arrays"
        for module, name in (
            ("_csr", "csr_matrix"),
            ("_csc", "csc_matrix"),
            ("_coo", "coo_matrix"),
            ("_csr", "csr_array"),
            ("_csc", "csc_array"),
            ("_coo", "coo_array"),
            ("csr", "csr_matrix"),
            ("csc", "csc_matrix"),
            ("coo", "coo_matrix"),
        )
    },
    "scipy.interpolate._bsplines.BSpline": "a spline from knots and coefficients (SplineTransformer); "
    "evaluating it is arithmetic",
    "scipy._lib.array_api_compat.numpy._aliases.asarray": "numpy.array(obj, dtype, copy): an array from its "
    "argument (scipy 1.17's BSpline keeps it)",
    # pandas: frames and their parts, from arrays
    "pandas.core.indexes.base._new_Index": "an Index from its class (which must be allowed) and data",
    "pandas.core.indexes.base.Index": "an index",
    "pandas.core.indexes.range.RangeIndex": "an index",
    "pandas.core.frame.DataFrame": "a data frame",
    "pandas.core.series.Series": "a series",
    "pandas._libs.internals._unpickle_block": "a frame's block of values from an array",
    "pandas.core.internals.managers.BlockManager": "a frame's blocks",
    "pandas.core.internals.managers.SingleBlockManager": "a series' block",
    "pandas.core.arrays.categorical.Categorical": "categorical values",
    "pandas.core.dtypes.dtypes.CategoricalDtype": "a categorical type",
}

# scikit-learn functions: what a call does, with any arguments.
FUNCTIONS = {
    **{
        f"sklearn.feature_selection._univariate_selection.{name}": "a univariate statistic over arrays "
        "(SelectKBest's and its siblings' score_func)"
        for name in ("f_classif", "f_regression", "chi2", "f_oneway", "r_regression")
    },
    **{
        f"sklearn.feature_selection._mutual_info.{name}": "a mutual-information statistic over arrays"
        for name in ("mutual_info_classif", "mutual_info_regression")
    },
    **{
        f"sklearn.metrics._classification.{name}": "a classification metric over arrays"
        for name in (
            "accuracy_score",
            "balanced_accuracy_score",
            "f1_score",
            "precision_score",
            "recall_score",
            "log_loss",
            "matthews_corrcoef",
        )
    },
    **{
        f"sklearn.metrics._regression.{name}": "a regression metric over arrays"
        for name in ("r2_score", "mean_squared_error", "mean_absolute_error")
    },
    "sklearn.metrics._scorer._passthrough_scorer": "scikit-learn < 1.4's default scorer of search estimators: "
    "calls estimator.score(...), a fixed method name, on an object "
    "the file built from allowed types",
    "sklearn.cluster._kmeans._kmeans_single_lloyd": "one k-means run over arrays (BisectingKMeans keeps it); "
    "its thread count is bounded by the sandbox",
    "sklearn.cluster._kmeans._kmeans_single_elkan": "one k-means run over arrays (BisectingKMeans, algorithm='elkan')",
    "sklearn.metrics._dist_metrics.newObj": "obj.__new__(obj): an empty instance of an allowed class "
    "(how Cython distance metrics unpickle)",
    "sklearn.neighbors._kd_tree.newObj": "obj.__new__(obj): an empty instance (how KDTree unpickles)",
    "sklearn.neighbors._ball_tree.newObj": "obj.__new__(obj): an empty instance (how BallTree unpickles)",
}

# Allowed scikit-learn classes that deserve their own note (the others are covered by the class rule below).
CLASSES = {
    "sklearn.utils._bunch.Bunch": "a dict whose keys are also attributes (Stacking and Voting estimators)",
    "sklearn.neighbors._kd_tree.KDTree": "builds a tree over an array; its state is arrays",
    "sklearn.neighbors._ball_tree.BallTree": "builds a tree over an array; its state is arrays",
    "sklearn.tree._tree.Tree": "a fitted tree from arrays of nodes and values",
    "sklearn.metrics._scorer._PassthroughScorer": "scikit-learn 1.4+'s default scorer of search estimators: "
    "calls estimator.score(...), a fixed method name",
}

# Found in real models (or asked for) and refused, with the reason a refusal shows.
REFUSED = {
    "builtins.getattr": "reaches any attribute of any object: from any allowed object to os.system",
    "builtins.eval": "runs code",
    "builtins.exec": "runs code",
    "builtins.compile": "compiles code",
    "builtins.__import__": "imports any module",
    "builtins.open": "opens a file",
    "builtins.setattr": "changes any attribute of any object",
    "builtins.delattr": "deletes attributes",
    "builtins.vars": "reaches any object's namespace",
    "builtins.globals": "reaches a module's namespace",
    "builtins.type": "builds new classes",
    "builtins.breakpoint": "starts a debugger",
    "builtins.input": "reads the process's input",
    "builtins.print": "writes to the process's output",
    "numpy.load": "reads a file by name (and unpickles it with allow_pickle=True)",
    "numpy.save": "writes a file by name",
    "numpy.fromfile": "reads a file by name",
    "numpy.loadtxt": "reads a file by name",
    "numpy.genfromtxt": "reads a file by name",
    "numpy.memmap": "maps a file by name",
    "numpy.lib.format.read_array": "unpickles object arrays from a file",
    "numpy.core._ufunc_reconstruct": "imports any module by name and takes any attribute of it",
    "numpy._core._ufunc_reconstruct": "imports any module by name and takes any attribute of it",
    "numpy.testing._private.utils.runstring": "runs code",
    "joblib.load": "loads another file by name, unrestricted",
    "joblib.numpy_pickle.load": "loads a file by name",
    "joblib.numpy_pickle_compat.NDArrayWrapper": "joblib < 0.10: loads its array with numpy.load from a path in "
    "the file, a second pickle nobody inspected",
    "joblib.numpy_pickle_compat.ZNDArrayWrapper": "joblib < 0.10: reads its array from a path in the file",
    "pickle.loads": "unpickles a second, uninspected pickle",
    "pickle.load": "unpickles from a file object",
    "functools.partial": "binds keyword arguments to any allowed callable, which a pickle alone cannot pass",
    "operator.attrgetter": "reaches attributes by name",
    "operator.methodcaller": "calls methods by name",
    "operator.itemgetter": "reaches items by key of any object",
    "sklearn.utils.parallel.Parallel": "runs the calls it is given, in other processes too",
    "sklearn.utils.parallel.delayed": "wraps any callable for Parallel",
    "sklearn.utils._testing.TempMemmap": "creates files",
}
# Whole modules refused whatever the name: they read and write files, or run code.
REFUSED_MODULES = {
    "os": "reaches the operating system",
    "posix": "reaches the operating system",
    "nt": "reaches the operating system",
    "subprocess": "runs programs",
    "sys": "reaches the interpreter",
    "shutil": "changes files",
    "socket": "opens network connections",
    "importlib": "imports modules",
    "runpy": "runs modules",
    "code": "runs code",
    "pty": "runs programs",
    "ctypes": "calls native code",
    "io": "opens files",
    "pathlib": "reaches files",
    "tempfile": "creates files",
    "webbrowser": "starts programs",
    "scipy.io": "reads and writes files by name",
    "pandas.io": "reads and writes files by name",
    "sklearn.datasets": "downloads and reads data sets from files",
    "sklearn.externals": "vendored code",
    "sklearn.utils._testing": "test helpers that create files",
    "sklearn.utils.parallel": "runs calls it is given",
    "sklearn.utils._mocking": "test doubles that call what they are given",
    "sklearn.tests": "tests",
}

# Classes in scikit-learn modules that the class rule must not let through.
SKLEARN_CLASS_EXCEPTIONS = {
    # Scorers call a method named in their own state on the estimator they are given. A file can call one
    # at load time (REDUCE on the instance), or have a FunctionTransformer call it at predict time: either
    # way it calls any method, by a name of its choosing, on an object of its choosing.
    "sklearn.metrics._scorer._Scorer": "a scorer calls a method named in its own state on the object it is "
    "given: a call-by-name gadget (scoring='accuracy' and the like)",
    "sklearn.metrics._scorer._PredictScorer": "a scorer that calls a method named in its state (call-by-name)",
    "sklearn.metrics._scorer._ProbaScorer": "a scorer that calls a method named in its state (call-by-name)",
    "sklearn.metrics._scorer._ThresholdScorer": "a scorer that calls a method named in its state (call-by-name)",
    "sklearn.metrics._scorer._CurveScorer": "a scorer that calls a method named in its state (call-by-name)",
    "sklearn.metrics._scorer._MultimetricScorer": "calls the scorers it holds, each calling a named method",
    "sklearn.model_selection._classification_threshold._CurveScorer": "a scorer that calls a method named in "
    "its state (call-by-name)",
    "sklearn.utils.deprecation.deprecated": "rewrites the classes and functions it is given",
    # Callables they are given are themselves allowlisted, but no model the matrix produces needs these.
    "sklearn.metrics._dist_metrics.PyFuncDistance": "a distance that calls a Python function it is given",
    "sklearn.metrics._dist_metrics.PyFuncDistance32": "a distance that calls a Python function it is given",
    "sklearn.metrics._dist_metrics.PyFuncDistance64": "a distance that calls a Python function it is given",
    "sklearn.gaussian_process.kernels.PairwiseKernel": "a kernel that calls the metric function it is given",
}

# Top-level module names that some scikit-learn wheels write, accepted by the scan only because the
# restricted loader never imports them under that name (serveml_loader.ALIASES).
ALIASED_MODULES = {"_loss": "sklearn._loss._loss"}


# Packs: the scikit-learn APIs of popular libraries, enabled only when the operator allows the package.
BOOSTER = (
    "rebuilt with __new__ and __setstate__ from the model its library serialised (bytes for xgboost, "
    "text for lightgbm, parsed by the library's own C++ code in the sandbox); its constructor reads a "
    "model file by name, so the restricted loader refuses any call to it while a model loads "
    "(serveml_loader.CONSTRUCT_ONLY)"
)
PACKS = {
    "xgboost": {
        "package": "xgboost",
        "globals": {
            "xgboost.sklearn.XGBClassifier": "xgboost's scikit-learn classifier: its constructor stores parameters",
            "xgboost.sklearn.XGBRegressor": "xgboost's scikit-learn regressor: its constructor stores parameters",
            "xgboost.core.Booster": BOOSTER,
        },
    },
    "lightgbm": {
        "package": "lightgbm",
        "globals": {
            "lightgbm.sklearn.LGBMClassifier": "lightgbm's scikit-learn classifier: its constructor stores parameters",
            "lightgbm.sklearn.LGBMRegressor": "lightgbm's scikit-learn regressor: its constructor stores parameters",
            "lightgbm.basic.Booster": BOOSTER,
        },
    },
}

CLASS_RULE = (
    "a scikit-learn class: building one, with any arguments, stores them or builds arrays; its "
    "methods run only when the model is used"
)


def pack_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in PACKS else None


# ---------------------------------------------------------------- the verdict


def _in(module: str, modules: dict) -> str | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return modules[prefix]
    return None


def verdict(module: str, name: str) -> tuple[bool | None, str]:
    """(True, why it is harmless) | (False, why it is refused) | (None, "not reviewed")."""
    key = f"{module}.{name}"
    if key in REFUSED:
        return False, REFUSED[key]
    if (reason := _in(module, REFUSED_MODULES)) is not None:
        return False, reason
    if "tests" in module.split(".") or "conftest" in module.split("."):
        return False, "a test module: no real model is made of it"
    if key in SKLEARN_CLASS_EXCEPTIONS:
        return False, SKLEARN_CLASS_EXCEPTIONS[key]
    if module in ALIASED_MODULES:
        allowed, why = verdict(ALIASED_MODULES[module], name)
        return allowed, (
            f"written by scikit-learn 1.5-1.8 under the bare module {module}; the restricted "
            f"loader imports it only as {ALIASED_MODULES[module]}.{name}: {why}"
        )
    for reviewed in (HELPERS, FUNCTIONS, CLASSES):
        if key in reviewed:
            return True, reviewed[key]
    if (pack := pack_of(module)) is not None:
        if key in PACKS[pack]["globals"]:
            return True, PACKS[pack]["globals"][key]
        return None, "not reviewed yet"
    if module.split(".")[0] == "sklearn" and name.isidentifier():
        if name.startswith("__pyx_unpickle_") and name[len("__pyx_unpickle_") :][:1].isupper():
            return True, (
                f"Cython's unpickle helper for {name[len('__pyx_unpickle_') :]}: an instance of that "
                "class (or a subclass it is given) from its state, after checking the layout checksum"
            )
        if name[:1].isupper() or (name[:1] == "_" and name[1:2].isupper()):
            return True, CLASS_RULE
    return None, "not reviewed yet"


def why_refused(dotted: str) -> str:
    """The reason a refusal shows for a name a model file imports."""
    module, _, name = dotted.rpartition(".")
    allowed, why = verdict(module, name)
    if allowed is False:
        return f"refused: {why}"
    if allowed is None:
        return "not on the reviewed allowlist (not reviewed yet)"
    return f"reviewed as harmless ({why}) but not on the allowlist: run `python -m deployments.allowlist.build`"
