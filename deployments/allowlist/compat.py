"""The compatibility matrix: every scikit-learn estimator, saved by every supported release, through ServeML.

`bin/compat` (`make compat`) runs it; `python -m deployments.allowlist.compat --help` says how.

For each release in RELEASES (and each allowlist pack's current version):

1. **environment**: one uv environment from binary wheels, built by ServeML's own
   `ensure_environment` (cached under the data folder's envs/, bytecode compiled
   in the sandbox).
2. **generate**: compat_worker.py, run by that environment's interpreter in the
   sandbox, fits every estimator `all_estimators()` lists on toy data, saves it
   with pickle.dump, joblib.dump, joblib.dump(compress=3) and skops.io.dump, and
   streams the files out as a tar on stdout, each with the outputs the model
   itself gave on a fixed input. Files that do not load back and predict the
   same with plain pickle / joblib / skops in their own environment are not
   models anyone could upload, and are left out.
3. **inspect**: ServeML's scan (`scan_model_file`) and the reviewed allowlist
   (with the packs), exactly as the inspect stage checks them.
4. **load**: every file the allowlist accepts is loaded in the sandbox, in its
   own release's environment, by the restricted loader (serveml_loader.load)
   resolving only the globals the scan found, and must answer the fixed input
   exactly (byte for byte) like the fitted model did.

Everything is cached under <data folder>/matrix (var/compat/matrix for `make
compat`): environments, generated files, scans and loads (a load is redone when
the file, the allowlist or the loader changes). The results land in
matrix/results.json, which `python -m deployments.allowlist.build` grows the
allowlist from, and in docs/compat.md.
"""

import argparse
import hashlib
import io
import json
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from deployments.allowlist import review

WORKER = Path(__file__).with_name("compat_worker.py")
REPORT = Path(__file__).resolve().parents[2] / "docs" / "compat.md"
FORMATS = ("pickle", "joblib", "joblib-zlib", "skops")


@dataclass(frozen=True)
class Release:
    label: str
    requirements: tuple[str, ...]
    packs: tuple[str, ...] = ()  # allowlist packs this matrix tests (their packages are in requirements)


# The newest scikit-learn release: in the matrix on its own, and with the packs.
NEWEST = Release(
    "1.9.1",
    (
        "scikit-learn==1.9.1",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "pandas==3.1.1",
        "joblib==1.6.0",
        "threadpoolctl==3.8.0",
        "skops==0.16.0",
    ),
)

# Each release with the numpy, scipy, pandas and joblib of its day (what its users
# trained with), all binary wheels for CPython 3.11 on Linux. skops 0.16 needs
# scikit-learn 1.3+; 1.2.2 gets the newest skops that still supports it.
RELEASES = [
    Release(
        "1.2.2",
        (
            "scikit-learn==1.2.2",
            "numpy==1.24.4",
            "scipy==1.10.1",
            "pandas==1.5.3",
            "joblib==1.2.0",
            "threadpoolctl==3.1.0",
            "skops==0.11.0",
        ),
    ),
    Release(
        "1.3.2",
        (
            "scikit-learn==1.3.2",
            "numpy==1.26.4",
            "scipy==1.11.4",
            "pandas==2.1.4",
            "joblib==1.3.2",
            "threadpoolctl==3.2.0",
            "skops==0.16.0",
        ),
    ),
    Release(
        "1.4.2",
        (
            "scikit-learn==1.4.2",
            "numpy==1.26.4",
            "scipy==1.13.0",
            "pandas==2.2.2",
            "joblib==1.4.0",
            "threadpoolctl==3.4.0",
            "skops==0.16.0",
        ),
    ),
    Release(
        "1.5.2",
        (
            "scikit-learn==1.5.2",
            "numpy==2.1.1",
            "scipy==1.14.1",
            "pandas==2.2.3",
            "joblib==1.4.2",
            "threadpoolctl==3.5.0",
            "skops==0.16.0",
        ),
    ),
    Release(
        "1.6.1",
        (
            "scikit-learn==1.6.1",
            "numpy==2.2.2",
            "scipy==1.15.1",
            "pandas==2.2.3",
            "joblib==1.4.2",
            "threadpoolctl==3.5.0",
            "skops==0.16.0",
        ),
    ),
    Release(
        "1.7.2",
        (
            "scikit-learn==1.7.2",
            "numpy==2.3.3",
            "scipy==1.16.2",
            "pandas==2.3.2",
            "joblib==1.5.2",
            "threadpoolctl==3.6.0",
            "skops==0.16.0",
        ),
    ),
    Release(
        "1.8.0",
        (
            "scikit-learn==1.8.0",
            "numpy==2.3.5",
            "scipy==1.16.3",
            "pandas==2.3.3",
            "joblib==1.5.2",
            "threadpoolctl==3.6.0",
            "skops==0.16.0",
        ),
    ),
    NEWEST,
    # The packs' current versions, with the newest scikit-learn.
    Release(
        f"{NEWEST.label}+xgboost+lightgbm",
        (*NEWEST.requirements, "xgboost==3.2.0", "lightgbm==4.7.0"),
        packs=("xgboost", "lightgbm"),
    ),
]
RELEASES_BY_LABEL = {release.label: release for release in RELEASES}

