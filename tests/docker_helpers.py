"""Reading docker/*.Dockerfile, .dockerignore and docker-compose.yml the way Docker and Compose do
(there is no Docker engine here), and turning a service into the command line it would run in its
container, as a local process: its hosts and ports on loopback, its mounts in a temporary folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILES = {"reward-server": REPO / "docker/reward-server.Dockerfile", "trainer": REPO / "docker/trainer.Dockerfile"}

# ------------------------------------------------------------------ Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _exec_or_shell(rest: str) -> list[str]:
    """An instruction's command: JSON exec form as is, shell form as Docker runs it."""
    return json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]


@dataclass
class Dockerfile:
    path: Path
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    user: str | None = None
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] | None = None  # compose's form: ["CMD", ...] or ["CMD-SHELL", "..."]
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        d = cls(path)
        for op, rest in dockerfile_instructions(path):
            if op == "COPY":
                *sources, dest = rest.split()
                d.copies.append((sources, dest))
            elif op == "ENV":
                d.env.update(item.split("=", 1) for item in shlex.split(rest))
            elif op == "RUN":
                d.runs.append(rest)
            elif op == "USER":
                d.user = rest
            elif op == "WORKDIR":
                d.workdir = rest
            elif op == "ENTRYPOINT":
                d.entrypoint = json.loads(rest)
            elif op == "CMD":
                d.cmd = json.loads(rest)
            elif op == "VOLUME":
                d.volumes += json.loads(rest)
            elif op == "HEALTHCHECK":
                options, _, command = rest.partition(" CMD ")
                d.healthcheck_options = dict(o.lstrip("-").split("=", 1) for o in options.split())
                command = command.strip()
                d.healthcheck = ["CMD", *json.loads(command)] if command.startswith("[") else ["CMD-SHELL", command]
        return d

    @property
    def copy_sources(self) -> list[str]:
        return [s for sources, _ in self.copies for s in sources]

    def installs(self) -> list[list[str]]:
        """The argument lists of every `uv pip install` / `pip install` in its RUN lines."""
        found = []
        for run in self.runs:
            for part in re.split(r"&&|;", run):
                words = shlex.split(part)
                for i in range(len(words) - 1):
                    if words[i : i + 2] == ["pip", "install"]:
                        found.append(words[:i] + ["pip", "install"] + words[i + 2 :])
                        break
        return found

    def installed_units(self) -> list[str]:
        """The repository folders its `uv pip install ./a ./b[extra] ...` installs."""
        units = [w[2:].split("[")[0] for args in self.installs() for w in args if w.startswith("./")]
        assert units, f"no `pip install ./...` in {self.path}"
        return units


# ------------------------------------------------------------------ .dockerignore and the build context


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """moby's patternmatcher: ** any number of folders, * and ? within one path element."""
    pattern = os.path.normpath(pattern.strip().lstrip("/"))
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether the path, or a folder above it, is excluded (no `!` exceptions in ours)."""
    regexes = [_dockerignore_regex(p) for p in patterns]
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(r.match(p) for r in regexes for p in prefixes)


def build_context_files(sources: list[str]) -> list[str]:
    """The files under ``sources`` that the build context holds: what is on disk, less .dockerignore."""
    patterns = dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns), "exceptions are not handled here"
    files = []
    for src in sources:
        root = REPO / src
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files += [rel for p in paths if not dockerignored(rel := p.relative_to(REPO).as_posix(), patterns)]
    return files


def git_files(sources: list[str]) -> list[str]:
    """What git has (or would add) under ``sources``: tracked files and untracked ones it does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *sources],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file()})


# ------------------------------------------------------------------ the image as a bare environment


