"""Regenerate allowlist.json from the compatibility matrix: `python -m deployments.allowlist.build [--fresh]`.

Run `bin/compat` first (or `bin/build-allowlist`, which runs both): it saves every
estimator of every supported scikit-learn release in every format and scans each
file (compat.py). This collects the (module, name) pairs those files import, the
estimator classes each release lists (fitted or not: a user fits them on real
data) and the families a parameter chooses from (kernels, distances, losses, CV
splitters: compat_worker.FAMILIES), the corpus models (corpus.py, pandas frames and text among them) and the
reviewed reconstruction helpers, plus the pairs already on the list (unless
--fresh), and keeps each pair the review (review.py)
finds harmless, recording which releases produce it. Pairs the review refuses
are listed in the file's "refused" section with the reason; a pair nobody has
reviewed stops the build, so that a new release's new globals are read by a
person before any model may import them.

Pack pairs (xgboost, lightgbm: review.PACKS) go to their pack, enabled only
when an operator allows the package.

The bare `_loss.<name>` pairs are what scikit-learn 1.5.2 to 1.8.0 wheels write
for their Cython losses (1.2.2-1.4.2 and 1.9+ write sklearn._loss._loss). They
are accepted by the scan as written, and the restricted loader only ever
imports them as sklearn._loss._loss.<name> (serveml_loader.ALIASES), never from a
top-level module named `_loss`, which any package could ship.
"""

import io
import json
import pickle
import sys
from collections import defaultdict

from deployments.allowlist import DATA_FILE, review


def corpus_globals() -> set[tuple[str, str]]:
    """What the corpus models import in ServeML's own environment (frames, text, column transformers)."""
    import joblib

    from deployments.allowlist.corpus import MODELS
    from deployments.inspection import scan_model_file

    found = set()
    for factory in MODELS.values():
        model = factory()
        blobs = [pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL), pickle.dumps(model, protocol=2)]
        for compress in (0, 3, ("lz4", 3), ("gzip", 3)):
            buffer = io.BytesIO()
            joblib.dump(model, buffer, compress=compress)
            blobs.append(buffer.getvalue())
        import skops.io

        blobs.append(skops.io.dumps(model))
        for blob in blobs:
            found |= {(g.module, g.name) for g in scan_model_file(io.BytesIO(blob)).globals}
    return found


def matrix_globals() -> tuple[dict, dict, list[str]]:
    """({pair: {release}}, {pack: {pair: {"<package> <version>"}}}, core releases) from the matrix's results."""
    from deployments.allowlist.compat import RELEASES, matrix_dir, read_results
    from deployments.allowlist.compat_report import IN_MATRIX

    core: dict[tuple[str, str], set[str]] = defaultdict(set)
    packs: dict[str, dict[tuple[str, str], set[str]]] = defaultdict(lambda: defaultdict(set))
    rows = [row for row in read_results() if IN_MATRIX(row)]
    if not rows:
        raise SystemExit("No matrix results: run bin/compat first (see deployments/allowlist/compat.py).")
    for row in rows:
        sklearn_version = row["versions"].get("scikit-learn") or row["release"].split("+")[0]
        for module, name in row.get("globals", []):
            pack = review.pack_of(module)
            if pack:
                package = review.PACKS[pack]["package"]
                packs[pack][(module, name)].add(f"{package} {row['versions'].get(package, '?')}")
            else:
                core[(module, name)].add(sklearn_version)
    for release in RELEASES:
        listing = matrix_dir() / release.label / "estimators.json"
        if not listing.exists():
            continue
        listed = json.loads(listing.read_text())
        # Every estimator class, and every member of the families a parameter picks from (kernels,
        # distances, losses, CV splitters), as this release names them.
        for module, name in [*listed.get("classes", {}).values(), *listed.get("families", [])]:
            if not review.pack_of(module):
                core[(module, name)].add(release.label.split("+")[0])
    releases = sorted({v for found in core.values() for v in found}, key=_version_key)
    return core, packs, releases


def _version_key(version: str):
    return [int(part) if part.isdecimal() else 0 for part in version.split(".")]


def previous_globals() -> dict[tuple[str, str], set[str]]:
    """The pairs of the allowlist as it stands: a build never drops a reviewed pair that real models
    need just because this matrix does not produce it (a ColumnTransformer on a data frame, say)."""
    if not DATA_FILE.exists():
        return {}
    data = json.loads(DATA_FILE.read_text())
    found = {}
    for module, names in data["globals"].items():
        for name in names:
            versions = names[name].get("versions", []) if isinstance(names, dict) else []
            found[(module, name)] = set(versions)
    return found


def main(argv: list[str]) -> None:
    import django

    django.setup()
    core, packs, releases = matrix_globals()
    if "--fresh" not in argv:
        for pair, versions in previous_globals().items():
            core.setdefault(pair, set())
            if not core[pair]:
                core[pair] |= versions
    for pair in corpus_globals():
        core.setdefault(pair, set())
    for dotted in review.HELPERS:
        module, _, name = dotted.rpartition(".")
        core.setdefault((module, name), set())
    allowed, refused, unreviewed = {}, {}, []
    for (module, name), versions in sorted(core.items()):
        ok, why = review.verdict(module, name)
        entry = {"versions": sorted(versions, key=_version_key)}
        if ok:
            allowed.setdefault(module, {})[name] = entry | ({"why": why} if why != review.CLASS_RULE else {})
        elif ok is False:
            refused.setdefault(module, {})[name] = entry | {"why": why}
        else:
            unreviewed.append(f"{module}.{name}")
    pack_data = {}
    for pack, found in sorted(packs.items()):
        section = {}
        for (module, name), versions in sorted(found.items()):
            ok, why = review.verdict(module, name)
            if ok:
                section.setdefault(module, {})[name] = {"versions": sorted(versions), "why": why}
            elif ok is None:
                unreviewed.append(f"{module}.{name}")
        pack_data[pack] = {
            "package": review.PACKS[pack]["package"],
            "versions": sorted({v for found in found.values() for v in found}),
            "globals": section,
        }
    if unreviewed:
        raise SystemExit(
            "Not reviewed yet (add each to deployments/allowlist/review.py, allowed or refused, "
            "with the reason):\n  " + "\n  ".join(sorted(unreviewed))
        )
    data = {
        "comment": "Reviewed allowlist of (module, name) globals a model file may import, with the scikit-learn "
        "releases whose models import each (versions: [] for reviewed helpers the matrix does not "
        "produce). Generated by python -m deployments.allowlist.build from the compatibility matrix "
        "and deployments/allowlist/review.py; review every change.",
        "scikit_learn_versions": releases,
        "globals": allowed,
        "packs": pack_data,
        "refused": refused,
    }
    DATA_FILE.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    count = sum(len(names) for names in allowed.values())
    in_packs = {pack: sum(len(n) for n in section["globals"].values()) for pack, section in pack_data.items()}
    print(
        f"{count} globals in {len(allowed)} modules, packs {in_packs}, "
        f"{sum(len(n) for n in refused.values())} refused -> {DATA_FILE}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