CHUNK = 30  # estimators per generator process: a crash costs one chunk, which is then retried one by one
MiB, GiB = 1024**2, 1024**3


def log(message: str) -> None:
    print(f"[compat {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def matrix_dir() -> Path:
    from django.conf import settings

    path = settings.DATA_DIR / "matrix"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: Path, default):
    """A cache file, or `default` when there is none or it is damaged (a run killed before write_json)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError:
        log(f"{path} is damaged: starting it again")
        return default


def write_json(path: Path, data, **kwargs) -> None:
    """Whole or not at all: an interrupted run leaves the previous cache, never half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, **kwargs))
    partial.replace(path)


# ---------------------------------------------------------------- the sandbox


def environment(release: Release):
    from deployments.environments import ensure_environment
    from deployments.requirements import parse_requirements

    requirements = parse_requirements("\n".join(release.requirements) + "\n", allowed_packages=None)
    env = ensure_environment(requirements)
    if not env.reused:
        log(f"{release.label}: built environment {env.key[:12]} in {env.seconds:.0f} s")
    return env


def run_worker(env, args: list[str], files: dict[str, Path], *, wall: float):
    """compat_worker.py in the sandbox, in this environment: ServeML's one way to run a user's environment."""
    from deployments import buildkit, sandbox

    limits = sandbox.Limits(
        memory_bytes=6 * GiB, cpu_seconds=None, processes=64, file_bytes=1 * GiB, open_files=512, tmp_bytes=1 * GiB
    )
    launched = sandbox.launch(
        uid=sandbox.builder_uid(),
        environment=env.path,
        args=["compat_worker.py", *args],
        limits=limits,
        files={"compat_worker.py": WORKER, "serveml_loader.py": buildkit.LOADER, **files},
    )
    return sandbox.run(launched, wall_seconds=wall)


# ---------------------------------------------------------------- generate


def release_dir(release: Release) -> Path:
    path = matrix_dir() / release.label
    path.mkdir(parents=True, exist_ok=True)
    return path


def listing(release: Release, env) -> dict:
    cached = release_dir(release) / "estimators.json"
    worker = sha256(WORKER.read_bytes())
    if cached.exists() and json.loads(cached.read_text()).get("worker") == worker:
        return json.loads(cached.read_text())
    result = run_worker(env, ["list"], {}, wall=600)
    if result.returncode != 0:
        raise RuntimeError(f"{release.label}: listing estimators failed: {result.stderr.decode()[-2000:]}")
    found = {**json.loads(result.stdout), "worker": worker}
    write_json(cached, found, indent=1)
    return found


def generate(release: Release, env, only: list[str] | None = None) -> dict[str, dict]:
    """{estimator: record} for every estimator of this release, generating what is not cached yet."""
    from deployments.allowlist.compat_worker import DATA_VERSION

    names = only or listing(release, env)["estimators"]
    if release.packs and not only:  # the packs' estimators alone: the rest is the same release's matrix
        classes = listing(release, env)["classes"]
        names = [name for name in names if review.pack_of(classes.get(name.rstrip("]").split(",")[-1], ["", ""])[0])]
    files = release_dir(release) / "files"
    files.mkdir(exist_ok=True)
    missing = [name for name in names if not _current(files / name / "record.json")]
    for start in range(0, len(missing), CHUNK):
        chunk = missing[start : start + CHUNK]
        log(f"{release.label}: generating {len(chunk)} estimators ({start + len(chunk)}/{len(missing)})")
        done = _generate_chunk(env, chunk, files)
        for name in [n for n in chunk if n not in done]:  # the chunk's process died: one by one
            if not _generate_chunk(env, [name], files):
                _write_record(
                    files,
                    name,
                    {
                        "estimator": name,
                        "files": {},
                        "data_version": DATA_VERSION,
                        "unfit": "the generator's process died fitting or saving it",
                    },
                )
    return {name: json.loads((files / name / "record.json").read_text()) for name in names}


def _current(record: Path) -> bool:
    from deployments.allowlist.compat_worker import DATA_VERSION

    return record.exists() and json.loads(record.read_text()).get("data_version") == DATA_VERSION


