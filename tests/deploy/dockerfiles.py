"""Just enough Dockerfile and compose-file reading for the deployment tests (no Docker needed)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
DOCKERFILES = [DOCKER_DIR / "Dockerfile", DOCKER_DIR / "Dockerfile.gpu"]
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
COMPOSE_GPU_FILE = DOCKER_DIR / "compose.gpu.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    argument: str


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        keyword, _, argument = text.partition(" ")
        found.append(Instruction(start, keyword.upper(), argument.strip()))
        pending = []
    return found


def env_assignments(argument: str) -> dict[str, str]:
    """`ENV A=1 B="two words"` as a dict (the key=value form only)."""
    values: dict[str, str] = {}
    for word in shlex.split(argument):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"ENV without '=' is not supported here: {argument!r}")
        values[key] = value
    return values


def arg_defaults(path: Path) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions(path):
        if ins.keyword == "ARG" and "=" in ins.argument:
            key, _, value = ins.argument.partition("=")
            defaults[key] = value
    return defaults


def exec_form(argument: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    value = json.loads(argument)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not an exec-form array: {argument}")
    return value


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (compose .env and systemd EnvironmentFile); comments skipped."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path.name}: not KEY=VALUE: {raw!r}")
        values[key.strip()] = value.strip()
    return values


class MissingVariable(LookupError):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `$$`.

    Stricter than compose: an unset `${VAR}` without a default is an error here, not an
    empty string with a warning. Defaults may nest (`${A:-${B}}`).
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if not text.startswith("${", i):
            out.append(text[i])
            i += 1
            continue
        depth, j = 1, i + 2
        while j < len(text) and depth:
            if text.startswith("${", j):
                depth += 1
                j += 2
                continue
            if text[j] == "}":
                depth -= 1
            j += 1
        if depth:
            raise ValueError(f"unclosed ${{ in {text!r}")
        body = text[i + 2 : j - 1]
        name_match = _NAME.match(body)
        if not name_match:
            raise ValueError(f"bad variable in {text!r}")
        name, rest = name_match.group(0), body[name_match.end() :]
        value = env.get(name)
        if rest == "":
            if value is None:
                raise MissingVariable(f"${{{name}}} is used but not set")
            out.append(value)
        elif rest[:2] in (":-", ":?") or rest[:1] in ("-", "?"):
            colon = rest.startswith(":")
            operator = rest[1] if colon else rest[0]
            word = rest[2:] if colon else rest[1:]
            unset = value is None or (colon and value == "")
            if operator == "-":
                out.append(interpolate(word, env) if unset else str(value))
            elif unset:
                raise MissingVariable(f"${{{name}}} is required: {word}")
            else:
                out.append(str(value))
        else:
            raise ValueError(f"unsupported interpolation ${{{body}}}")
        i = j
    return "".join(out)


def variables_used(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
