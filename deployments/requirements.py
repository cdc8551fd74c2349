"""A strict reader for a model's requirements.txt.

requirements.txt is data, not instructions: pip reads options (-e, -r,
--index-url, …), URLs, paths and environment markers from it, each of which
can pull code from somewhere the operator did not choose. We accept only

    name
    name==version
    name[extra,...]==version

plus blank lines and comments, and refuse anything else with a message that
says what to write instead.
"""

import re
from dataclasses import dataclass

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
LINE_RE = re.compile(
    rf"^(?P<name>{NAME})"
    rf"(?:\[(?P<extras>{NAME}(?:\s*,\s*{NAME})*)\])?"
    r"(?:\s*==\s*(?P<version>[A-Za-z0-9][A-Za-z0-9.!+_*-]*))?$"
)
HELP = "Each line must be a package name, optionally pinned: scikit-learn==1.5.2."


class RequirementsError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    name: str  # canonical (PEP 503) name
    extras: tuple[str, ...] = ()
    version: str | None = None

    def __str__(self):
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        pin = f"=={self.version}" if self.version else ""
        return f"{self.name}{extras}{pin}"


@dataclass(frozen=True)
class Requirements:
    items: tuple[Requirement, ...]

    def normalised(self) -> str:
        """One canonical text per set of requirements: sorted, canonical names."""
        return "".join(f"{item}\n" for item in self.items)

    def get(self, name: str) -> Requirement | None:
        name = canonicalize_name(name)
        return next((item for item in self.items if item.name == name), None)


def _refusal(line: str) -> str:
    """Explain why a line that is not name[==version] was refused."""
    stripped = line.strip()
    if stripped.startswith("-"):
        option = stripped.split()[0].split("=")[0]
        if option in {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host"}:
            return (
                f"`{option}` is not allowed: packages come from the index the ServeML operator "
                "configured, so requirements.txt cannot name another one."
            )
        if option in {"-r", "--requirement", "-c", "--constraint"}:
            return f"`{option}` is not allowed: list every package in this one file instead of including another."
        if option in {"-e", "--editable"}:
            return (
                f"`{option}` is not allowed: editable installs build code from a path or URL. "
                "Pin a released version instead."
            )
        return f"`{option}` is a pip option, and options are not allowed in requirements.txt."
    if re.match(rf"^{NAME}(\[[^\]]*\])?\s*@", stripped):
        return "direct references (name @ url) are not allowed: pin a released version instead (name==version)."
    if "://" in stripped or "@" in stripped or stripped.startswith(("git+", "hg+", "svn+", "bzr+", "file:")):
        return "URLs are not allowed: pin a released version from the package index instead (name==version)."
    if ";" in stripped:
        return "environment markers (`; python_version …`) are not allowed: list only what this model needs."
    if stripped.startswith((".", "/", "~")) or "/" in stripped or "\\" in stripped:
        return "paths are not allowed: pin a released version from the package index instead (name==version)."
    for operator in (">=", "<=", "~=", "!=", "===", ">", "<"):
        if operator in stripped:
            name = stripped.split(operator)[0].strip()
            return (
                f"only exact pins are allowed (`{operator}` found): write {name}==<version> "
                "so the deployment installs exactly what the model was trained with."
            )
    return f"this is not a package name or a name==version pin. {HELP}"


def parse_requirements(text: str, *, allowed_packages: list[str] | None = None) -> Requirements:
    """Parse requirements.txt text or raise RequirementsError saying which line is wrong and why.
    `allowed_packages` None allows any name."""
    seen: dict[str, Requirement] = {}
    allowed = None if allowed_packages is None else {canonicalize_name(name) for name in allowed_packages}
    for number, raw in enumerate(text.splitlines(), start=1):
        if "\x00" in raw:
            raise RequirementsError(f"line {number}: contains a NUL byte; requirements.txt must be plain text.")
        # A comment starts at "#" at the beginning of the line or after whitespace, as in pip.
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        match = LINE_RE.match(line)
        if not match:
            raise RequirementsError(f"line {number} (`{raw.strip()[:80]}`): {_refusal(line)}")
        version = match["version"]
        if version is not None:
            try:
                Version(version)
            except InvalidVersion:
                raise RequirementsError(
                    f"line {number} (`{raw.strip()[:80]}`): `{version}` is not a valid version number."
                ) from None
        name = canonicalize_name(match["name"])
        if name in seen:
            raise RequirementsError(f"line {number}: {name} is listed twice; keep one line per package.")
        if allowed is not None and name not in allowed:
            raise RequirementsError(
                f"line {number}: {name} is not on this ServeML's list of reviewed packages, and every package "
                "runs code when the model loads. Remove it if the model does not need it, or ask an operator "
                "to review it and add it (Django admin: Allowed packages, or SERVEML_ALLOWED_PACKAGES)."
            )
        extras = tuple(sorted(canonicalize_name(e) for e in (match["extras"] or "").split(",") if e.strip()))
        seen[name] = Requirement(name=name, extras=extras, version=version)
    if not seen:
        raise RequirementsError(
            "requirements.txt lists no packages. List what the model needs, at least scikit-learn==<version>."
        )
    return Requirements(items=tuple(sorted(seen.values(), key=lambda item: item.name)))