def _generate_chunk(env, names: list[str], files: Path) -> set[str]:
    result = run_worker(env, ["generate", *names], {}, wall=1800)
    done = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(result.stdout), mode="r|") as archive:
            pending = {}
            for member in archive:
                name, _, leaf = member.name.partition("/")
                content = archive.extractfile(member).read()
                if leaf == "record.json":
                    for path, data in pending.pop(name, {}).items():
                        (files / name).mkdir(parents=True, exist_ok=True)
                        (files / name / path).write_bytes(data)
                    _write_record(files, name, json.loads(content))
                    done.add(name)
                else:
                    pending.setdefault(name, {})[leaf] = content
    except (tarfile.TarError, EOFError):
        pass  # a process that died mid-stream: keep the estimators it finished
    if result.returncode != 0 or result.timed_out:
        log(
            f"generator exited {result.returncode}{' (timed out)' if result.timed_out else ''}: "
            f"{result.stderr.decode(errors='replace')[-800:]}"
        )
    return done


def _write_record(files: Path, name: str, record: dict) -> None:
    (files / name).mkdir(parents=True, exist_ok=True)
    write_json(files / name / "record.json", record)


# ---------------------------------------------------------------- inspect


def scan_file(path: Path) -> dict:
    from deployments.inspection import InspectionError, scan_model_file

    with open(path, "rb") as handle:
        try:
            scan = scan_model_file(handle)
        except InspectionError as exc:
            return {"error": str(exc)}
    return {
        "format": scan.format,
        "globals": sorted([g.module, g.name] for g in scan.globals),
        "sklearn_version": scan.sklearn_version,
    }


def scans(release: Release, records: dict[str, dict]) -> dict[str, dict]:
    """{file: scan} for every generated file, cached by the file's content and the scanner's source."""
    import deployments.inspection

    scanner = sha256(Path(deployments.inspection.__file__).read_bytes())
    cache_path = release_dir(release) / "scans.json"
    cache = read_json(cache_path, {})
    files = release_dir(release) / "files"
    found = {}
    for record in records.values():
        for entry in record["files"].values():
            if "file" not in entry:
                continue
            data = (files / entry["file"]).read_bytes()
            key = f"{scanner}:{sha256(data)}"
            if cache.get(entry["file"], {}).get("key") != key:
                cache[entry["file"]] = {"key": key, "scan": scan_file(files / entry["file"])}
            found[entry["file"]] = cache[entry["file"]]["scan"]
    write_json(cache_path, cache)
    return found


def allowed_for(release: Release):
    """What ServeML accepts for this matrix: the reviewed allowlist, plus the packs it tests."""
    from deployments.allowlist import pack_globals, reviewed_globals

    return reviewed_globals() | pack_globals(release.packs)


# ---------------------------------------------------------------- load


def loads(release: Release, env, todo: list[dict]) -> dict[str, dict]:
    """{file: answer of the restricted loader in the sandbox}, cached by file, allowed globals and loader."""
    from deployments import buildkit
    from deployments.allowlist.compat_worker import OUTPUTS_VERSION

    loader = sha256(buildkit.LOADER.read_bytes() + str(OUTPUTS_VERSION).encode())
    cache_path = release_dir(release) / "loads.json"
    cache = read_json(cache_path, {})
    files = release_dir(release) / "files"

    def key(item):
        return sha256(json.dumps([loader, item["sha"], item["allowed_globals"]]).encode())

    pending = [item for item in todo if cache.get(item["file"], {}).get("key") != key(item)]
    while pending:
        batch, pending = pending[:200], pending[200:]
        log(
            f"{release.label}: loading {len(batch)} files with the restricted loader in the sandbox "
            f"({len(pending)} more after these)"
        )
        answers = _load_batch(env, batch, files)
        unanswered = [item for item in batch if item["id"] not in answers]
        for item in batch:
            if item["id"] in answers:
                cache[item["file"]] = {"key": key(item), "answer": answers[item["id"]]}
        if unanswered:
            # Answers come in order: the first file without one killed the process. It goes alone.
            culprit = unanswered[0]
            solo = _load_batch(env, [culprit], files) if len(batch) > 1 else {}
            cache[culprit["file"]] = {
                "key": key(culprit),
                "answer": solo.get(culprit["id"])
                or {"error": "the loading process died (crash, memory or time limit)"},
            }
            pending = unanswered[1:] + pending
        write_json(cache_path, cache)
    return {item["file"]: cache[item["file"]]["answer"] for item in todo}


def _load_batch(env, batch: list[dict], files: Path) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        archive_path = Path(tmp) / "models.tar"
        with tarfile.open(archive_path, "w") as archive:
            for item in batch:
                archive.add(files / item["file"], arcname=item["file"])
        manifest = Path(tmp) / "manifest.json"
        write_json(
            manifest,
            {
                "archive": "models.tar",
                "files": [
                    {key: item[key] for key in ("id", "file", "format", "allowed_globals", "data")} for item in batch
                ],
            },
        )
        result = run_worker(
            env,
            ["check", "manifest.json"],
            {"manifest.json": manifest, "models.tar": archive_path},
            wall=60 + 20 * len(batch),
        )
    answers = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        answers[answer.pop("id")] = answer
    if result.returncode != 0 or result.timed_out:
        log(
            f"checker exited {result.returncode}{' (timed out)' if result.timed_out else ''}: "
            f"{result.stderr.decode(errors='replace')[-800:]}"
        )
    return answers


