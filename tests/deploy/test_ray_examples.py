"""The Ray deployment examples (docker/compose.ray.yaml, examples/ray/): parsed and checked
against the repository, the `clipsearch` app and the Settings class, without Docker,
Kubernetes or a cloud account."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from retrieval.config import ENV_PREFIX, Settings, load_settings
from tests.deploy.cli_check import cli_error
from tests.deploy.dockerfiles import (
    DOCKER_DIR,
    DOCKERFILES,
    ENV_EXAMPLE,
    ROOT,
    MissingVariable,
    arg_defaults,
    instructions,
    interpolate,
    read_env_file,
    variables_used,
)

COMPOSE_RAY = DOCKER_DIR / "compose.ray.yaml"
EXAMPLES = ROOT / "examples" / "ray"
KUBERAY = EXAMPLES / "kuberay"
CLUSTER_FILE = EXAMPLES / "cluster-aws.yaml"
CLUSTER_ENV = EXAMPLES / "clipsearch-ray.env"
SETTING_VARIABLES = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
RAY_SERVICES = ("ray-head", "ray-worker")
IMAGE_SERVICES = (*RAY_SERVICES, "api")


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _ray_requirement() -> Requirement:
    """The `ray` extra's Ray requirement (with Ray Data)."""
    (found,) = [
        Requirement(text)
        for text in _project()["optional-dependencies"]["ray"]
        if Requirement(text).name == "ray"
    ]
    return found


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    unknown = {key for key in env if key.startswith(ENV_PREFIX)} - SETTING_VARIABLES
    assert not unknown, f"not Settings fields: {unknown}"
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            monkeypatch.setenv(key, value)
    return load_settings()


def _engine_args(words: list[str]) -> str | None:
    """The value of `--engine` in an argument list (either spelling), or None."""
    for n, word in enumerate(words):
        if word == "--engine" and n + 1 < len(words):
            return words[n + 1]
        if word.startswith("--engine="):
            return word.split("=", 1)[1]
    return None


def test_docker_images_take_the_ray_extra_by_build_arg() -> None:
    assert "ray" in _project()["optional-dependencies"]
    assert "data" in _ray_requirement().extras  # Ray Data runs the decode and encode stages
    for dockerfile in DOCKERFILES:
        runs = [i.argument for i in instructions(dockerfile) if i.keyword == "RUN"]
        assert any('pip install ".[${EXTRAS}]"' in run for run in runs), dockerfile.name
        assert "ray" not in arg_defaults(dockerfile)["EXTRAS"].split(",")  # opt-in


# --------------------------------------------------------------------------------------
# docker/compose.ray.yaml


def _resolve(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_RAY.read_text())
    return dict(_resolve(loaded, read_env_file(ENV_EXAMPLE)))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in (service.get("environment") or {}).items()}


def _mounts(service: dict[str, Any]) -> dict[str, list[str]]:
    """Target path -> [source, target, options...] of a service's volumes."""
    return {spec.split(":")[1]: spec.split(":") for spec in service["volumes"]}


