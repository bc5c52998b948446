"""The Docker files, checked without Docker: hadolint, and every path, command and variable
they name checked against the repository, the `clipsearch` app and the Settings class."""

from __future__ import annotations

import fnmatch
import functools
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from retrieval.config import ENV_PREFIX, Settings, load_settings
from tests.deploy.cli_check import cli_error
from tests.deploy.dockerfiles import (
    COMPOSE_FILE,
    COMPOSE_GPU_FILE,
    DOCKER_DIR,
    DOCKERFILES,
    ENV_EXAMPLE,
    ROOT,
    Instruction,
    MissingVariable,
    arg_defaults,
    env_assignments,
    exec_form,
    instructions,
    interpolate,
    read_env_file,
    variables_used,
)

SETTING_VARIABLES = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint is missing: install the test extra (pip install -e '.[test]')"
    return found


def _run_hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_both_dockerfiles() -> None:
    result = _run_hadolint(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_warnings(tmp_path: Path) -> None:
    """The lint step can fail: an untagged base and a `cd` in RUN are warnings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && echo hi\n")
    result = _run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3003" in result.stdout


def test_cli_checker_catches_bad_command_lines() -> None:
    assert cli_error(["serve", "--host", "0.0.0.0"]) is None
    assert "no such command" in (cli_error(["indexx"]) or "")
    assert "No such option" in (cli_error(["schedule", "--evry", "1h"]) or "")
    assert "Missing argument" in (cli_error(["db", "migrate-to"]) or "")


# --------------------------------------------------------------------------------------
# Dockerfiles


def _one(found: list[Instruction], keyword: str) -> Instruction:
    matching = [i for i in found if i.keyword == keyword]
    assert matching, f"no {keyword}"
    return matching[-1]


def _runtime_stage(path: Path) -> list[Instruction]:
    found = instructions(path)
    last_from = max(n for n, i in enumerate(found) if i.keyword == "FROM")
    return found[last_from:]


def _image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in _runtime_stage(path):
        if ins.keyword == "ENV":
            env.update(env_assignments(ins.argument))
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_non_root_with_volumes(dockerfile: Path) -> None:
    found = instructions(dockerfile)
    stages = [i for i in found if i.keyword == "FROM"]
    assert len(stages) >= 2 and stages[-1].argument.endswith("AS runtime")
    runtime = _runtime_stage(dockerfile)
    assert any(i.keyword == "COPY" and i.argument.startswith("--from=build") for i in runtime)
    user = _one(runtime, "USER").argument
    assert user.split(":")[0] not in ("root", "0")
    uid = arg_defaults(dockerfile)["UID"]
    assert uid != "0"
    env = _image_env(dockerfile)
    volumes = exec_form(_one(runtime, "VOLUME").argument)
    assert env["CLIPSEARCH_DATA_DIR"] in volumes
    assert env["CLIPSEARCH_MODEL_CACHE_DIR"] in volumes


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_real_commands_and_settings(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _runtime_stage(dockerfile)
    assert exec_form(_one(runtime, "ENTRYPOINT").argument) == ["clipsearch"]
    cmd = exec_form(_one(runtime, "CMD").argument)
    assert cmd[0] == "serve" and cli_error(cmd) is None
    env = _image_env(dockerfile)
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - SETTING_VARIABLES
    assert not unknown, f"not Settings fields: {unknown}"
    _clear_settings_env(monkeypatch)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    load_settings()  # every value the image sets is valid


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_asks_health_on_the_served_port(dockerfile: Path) -> None:
    from api.routes.system import router

    runtime = _runtime_stage(dockerfile)
    check = _one(runtime, "HEALTHCHECK").argument
    assert " CMD " in f" {check} "
    command = exec_form(check.split(" CMD ", 1)[1] if " CMD " in check else check[4:])
    script = command[-1]
    url = re.search(
        r"'http://127\.0\.0\.1:%s(/[^']*)' % os\.environ\.get\('CLIPSEARCH_PORT'", script
    )
    assert command[0] == "python" and url and url.group(1) == "/health", script
    assert "/health" in {getattr(route, "path", None) for route in router.routes}
    assert _image_env(dockerfile)["CLIPSEARCH_PORT"] == "8000"


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], bare)
            ):
                return True
    return False


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_pass_dockerignore(dockerfile: Path) -> None:
    patterns = _dockerignore_patterns()
    assert ".venv" in patterns and ".git" in patterns and "docker/.env" in patterns
    sources = []
    for ins in instructions(dockerfile):
        if ins.keyword == "COPY" and not ins.argument.startswith("--from"):
            sources += ins.argument.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert not _ignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
    # Everything a wheel build reads is copied.
    assert {"pyproject.toml", "README.md", "retrieval", "indexer", "api", "migrations"} <= {
        s.rstrip("/").removeprefix("./") for s in sources
    }


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    return extras


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    # torch is an extra (the torch-free install runs exports without it); the images install it.
    for text in project["optional-dependencies"]["torch"]:
        requirement = Requirement(text)
        if requirement.name in ("torch", "torchvision"):
            (spec,) = requirement.specifier
            pins[requirement.name] = spec.version
    return pins


def test_torch_versions_match_pyproject_and_the_right_wheel_index() -> None:
    pins = _pins()
    cpu, gpu = (arg_defaults(path) for path in DOCKERFILES)
    for args in (cpu, gpu):
        assert args["TORCH_VERSION"] == pins["torch"]
        assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert cpu["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "/whl/cu" in gpu["TORCH_INDEX_URL"]
    assert gpu["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in gpu["CUDA_IMAGE"]


def test_gpu_image_installs_the_gpu_extra_and_replaces_faiss_cpu() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    requirements = [Requirement(text) for text in extras["gpu"]]
    (gpu_requirement,) = (r for r in requirements if r.name.startswith("faiss"))
    # ONNX Runtime's GPU build, in place of onnxruntime (never both): not in the CPU install.
    assert "onnxruntime-gpu" in {r.name for r in requirements}
    assert "onnxruntime-gpu" not in {Requirement(t).name for t in extras["onnx"]}
    version = arg_defaults(DOCKERFILES[1])["FAISS_GPU_VERSION"]
    assert gpu_requirement.specifier.contains(version)
    runs = " ".join(i.argument for i in instructions(DOCKERFILES[1]) if i.keyword == "RUN")
    assert '".[${EXTRAS}]"' in runs
    assert arg_defaults(DOCKERFILES[1])["EXTRAS"].split(",") == ["gpu", "postgres", "chinese", "hf"]
    assert "uninstall --yes faiss-cpu" in runs
    assert f"{gpu_requirement.name}==${{FAISS_GPU_VERSION}}" in runs
    assert "StandardGpuResources" in runs  # a build without GPU support fails the build


# --------------------------------------------------------------------------------------
# compose files


def _clear_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _resolve(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    return value


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(example_env: dict[str, str]) -> dict[str, Any]:
    return _resolve(_load(COMPOSE_FILE), example_env)


@pytest.fixture(scope="module")
def compose_gpu(example_env: dict[str, str]) -> dict[str, Any]:
    return _resolve(_load(COMPOSE_GPU_FILE), example_env)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_files_parse_and_name_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "api", "indexer"}
    assert set(_load(COMPOSE_GPU_FILE)["services"]) <= set(compose["services"])


def test_required_variables_are_required_and_in_env_example(
    example_env: dict[str, str],
) -> None:
    raw = COMPOSE_FILE.read_text() + COMPOSE_GPU_FILE.read_text()
    with pytest.raises(MissingVariable, match="PHOTOS_DIR|POSTGRES_PASSWORD"):
        _resolve(_load(COMPOSE_FILE), {})
    for name in variables_used(raw):
        if name.startswith(ENV_PREFIX):
            assert name in SETTING_VARIABLES, f"${{{name}}} is not a Settings field"
    unknown = {k for k in example_env if k.startswith(ENV_PREFIX)} - SETTING_VARIABLES
    assert not unknown, f".env.example sets non-settings {unknown}"
    assert {"PHOTOS_DIR", "POSTGRES_PASSWORD"} <= set(example_env)


def test_postgres_has_a_named_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


@pytest.mark.parametrize("name", ["api", "indexer"])
def test_clipsearch_services_wait_for_a_healthy_postgres(
    compose: dict[str, Any], name: str
) -> None:
    service = compose["services"][name]
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["init"] is True  # signals reach clipsearch; decoder processes are reaped


def test_build_paths_exist(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    for document in (compose, compose_gpu):
        for service in document["services"].values():
            build = service.get("build")
            if build is None:
                continue
            context = (DOCKER_DIR / build["context"]).resolve()
            assert context.is_dir()
            assert (context / build["dockerfile"]).is_file()
            assert context / build["dockerfile"] in DOCKERFILES


def test_volume_sources_exist_or_are_named(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for spec in service.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith("."):
                assert (DOCKER_DIR / source).exists(), f"volume source {source} does not exist"
            elif not source.startswith("/"):
                assert source in compose["volumes"], f"named volume {source} is not declared"


def test_commands_are_real_clipsearch_commands(
    compose: dict[str, Any], compose_gpu: dict[str, Any]
) -> None:
    services = compose["services"]
    assert services["api"]["command"][0] == "serve"
    assert services["indexer"]["command"][0] == "schedule"
    for document in (compose, compose_gpu):
        for name, service in document["services"].items():
            if name == "postgres":
                continue
            assert "entrypoint" not in service  # the image's: clipsearch
            if "command" in service:
                assert cli_error(service["command"]) is None, cli_error(service["command"])


def test_api_port_and_healthcheck(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    command = api["command"]
    port = command[command.index("--port") + 1]
    assert (
        api["ports"][0].rsplit(":", 1)[1] == port == _image_env(DOCKERFILES[0])["CLIPSEARCH_PORT"]
    )
    assert not api.get("healthcheck", {}).get("disable", False)


def test_image_roots_are_read_only_and_the_same_in_both_services(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    roots = {name: _environment(services[name])["CLIPSEARCH_ROOTS"] for name in ("api", "indexer")}
    assert roots["api"] == roots["indexer"]
    for name in ("api", "indexer"):
        mounts = {spec.split(":")[1]: spec.split(":") for spec in services[name]["volumes"]}
        for root in roots[name].split(":"):
            assert root in mounts, f"{name}: root {root} is not mounted"
            assert mounts[root][-1] == "ro", f"{name}: {root} must be mounted read-only"


def test_api_and_indexer_share_the_data_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    data_dirs = set()
    for name in ("api", "indexer"):
        data_dir = _environment(services[name])["CLIPSEARCH_DATA_DIR"]
        mounts = {spec.split(":")[1]: spec.split(":")[0] for spec in services[name]["volumes"]}
        data_dirs.add(mounts[data_dir])
    assert len(data_dirs) == 1 and data_dirs <= set(compose["volumes"])


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("name", ["api", "indexer"])
def test_service_environment_is_real_valid_settings(
    compose: dict[str, Any],
    compose_gpu: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    gpu: bool,
) -> None:
    document = _merge(compose, compose_gpu) if gpu else compose
    env = _environment(document["services"][name])
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - SETTING_VARIABLES
    assert not unknown, f"{name}: not Settings fields: {unknown}"
    _clear_settings_env(monkeypatch)
    image = DOCKERFILES[1] if gpu else DOCKERFILES[0]
    for key, value in {**_image_env(image), **env}.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert settings.device == ("cuda" if gpu else "auto")
    if name == "indexer":
        assert settings.index_every == 24 * 3600  # nightly by default
        assert settings.index_at == "03:00"


def test_gpu_override_reserves_a_gpu_for_each_service(compose_gpu: dict[str, Any]) -> None:
    for name in ("api", "indexer"):
        service = compose_gpu["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert service["image"] == "clipsearch:gpu"
    build = compose_gpu["services"]["api"]["build"]
    assert build["dockerfile"] == "docker/Dockerfile.gpu"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_images_install_every_model_family_and_their_build_checks_run(dockerfile: Path) -> None:
    runs = [i.argument for i in instructions(dockerfile) if i.keyword == "RUN"]
    installs = [run for run in runs if 'pip install ".[${EXTRAS}]"' in run]
    extras = set(arg_defaults(dockerfile)["EXTRAS"].split(","))
    assert installs and {"postgres", "chinese", "hf"} <= extras
    assert extras <= set(_extras())  # every extra a build may name is declared
    assert any("gcc" in run for run in runs)  # lmdb (cn_clip's pin) builds from source
    # The build stage's import checks, run here as the image runs them: a module that moved
    # would otherwise fail only the Docker build.
    checks = [
        script
        for run in runs
        for script in re.findall(r'python -c "([^"]+)"', run)
        if "import api.app" in script
    ]
    assert checks
    for script in checks:
        done = _build_check(script)
        assert done.returncode == 0, done.stderr[-2000:]


@functools.cache
def _build_check(script: str) -> subprocess.CompletedProcess[str]:
    # Both images run the same check (about 25 s of imports): run each distinct one once.
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=300
    )