@dataclass
class ImageEnv:
    """An environment holding exactly the wheels the image's install step builds from its build
    context; third-party dependencies come from this interpreter's site-packages as a plain path
    entry (so the checkout's editable hooks there do not run)."""

    name: str
    python: Path
    site: Path
    wheels: list[Path]

    def console_scripts(self) -> dict[str, str]:
        """console script -> "module:function", from the wheels' entry_points.txt."""
        scripts = {}
        for ep_file in self.site.glob("advgrpo_*.dist-info/entry_points.txt"):
            group = None
            for line in ep_file.read_text().splitlines():
                line = line.strip()
                if line.startswith("["):
                    group = line.strip("[]")
                elif "=" in line and group == "console_scripts":
                    name, value = (s.strip() for s in line.split("=", 1))
                    scripts[name] = value
        return scripts

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def build_unit_wheels(files: list[str], units: list[str], root: Path) -> dict[str, Path]:
    """Wheels of ``units`` (folders), built from a copy of just ``files`` (paths in the repository)
    under ``root``, so that nothing else in the checkout (generated modules, builds) gets in."""
    src = root / "src"
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    out = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
         *(str(src / u) for u in units)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    found = {}
    for unit in units:
        (found[unit],) = out.glob(f"advgrpo_{unit}-*.whl")
    return found


def build_image_env(name: str, root: Path) -> ImageEnv:
    dockerfile = Dockerfile.parse(DOCKERFILES[name])
    units = dockerfile.installed_units()
    wheels = sorted(build_unit_wheels(build_context_files(dockerfile.copy_sources), units, root).values())
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    (site,) = env_dir.glob("lib/python*/site-packages")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return ImageEnv(name, env_dir / "bin" / "python", site, wheels)


# ------------------------------------------------------------------ compose: variables and interpolation

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR, $$."""

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        b = _BRACED.fullmatch(m["braced"])
        assert b and "$" not in (b["arg"] or ""), f"unsupported: {m.group(0)}"
        value, op, arg = env.get(b["name"]), b["op"], b["arg"]
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"{b['name']}: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def compose_variables(raw: dict | None = None) -> dict[str, set[str | None]]:
    """Every variable the file reads -> the defaults it is given (None: none)."""
    raw = raw if raw is not None else load_compose_raw()
    found: dict[str, set[str | None]] = {}
    for s in _strings(raw):
        for m in _VAR.finditer(s):
            if m["named"]:
                found.setdefault(m["named"], set()).add(None)
            elif m["braced"] is not None:
                b = _BRACED.fullmatch(m["braced"])
                found.setdefault(b["name"], set()).add(b["arg"] if b["op"] in (":-", "-") else None)
    return found


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f".env.example: bad line {line!r}"
            values[name] = value
    return values


def load_compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # anchors and merge keys resolved


def _interpolate_all(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: _interpolate_all(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_all(v, env) for v in node]
    return node


def load_compose(env: dict[str, str] | None = None) -> dict:
    """The file with its variables resolved from ``env`` (not this process's environment)."""
    return _interpolate_all(load_compose_raw(), env or {})


def docker_compose_config(env: dict[str, str], tmp: Path, compose_file: Path = COMPOSE_FILE) -> dict:
    """`docker-compose config` of the file with exactly these variables (an empty --env-file, so a
    developer's .env does not count); raises CalledProcessError when the file does not validate."""
    env_file = tmp / "empty.env"
    env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if k not in compose_variables() and not k.startswith("COMPOSE_")}
    out = subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", str(compose_file), "config"],
        capture_output=True, text=True, timeout=120, env={**clean, **env}, cwd=REPO, check=True,
    )  # fmt: skip
    return yaml.safe_load(out.stdout)


# ------------------------------------------------------------------ a service as a local process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """One compose service: what its container would run (image ENTRYPOINT/CMD as compose overrides
    them, image ENV plus compose's environment) and its mounts."""

    name: str
    spec: dict
    image: Dockerfile

    @classmethod
    def from_compose(cls, compose: dict, name: str) -> Service:
        spec = compose["services"][name]
        return cls(name, spec, Dockerfile.parse(REPO / spec["build"]["context"] / spec["build"]["dockerfile"]))

    @property
    def argv(self) -> list[str]:
        entry = self.spec.get("entrypoint", self.image.entrypoint)
        default_cmd = [] if "entrypoint" in self.spec else self.image.cmd  # compose's entrypoint resets CMD
        return [*entry, *self.spec.get("command", default_cmd)]

    @property
    def environment(self) -> dict[str, str]:
        env = self.spec.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        return {**self.image.env, **{k: "" if v is None else str(v) for k, v in env.items()}}

    @property
    def healthcheck(self) -> list[str]:
        return self.spec.get("healthcheck", {}).get("test") or self.image.healthcheck

    def mounts(self) -> list[tuple[str, str]]:
        """(source, container path): named volumes by name, bind mounts as written."""
        out = []
        for v in self.spec.get("volumes", []):
            source, target, *_ = v.split(":")
            out.append((source, target))
        return out