def test_compose_ray_services_and_required_variables(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", *IMAGE_SERVICES}
    with pytest.raises(MissingVariable, match="PHOTOS_DIR|POSTGRES_PASSWORD"):
        _resolve(yaml.safe_load(COMPOSE_RAY.read_text()), {})
    for name in variables_used(COMPOSE_RAY.read_text()):
        if name.startswith(ENV_PREFIX):
            assert name in SETTING_VARIABLES, f"${{{name}}} is not a Settings field"


def test_compose_ray_builds_one_image_with_the_ray_extra(compose: dict[str, Any]) -> None:
    services = compose["services"]
    builds = {name: s["build"] for name, s in services.items() if "build" in s}
    assert list(builds) == ["ray-head"]
    build = builds["ray-head"]
    assert (DOCKER_DIR / build["context"]).resolve() / build["dockerfile"] in DOCKERFILES
    extras = build["args"]["EXTRAS"].split(",")
    assert "ray" in extras and set(extras) <= set(_project()["optional-dependencies"])
    # One image, so one Ray version, in the head, the workers and the API.
    assert {services[name]["image"] for name in IMAGE_SERVICES} == {"clipsearch:ray"}


def test_compose_ray_mounts_the_same_paths_everywhere(compose: dict[str, Any]) -> None:
    services = compose["services"]
    seen: dict[str, set[tuple[str, ...]]] = {}
    for name in IMAGE_SERVICES:
        env = _environment(services[name])
        mounts = _mounts(services[name])
        for key in ("CLIPSEARCH_DATA_DIR", "CLIPSEARCH_MODEL_CACHE_DIR"):
            assert env[key] in mounts, f"{name}: {key}={env[key]} is not a mount"
            seen.setdefault(key, set()).add(tuple(mounts[env[key]]))
        for root in env["CLIPSEARCH_ROOTS"].split(":"):
            assert root in mounts and mounts[root][-1] == "ro", f"{name}: root {root}"
            seen.setdefault(root, set()).add(tuple(mounts[root]))
    for path, specs in seen.items():
        assert len(specs) == 1, f"{path} is mounted differently: {specs}"
    for name in RAY_SERVICES:  # Ray's object store
        assert services[name]["shm_size"] in ("1gb", "2gb", "4gb", "8gb")


def test_compose_ray_head_runs_ray_and_the_nightly_index_with_the_ray_engine(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    head = compose["services"]["ray-head"]
    assert head["entrypoint"] == ["/bin/sh", "-c"] and head["init"] is True
    (script,) = head["command"]
    ray_part, clipsearch_part = script.split(" && exec ")
    ray_words = shlex.split(ray_part)
    assert ray_words[:3] == ["ray", "start", "--head"]
    assert "--block" not in ray_words  # it must return, so that the scheduler starts
    words = shlex.split(clipsearch_part)
    assert words[0] == "clipsearch" and words[1] == "schedule"
    assert cli_error(words[1:]) is None, cli_error(words[1:])
    env = _environment(head)
    settings = _settings_from(env, monkeypatch)
    assert settings.engine == "ray"  # what `schedule`'s index runs use
    assert env["CLIPSEARCH_RAY_ADDRESS"]
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert head["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_ray_workers_join_the_head(compose: dict[str, Any]) -> None:
    head, worker = (compose["services"][name] for name in RAY_SERVICES)
    port = re.search(r"--port=(\d+)", head["command"][0])
    assert port
    assert worker["entrypoint"] == ["ray"]
    assert worker["command"][:1] == ["start"] and "--block" in worker["command"]
    assert f"--address=ray-head:{port.group(1)}" in worker["command"]
    assert worker["deploy"]["replicas"] >= 1
    assert worker["init"] is True  # reaps Ray's worker processes
    # Ray's token authentication, with one token, on every node of the cluster.
    auth = {
        (s["environment"]["RAY_AUTH_MODE"], s["environment"]["RAY_AUTH_TOKEN"])
        for s in (head, worker)
    }
    assert len(auth) == 1 and next(iter(auth))[0] == "token"
    with pytest.raises(MissingVariable, match="RAY_AUTH_TOKEN"):
        env = {k: v for k, v in read_env_file(ENV_EXAMPLE).items() if k != "RAY_AUTH_TOKEN"}
        _resolve(yaml.safe_load(COMPOSE_RAY.read_text()), env)


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_compose_ray_environment_is_real_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    service = compose["services"][name]
    settings = _settings_from(_environment(service), monkeypatch)
    assert [str(root) for root in settings.roots] == ["/photos"]
    if name == "api":
        assert service["command"][0] == "serve" and cli_error(service["command"]) is None


# --------------------------------------------------------------------------------------
# examples/ray/kuberay


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    (job,) = _documents(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    return job


def _pods(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod specs by group: `head`, then each worker group's name."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        # A secret's value is not here: a stand-in of the same form for validation.
        if "valueFrom" in item:
            assert item["name"] == "CLIPSEARCH_DATABASE_URL", item
            env[item["name"]] = "postgresql://clipsearch:secret@postgres.example.org/clipsearch"
        else:
            env[item["name"]] = str(item["value"])
    return env


def _pod_mounts(pod: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Mount path -> (what is mounted: a claim, or a volume's kind; read-only)."""
    volumes = {}
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            volumes[volume["name"]] = "pvc:" + volume["persistentVolumeClaim"]["claimName"]
        else:
            volumes[volume["name"]] = next(k for k in volume if k != "name")
    (container,) = pod["containers"][:1]
    return {
        mount["mountPath"]: (volumes[mount["name"]], bool(mount.get("readOnly")))
        for mount in container["volumeMounts"]
    }


def test_rayjob_entrypoint_indexes_with_the_ray_engine(rayjob: dict[str, Any]) -> None:
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:2] == ["clipsearch", "index"]
    assert cli_error(words[1:]) is None, cli_error(words[1:])
    assert _engine_args(words) == "ray"
    head = _pods(rayjob)["head"]["containers"][0]
    env = _container_env(head)
    assert env["CLIPSEARCH_RAY_ADDRESS"]  # the driver joins its own cluster
    roots = [Path(word) for word in words[2:] if word.startswith("/")]  # absolute: the same
    assert roots
    for group, pod in _pods(rayjob).items():
        mounts = _pod_mounts(pod)
        for root in roots:
            assert any(root.is_relative_to(path) for path in mounts), f"{group}: {root}"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_rayjob_pods_mount_the_same_shared_claims_at_the_same_paths(
    rayjob: dict[str, Any],
) -> None:
    claims = {
        doc["metadata"]["name"]: doc["spec"]
        for doc in _documents(KUBERAY / "storage.yaml")
        if doc["kind"] == "PersistentVolumeClaim"
    }
    pods = _pods(rayjob)
    assert len(pods) >= 2
    shared: dict[str, set[tuple[str, bool]]] = {}
    for group, pod in pods.items():
        for path, (source, read_only) in _pod_mounts(pod).items():
            if source.startswith("pvc:"):
                assert claims[source[4:]]["accessModes"] == ["ReadWriteMany"], source
                shared.setdefault(path, set()).add((source, read_only))
        assert _pod_mounts(pod)["/dev/shm"] == ("emptyDir", False), group
        assert pod["securityContext"]["fsGroup"] == 10001  # the image's user
    for path, sources in shared.items():
        assert len(sources) == 1, f"{path} differs between pods: {sources}"
    assert {"/photos", "/var/lib/clipsearch"} <= set(shared)
    assert shared["/photos"] == {("pvc:clipsearch-photos", True)}
    for group, pod in pods.items():
        env = _container_env(pod["containers"][0])
        for key in ("CLIPSEARCH_DATA_DIR", "CLIPSEARCH_MODEL_CACHE_DIR"):
            assert any(Path(env[key]).is_relative_to(path) for path in shared), (group, key)


def test_rayjob_workers_request_one_gpu_each_and_run_the_heads_image(
    rayjob: dict[str, Any],
) -> None:
    pods = _pods(rayjob)
    images = {pod["containers"][0]["image"] for pod in pods.values()}
    assert len(images) == 1  # one Ray version in the cluster
    head = pods.pop("head")["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    for group, pod in pods.items():
        resources = pod["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1, group
        assert resources["requests"]["nvidia.com/gpu"] == 1, group
        assert _container_env(pod["containers"][0])["CLIPSEARCH_DEVICE"] == "cuda"
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert _ray_requirement().specifier.contains(Version(version))


def test_rayjob_environment_is_real_valid_settings(
    rayjob: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for group, pod in _pods(rayjob).items():
        env = _container_env(pod["containers"][0])
        settings = _settings_from(env, monkeypatch)
        if group == "head":
            assert settings.engine == "ray"
            assert settings.resolved_database_url.startswith("postgresql+psycopg://")


# --- nightly.yaml: the CronJob that creates a RayJob ---------------------------------------


@pytest.fixture(scope="module")
def nightly() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in _documents(KUBERAY / "nightly.yaml")}


def test_nightly_cronjob_runs_at_three_with_rights_to_create_rayjobs(
    nightly: dict[str, dict[str, Any]],
) -> None:
    cron = nightly["CronJob"]["spec"]
    assert cron["schedule"] == "0 3 * * *" and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    account = nightly["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    binding = nightly["RoleBinding"]
    assert binding["subjects"][0]["name"] == account
    assert binding["roleRef"]["name"] == nightly["Role"]["metadata"]["name"]
    (rule,) = nightly["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    script = pod["containers"][0]["args"][0]
    used = set(re.findall(r"kubectl (get|create|delete)", script))
    assert used and used <= set(rule["verbs"])
    # The ConfigMap the header tells to create holds rayjob.yaml where the script reads it.
    header = (KUBERAY / "nightly.yaml").read_text()
    made = re.search(r"create configmap (\S+) \\\s*#?\s*--from-file=(\S+?)=(\S+)", header)
    assert made
    name, key, source = made.groups()
    assert (ROOT / source).resolve() == (KUBERAY / "rayjob.yaml").resolve()
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == name
    (mount,) = pod["containers"][0]["volumeMounts"]
    assert f"{mount['mountPath']}/{key}" in script


def _launch(script: str, states: list[str], tmp_path: Path) -> list[str]:
    """Run the launcher with a stand-in kubectl; returns the kubectl calls it made."""
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    listing = "".join(f"{state}\\n" for state in states)
    fake = tmp_path / "kubectl"
    # One line per call: the verb first (a jsonpath argument holds a newline escape).
    fake.write_text(
        f'#!/bin/sh\necho "$1" >> {calls}\nif [ "$1" = get ]; then printf "{listing}"; fi\n'
    )
    fake.chmod(0o755)
    done = subprocess.run(
        ["/bin/sh", "-c", script],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return calls.read_text().splitlines()


@pytest.mark.parametrize(
    ("states", "starts"),
    [
        ([], True),
        (["Complete", "Failed"], True),
        (["Complete", "Running"], False),
        (["Initializing"], False),
    ],
)
def test_nightly_launcher_starts_one_job_at_a_time(
    nightly: dict[str, dict[str, Any]], tmp_path: Path, states: list[str], starts: bool
) -> None:
    pod = nightly["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    calls = _launch(pod["containers"][0]["args"][0], states, tmp_path)
    verbs = [call.split()[0] for call in calls]
    assert verbs == (["get", "delete", "create"] if starts else ["get"])


# --------------------------------------------------------------------------------------
# examples/ray/cluster-aws.yaml (`ray up`)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CLUSTER_FILE.read_text())
    return loaded


def _mount_point(cluster: dict[str, Any]) -> Path:
    mounts = [
        re.search(r"mount -t nfs4 .* (/\S+)\)?$", command.strip())
        for command in cluster["setup_commands"]
    ]
    (found,) = [m for m in mounts if m]
    return Path(found.group(1).rstrip(")"))


def test_cluster_file_mounts_shared_storage_on_every_node(cluster: dict[str, Any]) -> None:
    shared = _mount_point(cluster)
    # setup_commands run on the head and on every worker; not only on one kind of node.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert "mount -t" not in " ".join(cluster.get(key, []))
    env = read_env_file(CLUSTER_ENV)
    for key in ("CLIPSEARCH_DATA_DIR", "CLIPSEARCH_MODEL_CACHE_DIR"):
        assert Path(env[key]).is_relative_to(shared), key
    for root in env["CLIPSEARCH_ROOTS"].split(":"):
        assert Path(root).is_relative_to(shared)
    # The settings file travels to every node, from beside the cluster file.
    ((remote, local),) = cluster["file_mounts"].items()
    assert (EXAMPLES / local).resolve() == CLUSTER_ENV.resolve()
    assert remote == "~/clipsearch-ray.env"


def test_cluster_file_installs_the_wheel_with_the_ray_extra_and_runs_its_ray(
    cluster: dict[str, Any],
) -> None:
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]
    (install,) = installs
    requirement = Requirement(re.search(r'"(clipsearch\[[^"]+)"', install).group(1))  # type: ignore[union-attr]
    assert "ray" in requirement.extras and "postgres" in requirement.extras
    assert requirement.url and requirement.url.startswith(f"file://{_mount_point(cluster)}/")
    wheel = requirement.url.rsplit("/", 1)[1]
    assert wheel == f"clipsearch-{_project()['version']}-py3-none-any.whl"
    venv = re.search(r"(\S+)/bin/pip install", install).group(1)  # type: ignore[union-attr]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if " start" in c]
        (start,) = starts
        assert f"{venv}/bin/ray start" in start, key
        assert ". ~/clipsearch-ray.env" in start, key  # the actors see the settings
    head_start = " ".join(cluster["head_start_ray_commands"])
    port = re.search(r"--port=(\d+)", head_start)
    assert port and f"$RAY_HEAD_IP:{port.group(1)}" in " ".join(
        cluster["worker_start_ray_commands"]
    )


def test_cluster_file_node_types_and_gpu_workers(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers and all(t["resources"].get("GPU") == 1 for t in workers.values())
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    assert sum(t["max_workers"] for t in workers.values()) >= cluster["max_workers"]


def test_cluster_file_nightly_cron_line_and_settings(
    cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (line,) = [c for c in cluster["head_setup_commands"] if "/etc/cron.d/" in c]
    entry = re.search(r"echo '([^']+)'", line).group(1)  # type: ignore[union-attr]
    minute, hour, day, month, weekday, user, command = entry.split(None, 6)
    assert (minute, hour, day, month, weekday, user) == ("0", "3", "*", "*", "*", "ubuntu")
    assert "%" not in command  # cron would turn it into a newline
    words = shlex.split(command.split(">>")[0])
    assert words[0] == "~/run-clipsearch"
    assert any("~/run-clipsearch" in c for c in cluster["setup_commands"])
    assert cli_error(words[1:]) is None, cli_error(words[1:])
    assert _engine_args(words) == "ray" and "--since-last-run" in words
    env = read_env_file(CLUSTER_ENV)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]  # on every node
    settings = _settings_from(env, monkeypatch)
    assert settings.engine == "ray"
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")


def test_cluster_file_passes_rays_own_schema(cluster: dict[str, Any]) -> None:
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    pytest.importorskip("jsonschema", reason="Ray's schema check needs jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does first: Ray's defaults for the provider filled in, then the schema.
    validate_config(prepare_config(cluster))
    broken = {**cluster, "available_node_types": {"head": {"resources": {}}}}
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises for a bad file
        validate_config(prepare_config(broken))
