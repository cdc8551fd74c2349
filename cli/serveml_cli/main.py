"""serveml: deploy scikit-learn models to a ServeML server and call them, from a terminal.

    serveml login http://127.0.0.1:8000
    serveml deploy model.pkl requirements.txt --name iris
    serveml list
    serveml status <id>
    serveml predict <id> --data '[5.1, 3.5, 1.4, 0.2]'
    serveml predict <id> --csv rows.csv > predicted.csv
    serveml deploy model.pkl requirements.txt --version-of <id>   (a new version, same URL)
    serveml versions <id>
    serveml promote <id> <version>
    serveml stop <id>

An id may be shortened to any unique prefix, or given as the deployment's name.
"""

import argparse
import csv
import getpass
import json
import os
import shlex
import sys
import time
import uuid
from itertools import chain, islice
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

STAGES = {
    "local": ["inspect", "environment", "validate", "package", "provision", "verify"],
    "aws": ["inspect", "environment", "validate", "package", "build", "push", "provision", "verify"],
}
BATCH_ROWS = 1000

# No markup: names, messages and errors come from the server and from users' models, and
# a "[...]" in them must print as it is. Styles are applied with Text only.
out = Console(highlight=False, markup=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


class Failure(Exception):
    """Something went wrong that the person at the terminal can fix; the message says how."""


# ------------------------------------------------------------------ configuration


def config_path() -> Path:
    if os.environ.get("SERVEML_CONFIG"):
        return Path(os.environ["SERVEML_CONFIG"])
    return Path.home() / ".config" / "serveml" / "config.json"


def load_config() -> dict:
    path = config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise Failure("Not signed in: run `serveml login URL` first (URL is your ServeML, e.g. http://127.0.0.1:8000).")
    except (OSError, ValueError) as exc:
        raise Failure(f"Cannot read {path} ({exc}): run `serveml login URL` again to rewrite it.") from None
    if not isinstance(config, dict) or not config.get("url") or not config.get("token"):
        raise Failure(f"{path} holds no sign-in: run `serveml login URL` again.")
    return config


def save_config(config: dict) -> Path:
    """Write the token readable by this user only: the file is created 0600, never widened."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=2)
    return path


# ------------------------------------------------------------------ HTTP


class Api:
    def __init__(self, config: dict):
        self.url = config["url"].rstrip("/")
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Token {config['token']}"}, timeout=60, follow_redirects=False
        )

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Failure(unreachable(self.url, exc)) from None
        if response.status_code == 401:
            raise Failure("ServeML refused your token (it was deleted or belongs elsewhere): run `serveml login URL`.")
        return response

    def deployment(self, ref: str) -> dict:
        return self.json("GET", f"/api/deployments/{self.resolve(ref)}")

    def json(self, method: str, path: str, ok=(200,), **kwargs) -> dict | list:
        response = self.call(method, path, **kwargs)
        if response.status_code not in ok:
            raise Failure(error_text(response))
        return response.json()

    def resolve(self, ref: str) -> str:
        """A full id as it is; otherwise the one deployment whose id starts with `ref` or is named `ref`."""
        try:
            return str(uuid.UUID(ref))
        except ValueError:
            pass
        mine = self.json("GET", "/api/deployments")
        found = [d for d in mine if d["id"].startswith(ref.lower())] or [d for d in mine if d["name"] == ref]
        if not found:
            raise Failure(f"No deployment of yours has an id starting with or a name of {ref!r}: see `serveml list`.")
        if len(found) > 1:
            ids = ", ".join(d["id"][:8] for d in found[:5])
            raise Failure(f"{ref!r} matches {len(found)} deployments ({ids}…): give more of the id.")
        return found[0]["id"]


def unreachable(url: str, exc: Exception) -> str:
    return f"Cannot reach ServeML at {url} ({type(exc).__name__}: {exc}). Is it running (`make run`) and the URL right?"


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"ServeML answered {response.status_code}: {response.text[:300]}"
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return f"ServeML answered {response.status_code}: {json.dumps(body)[:300]}"


# ------------------------------------------------------------------ commands


def cmd_login(args) -> int:
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise Failure(f"{url!r} is not a URL: give the address of your ServeML, e.g. http://127.0.0.1:8000.")
    username = args.username or prompt("Username: ")
    password = read_password()
    try:
        response = httpx.post(f"{url}/api/token", json={"username": username, "password": password}, timeout=30)
    except httpx.TransportError as exc:
        raise Failure(unreachable(url, exc)) from None
    if response.status_code == 400:
        raise Failure("Wrong username or password. Try again, or sign up on the ServeML web page first.")
    if response.status_code != 200 or "token" not in response.text:
        raise Failure(error_text(response))
    path = save_config({"url": url, "token": response.json()["token"], "username": username})
    out.print(f"Signed in to {url} as {username}. Token saved in {path} (readable by you only).")
    return 0


def prompt(text: str) -> str:
    err.print(text, end="")
    line = sys.stdin.readline()
    if not sys.stdin.isatty():
        err.print()  # the piped answer was not echoed
    if not line:
        raise Failure("No username given.")
    return line.strip()


def read_password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\n")  # piped, for scripts: `printf 'alice\npw\n' | serveml login URL`


def cmd_deploy(args) -> int:
    model, requirements = Path(args.model), Path(args.requirements)
    for path, what in ((model, "model file"), (requirements, "requirements.txt")):
        if not path.is_file():
            raise Failure(f"The {what} {str(path)!r} does not exist (or is not a file).")
    api = Api(load_config())
    root = api.deployment(args.version_of) if args.version_of else None
    if root:
        path, data = f"/api/deployments/{root['id']}/versions", {"promote": "review" if args.review else "auto"}
    else:
        path = "/api/deploy"
        data = {key: value for key, value in (("name", args.name), ("target", args.target)) if value}
    with model.open("rb") as model_file, requirements.open("rb") as requirements_file:
        response = api.call(
            "POST",
            path,
            files={"model_file": (model.name, model_file), "requirements_file": (requirements.name, requirements_file)},
            data=data,
            timeout=600,
        )
    if response.status_code != 202:
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        message = error_text(response)
        details = [f"  {field}: {msg}" for field, msgs in body.get("fields", {}).items() for msg in msgs]
        raise Failure("The upload was refused: " + message + ("\n" + "\n".join(details) if len(details) > 1 else ""))
    created = response.json()
    if root:
        created["target"] = root["target"]
        out.print(f"Uploaded: version {created['version']} of {root['name']} ({created['id']}).")
    else:
        out.print(f"Uploaded: deployment {created['id']} ({created['name']}), {created['target']} target.")
    if args.no_wait:
        out.print(f"Follow it with `serveml status {created['id'][:8]}`.")
        return 0
    state = follow(api, created, timeout=args.timeout)
    if state["status"] != "ready":
        stage = f" in the {state['stage']} stage" if state.get("stage") else ""
        raise Failure(f"Deployment failed{stage}: {state.get('error') or state['status']}")
    if root:
        return version_ready(api, root, created)
    out.print(Text.assemble(("Ready.", "green"), f" Prediction URL: {state['endpoint_url']}"))
    out.print(curl_line(state), soft_wrap=True)
    return 0


def version_ready(api: Api, root: dict, created: dict, promote_seconds: float = 120) -> int:
    # A version promoted when ready becomes ready first and serves a moment later (the runtime
    # warms it before the URL moves): wait for that rather than call it "waiting for review".
    deadline = time.monotonic() + promote_seconds
    while True:
        versions = api.json("GET", f"/api/deployments/{root['id']}/versions")
        mine = next(v for v in versions if v["id"] == created["id"])
        if mine["serving"] or mine.get("promote") != "auto" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    root = api.json("GET", f"/api/deployments/{root['id']}")
    if mine["serving"]:
        out.print(Text.assemble(("Ready.", "green"), f" Version {mine['version']} serves {root['endpoint_url']}"))
        out.print(curl_line(root), soft_wrap=True)
    elif mine.get("promote") == "auto":
        out.print(
            Text.assemble(
                ("Ready.", "green"),
                f" Version {mine['version']} was to be promoted but does not serve yet: see why with "
                f"`serveml status {root['id'][:8]}`, or promote it with `serveml promote {root['id'][:8]} "
                f"{mine['version']}`.",
            )
        )
    else:
        out.print(
            Text.assemble(
                ("Ready.", "green"),
                f" Version {mine['version']} waits for review; the URL serves the one before until "
                f"`serveml promote {root['id'][:8]} {mine['version']}`.",
            )
        )
    return 0


def cmd_versions(args) -> int:
    api = Api(load_config())
    root = api.resolve(args.id)
    versions = api.json("GET", f"/api/deployments/{root}/versions")
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    table = Table("version", "id", "status", "promote", "serving", "created")
    for v in versions:
        status = v["status"] + (f" ({v['stage']})" if v["status"] == "deploying" and v["stage"] else "")
        cells = (
            str(v["version"]),
            v["id"][:8],
            status,
            v["promote"],
            "●" if v["serving"] else "",
            v["created_at"][:19],
        )
        table.add_row(*map(Text, cells))
    out.print(table)
    return 0


def cmd_promote(args) -> int:
    api = Api(load_config())
    root = api.resolve(args.id)
    version = api.json("POST", f"/api/deployments/{root}/versions/{args.version}/promote")
    url = api.json("GET", f"/api/deployments/{root}")["endpoint_url"]
    out.print(f"Version {version['version']} now serves {url}.")
    return 0


def follow(api: Api, created: dict, timeout: float) -> dict:
    """Poll the deployment, showing each stage as it runs and finishes, until ready or failed."""
    names = list(STAGES.get(created.get("target"), STAGES["local"]))
    done: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    state = created
    with Live(stage_table(names, done, state), console=out, refresh_per_second=8, transient=True) as live:
        while True:
            state = api.json("GET", f"/api/deployments/{created['id']}")
            for event in state.get("events", []):
                stage = event.get("stage")
                if event.get("duration_ms") is not None and stage and stage not in done:
                    done[stage] = event["duration_ms"]
                    if stage not in names:
                        names.insert(len(done) - 1, stage)
                    took = f" {stage:<12} {event['duration_ms'] / 1000:6.1f} s  {event['message']}"
                    live.console.print(Text.assemble("  ", ("✓", "green"), took), soft_wrap=True)
            live.update(stage_table(names, done, state))
            if state["status"] in ("ready", "failed", "stopped"):
                return state
            if time.monotonic() > deadline:
                raise Failure(
                    f"Still {state['status']} after {timeout:g} s; it goes on in the background: "
                    f"`serveml status {created['id'][:8]}`."
                )
            time.sleep(1)


def stage_table(names: list[str], done: dict, state: dict) -> Table:
    table = Table.grid(padding=(0, 2))
    current = state.get("stage") if state.get("status") == "deploying" else None
    for name in names:
        if name in done:
            table.add_row(Text("✓", "green"), Text(name), Text(f"{done[name] / 1000:.1f} s"))
        elif name == current:
            table.add_row(Spinner("dots"), Text(name, "bold"), Text("running"))
        else:
            table.add_row(Text("·"), Text(name, "dim"), Text(""))
    table.add_row(Text(""), Text(f"{len(done)}/{len(names)} stages · {state.get('status')}", "dim"), Text(""))
    return table


def curl_line(state: dict) -> str:
    body = json.dumps(state.get("example_request") or {"data": []})
    auth = " -H 'Authorization: Bearer <key>'" if state.get("is_private") else ""
    return f"curl -X POST {state['endpoint_url']} -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"


def cmd_list(args) -> int:
    deployments = Api(load_config()).json("GET", "/api/deployments")
    if args.json:
        print(json.dumps(deployments, indent=2))
        return 0
    if not deployments:
        out.print("No deployments yet: `serveml deploy model.pkl requirements.txt`.")
        return 0
    table = Table("id", "name", "target", "status", "URL")
    for d in deployments:
        status = d["status"] + (f" ({d['stage']})" if d["status"] == "deploying" and d["stage"] else "")
        table.add_row(*map(Text, (d["id"][:8], d["name"], d["target"], status, d["endpoint_url"] or "—")))
    out.print(table)
    return 0


def cmd_status(args) -> int:
    state = Api(load_config()).deployment(args.id)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    out.print(
        Text.assemble((state["name"], "bold"), f" {state['id']} · {state['target']} · ", (state["status"], "bold"))
    )
    if state["endpoint_url"]:
        out.print(f"URL: {state['endpoint_url']}" + (" (private)" if state.get("is_private") else ""))
    signature = state.get("signature") or {}
    if signature.get("model_type"):
        out.print(f"Model: {signature['model_type']}, methods {', '.join(signature.get('methods', []))}")
    if state["error"]:
        err.print(Text.assemble(("Error: ", "red"), state["error"]), soft_wrap=True)
    for event in state.get("events", []):
        took = f"{event['duration_ms'] / 1000:.1f} s" if event.get("duration_ms") is not None else ""
        out.print(f"  {event['created_at'][11:19]}  {event['stage'] or '-':<12} {took:>7}  {event['message']}")
    if state["status"] == "ready":
        out.print(curl_line(state), soft_wrap=True)
    return 0 if state["status"] != "failed" else 1


def cmd_stop(args) -> int:
    api = Api(load_config())
    ref = api.resolve(args.id)
    response = api.call("DELETE", f"/api/deployments/{ref}")
    if response.status_code not in (200, 202):
        raise Failure(error_text(response))
    state = response.json()
    if state["status"] == "stopping":
        out.print(f"Stopping {state['name']}: its cloud resources are being deleted (`serveml status {ref[:8]}`).")
    elif state["status"] == "stopped":
        out.print(f"Stopped {state['name']}: its URL no longer answers.")
    else:
        out.print(f"{state['name']} is {state['status']}: nothing to stop.")
    return 0


def cmd_predict(args) -> int:
    api = Api(load_config())
    state = api.deployment(args.id)
    if state["status"] != "ready" or not state["endpoint_url"]:
        raise Failure(f"{state['name']} is {state['status']}, not ready: it has no prediction URL to call.")
    headers = {}
    key = args.key or os.environ.get("SERVEML_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    elif state.get("is_private"):
        raise Failure("This deployment is private: pass --key KEY or set SERVEML_API_KEY (keys are made on its page).")
    predictor = Predictor(state["endpoint_url"], headers, args.method)
    if args.data is not None:
        try:
            value = json.loads(args.data)
        except ValueError as exc:
            raise Failure(f"--data is not JSON ({exc}): e.g. --data '[5.1, 3.5, 1.4, 0.2]'.") from None
        print(json.dumps(predictor.call(request_body(value, args.method))))
        return 0
    return predict_csv(predictor, Path(args.csv), state.get("signature") or {}, args.output, args.batch_rows)


class Predictor:
    def __init__(self, url: str, headers: dict, method: str | None):
        self.url, self.method = url, method
        self.client = httpx.Client(headers=headers, timeout=120)

    def call(self, body) -> dict:
        try:
            response = self.client.post(self.url, json=body)
        except httpx.TransportError as exc:
            raise Failure(unreachable(self.url, exc)) from None
        if response.status_code == 401:
            raise Failure("The endpoint refused the key: pass a current one with --key (or SERVEML_API_KEY).")
        if response.status_code != 200:
            raise Failure(f"The model refused the input: {error_text(response)}")
        return response.json()


def request_body(value, method: str | None) -> dict:
    """--data as the prediction contract wants it: a row, a list of rows, or a whole request."""
    if isinstance(value, dict) and ("data" in value or "instances" in value):
        body = dict(value)
    elif isinstance(value, list) and value and all(isinstance(row, (list, dict)) for row in value):
        body = {"instances": value}
    else:
        body = {"data": value}
    if method:
        body["method"] = method
    return body


def predict_csv(predictor: Predictor, path: Path, signature: dict, output: str | None, batch_rows: int) -> int:
    """Rows of a CSV in batches, written back as they come with a `prediction` column (or one per
    class for probabilities). The file is read twice, a line at a time, never whole: once to count
    its rows for the progress bar, once to send them."""
    if not path.is_file():
        raise Failure(f"The CSV file {str(path)!r} does not exist.")
    names = signature.get("feature_names_in") or None
    with path.open(newline="") as handle:
        total = sum(1 for row in csv.reader(handle) if row)
    if not total:
        raise Failure(f"{path} has no rows.")
    from rich.progress import Progress

    destination = open(output, "w", newline="") if output else sys.stdout  # noqa: SIM115
    try:
        with path.open(newline="") as handle, Progress(console=err, transient=True) as progress:
            rows = ((number, row) for number, row in enumerate(csv.reader(handle), start=1) if row)
            _, first = next(rows)
            header = None if all(is_number(cell) for cell in first) else first
            if header is None:
                rows = chain([(1, first)], rows)
            else:
                total -= 1
                if names and sorted(header) != sorted(names):
                    missing = [n for n in names if n not in header]
                    raise Failure(
                        f"{path}'s header does not match the model's features: missing {', '.join(missing) or 'none'}; "
                        f"expected the columns {', '.join(names)}."
                    )
            task = progress.add_task(f"Predicting {total} rows", total=total)
            writer = csv.writer(destination)
            wrote_header = False
            while batch := list(islice(rows, batch_rows)):
                lines = f"lines {batch[0][0]}–{batch[-1][0]} of {path}"
                if names and header is not None:
                    instances = [dict(zip(header, map(cell_value, row), strict=False)) for _, row in batch]
                else:
                    instances = [[cell_value(cell) for cell in row] for _, row in batch]
                body = {"instances": instances, **({"method": predictor.method} if predictor.method else {})}
                try:
                    predictions = predictor.call(body)["predictions"]
                except Failure as exc:
                    raise Failure(f"{lines}: {exc}") from None
                if not wrote_header:
                    first_answer = predictions[0]
                    label = predictor.method or "prediction"
                    labels = (
                        [f"{label}_{i}" for i in range(len(first_answer))]
                        if isinstance(first_answer, list)
                        else [label]
                    )
                    writer.writerow((header or [f"x{i}" for i in range(len(batch[0][1]))]) + labels)
                    wrote_header = True
                for (_, row), prediction in zip(batch, predictions, strict=True):
                    writer.writerow(row + (prediction if isinstance(prediction, list) else [prediction]))
                destination.flush()
                progress.advance(task, len(batch))
    finally:
        if output:
            destination.close()
    if output:
        err.print(f"Wrote {total} predicted rows to {output}.")
    return 0


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def cell_value(cell: str):
    try:
        return float(cell)
    except ValueError:
        return cell


# ------------------------------------------------------------------ entry point


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="serveml", description="Deploy scikit-learn models with ServeML.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help: str, *, with_id=False, with_json=False) -> argparse.ArgumentParser:
        """A subcommand that runs `run`: first the deployment it is about, then --json, when asked for."""
        sub = commands.add_parser(name, help=help)
        sub.set_defaults(run=run)
        if with_id:
            sub.add_argument("id", help="id, unique id prefix, or name")
        if with_json:
            sub.add_argument("--json", action="store_true")
        return sub

    login = command("login", cmd_login, "sign in to a ServeML and keep its token")
    login.add_argument("url", help="your ServeML, e.g. http://127.0.0.1:8000")
    login.add_argument("--username", help="asked when not given")

    deploy = command("deploy", cmd_deploy, "upload a model and follow its deployment until it is ready")
    deploy.add_argument("model", help="model.pkl, a joblib file or a .skops file")
    deploy.add_argument("requirements", help="requirements.txt")
    deploy.add_argument("--name")
    deploy.add_argument("--target", choices=["local", "aws"])
    deploy.add_argument("--version-of", metavar="ID", help="upload a new version of this deployment (same URL)")
    deploy.add_argument("--review", action="store_true", help="with --version-of: serve it only once promoted")
    deploy.add_argument("--no-wait", action="store_true", help="return once uploaded")
    deploy.add_argument("--timeout", type=float, default=1800, help="seconds to follow it (default 1800)")

    command("list", cmd_list, "your deployments", with_json=True)
    command("status", cmd_status, "a deployment's state and event log", with_id=True, with_json=True)

    predict = command("predict", cmd_predict, "call a deployment's prediction URL", with_id=True)
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="JSON: one row, a list of rows, or a whole request")
    source.add_argument("--csv", help="a CSV file: predicted in batches, written back with the predictions")
    predict.add_argument("--method", choices=["predict", "predict_proba", "decision_function"])
    predict.add_argument("--key", help="API key of a private deployment (or SERVEML_API_KEY)")
    predict.add_argument("--output", "-o", help="with --csv: write here instead of standard output")
    predict.add_argument(
        "--batch-rows", type=int, default=BATCH_ROWS, help=f"with --csv: rows per request ({BATCH_ROWS})"
    )

    command(
        "versions", cmd_versions, "a deployment's versions, and which one serves its URL", with_id=True, with_json=True
    )
    promote = command(
        "promote", cmd_promote, "serve a version at its deployment's URL (or roll back to one)", with_id=True
    )
    promote.add_argument("version", type=int)

    command("stop", cmd_stop, "stop a deployment", with_id=True)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except Failure as exc:
        err.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("Interrupted. A deployment you started goes on: `serveml list`.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