# ---------------------------------------------------------------- one release


LOADER_FORMAT = {"pickle": "pickle", "joblib": "joblib", "joblib-zlib": "joblib", "skops": "skops"}


def run_release(release: Release, only: list[str] | None = None) -> list[dict]:
    """One row per file of this release: what ServeML did with it, and why."""
    from deployments.inspection import Global

    started = time.monotonic()
    env = environment(release)
    records = generate(release, env, only)
    scanned = scans(release, records)
    allowed = allowed_for(release)
    files = release_dir(release) / "files"
    rows, todo = [], []
    for name, record in sorted(records.items()):
        for fmt, entry in sorted(record["files"].items()):
            row = {
                "release": release.label,
                "estimator": name,
                "format": fmt,
                "file": entry.get("file"),
                "model_class": record.get("model_class"),
                "versions": record.get("versions", {}),
                "variant": is_variant(name),
            }
            rows.append(row)
            if "unsaved" in entry:
                row.update(status="not saved", detail=entry["unsaved"])
                continue
            if entry.get("plain_load") != "same":
                row.update(status="plain load fails", detail=entry.get("plain_load"))
                continue
            scan = scanned[entry["file"]]
            row["globals"] = scan.get("globals", [])
            if "error" in scan:
                row.update(status="refused by the scan", detail=scan["error"])
                continue
            missing = sorted(f"{m}.{n}" for m, n in scan["globals"] if Global(m, n) not in allowed)
            if missing:
                row.update(status="refused by the allowlist", missing=missing)
                continue
            item = {
                "id": str(len(todo)),
                "file": entry["file"],
                "format": LOADER_FORMAT[fmt],
                "allowed_globals": scan["globals"],
                "data": record["data"],
                "sha": sha256((files / entry["file"]).read_bytes()),
            }
            todo.append(item)
            row["_item"] = item
    answers = loads(release, env, todo) if todo else {}
    for row in rows:
        item = row.pop("_item", None)
        if item is None:
            continue
        answer = answers[item["file"]]
        expected = records[row["estimator"]]["outputs"]
        if "error" in answer:
            row.update(status="load fails", detail=answer["error"])
        elif {m: answer["outputs"].get(m) for m in expected} != expected:
            differing = sorted(m for m in expected if answer["outputs"].get(m) != expected[m])
            row.update(status="predicts differently", detail=", ".join(differing))
        else:
            row["status"] = "accepted"
    unfit = sorted(name for name, record in records.items() if "unfit" in record)
    defaults = [r for r in matrix_rows(rows) if not r["variant"]]
    log(
        f"{release.label}: {sum(r['status'] == 'accepted' for r in defaults)}/{len(defaults)} accepted "
        f"({len(unfit)} estimators do not fit on toy data with defaults) in {time.monotonic() - started:.0f} s"
    )
    write_json(release_dir(release) / "unfit.json", {name: records[name]["unfit"] for name in unfit}, indent=1)
    return rows


def is_variant(name: str) -> bool:
    """Beyond default parameters (compat_worker.VARIANTS): reported apart from the defaults' matrix."""
    return "@" in name or ("(" in name and not name.startswith("Pipeline["))


def matrix_rows(rows: list[dict]) -> list[dict]:
    """The files that are models a user could upload: saved, and loading back the same with plain pickle."""
    return [r for r in rows if r["status"] not in ("not saved", "plain load fails")]


# ---------------------------------------------------------------- results


def results_path() -> Path:
    return matrix_dir() / "results.json"


def write_results(rows: list[dict]) -> None:
    previous = read_json(results_path(), [])
    releases = {row["release"] for row in rows}
    kept = [row for row in previous if row["release"] not in releases]
    write_json(results_path(), kept + rows)


def read_results() -> list[dict]:
    return read_json(results_path(), [])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/compat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", action="append", help="only these releases (labels of RELEASES)")
    parser.add_argument("--estimator", action="append", help="only these estimators")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/compat.md from the cached results")
    args = parser.parse_args(argv)
    import django

    django.setup()
    from deployments.allowlist import compat_report

    if not args.report_only:
        for label in args.release or [release.label for release in RELEASES]:
            write_results(run_release(RELEASES_BY_LABEL[label], args.estimator))
    rows = read_results()
    REPORT.write_text(compat_report.render(rows))
    summary = Counter(row["status"] for row in matrix_rows(rows))
    log(f"wrote {REPORT}: {dict(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