@dataclass
class Localizer:
    """Maps container paths and addresses to this machine: mounts and /tmp into ``root``, the
    image's WORKDIR copies to the checkout, compose hostnames and container ports to 127.0.0.1 and
    free ports; console scripts to ``python`` (the image environment's)."""

    root: Path
    ports: dict[str, dict[int, int]]  # service -> container port -> local port
    python: Path = Path(sys.executable)
    scripts: dict[str, str] = field(default_factory=dict)  # console script -> "module:function"

    def paths(self, service: Service) -> dict[str, Path]:
        mapping: dict[str, Path] = {}
        for source, target in service.mounts():
            named = not source.startswith((".", "/", "~"))
            mapping[target] = self.root / ("volumes" if named else "binds") / Path(source).name
        mapping["/tmp"] = self.root / f"{service.name}-tmp"
        for _, dest in service.image.copies:
            absolute = os.path.normpath(os.path.join(service.image.workdir, dest))
            mapping[absolute] = REPO / os.path.relpath(absolute, service.image.workdir)
        return mapping

    def text(self, value: str, service: Service) -> str:
        paths = self.paths(service)
        prefixes = "|".join(re.escape(c) for c in sorted(paths, key=len, reverse=True))
        # one pass: a local path put in is never mapped again
        value = re.sub(rf"(?<![\w.-])({prefixes})(?=/|\Z|\s)", lambda m: str(paths[m.group(1)]), value)
        own = self.ports.get(service.name, {})

        def address(m: re.Match) -> str:
            host, port = m["host"], int(m["port"])
            if host in ("127.0.0.1", "localhost", "0.0.0.0") and port in own:
                return f"127.0.0.1:{own[port]}"
            if host in self.ports and port in self.ports[host]:
                return f"127.0.0.1:{self.ports[host][port]}"
            return m.group(0)

        return re.sub(r"(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)", address, value)

    def argv(self, argv: list[str], service: Service) -> list[str]:
        own = self.ports.get(service.name, {})
        out = []
        for i, arg in enumerate(argv):
            if arg == "0.0.0.0":
                arg = "127.0.0.1"  # loopback only
            elif i and argv[i - 1] in ("--port", "--http-port") and int(arg) in own:
                arg = str(own[int(arg)])
            out.append(self.text(arg, service))
        return self.executable(out[0]) + out[1:]

    def executable(self, name: str) -> list[str]:
        if name in ("python", "python3"):
            return [str(self.python)]
        if name in self.scripts:
            module, func = self.scripts[name].split(":")
            return [str(self.python), "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]
        (third_party,) = [e for e in metadata.entry_points(group="console_scripts", name=name)][:1] or [None]
        if third_party is not None:
            return [str(self.python), "-c", f"import sys; from {third_party.module} import {third_party.attr}; "
                    f"sys.argv[0] = {name!r}; sys.exit({third_party.attr}())"]  # fmt: skip
        found = shutil.which(name)
        assert found, f"{name}: not a console script of ours or of the environment, nor on PATH"
        return [found]

    def environment(self, service: Service) -> dict[str, str]:
        return {k: self.text(v, service) for k, v in service.environment.items()}

    def healthcheck(self, service: Service) -> list[str]:
        test = service.healthcheck
        if test[0] == "CMD-SHELL":
            return ["/bin/sh", "-c", self.text(test[1], service)]
        assert test[0] == "CMD", test
        return self.argv(test[1:], service)


def project_scripts() -> dict[str, str]:
    """Console scripts our units declare (pyproject [project.scripts])."""
    scripts = {}
    for pyproject in REPO.glob("*/pyproject.toml"):
        scripts.update(tomllib.loads(pyproject.read_text()).get("project", {}).get("scripts", {}))
    return scripts
