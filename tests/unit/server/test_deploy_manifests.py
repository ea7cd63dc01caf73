"""deploy/: Kubernetes manifests valid against the Kubernetes OpenAPI schema and consistent with
each other and with the server's settings; the compose file; the Terraform GPU node pool."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import hcl2
import kubernetes_validate
import pytest
import yaml

from server.pipeline import k8s_manifests as manifests
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SCHEMA_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
NOT_APPLIED = {"secrets.example.yaml", "training-job.example.yaml", "kustomization.yaml"}
EXPECTED_KINDS = {
    ("v1", "Namespace"), ("v1", "ServiceAccount"), ("v1", "ResourceQuota"), ("v1", "ConfigMap"),
    ("v1", "Service"), ("v1", "PersistentVolumeClaim"), ("v1", "Secret"),
    ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"), ("batch/v1", "Job"),
}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs(include_examples: bool = True) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml" or (not include_examples and path.name in NOT_APPLIED):
            continue
        docs += [(path.name, d) for d in load_docs(path)]
    return docs


def find(kind: str, name: str) -> dict:
    matches = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} definitions"
    return matches[0]


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(where, pod template labels, pod spec) of every workload, the rendered training Job included."""
    out = []
    for file, doc in k8s_docs():
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            template = doc["spec"]["template"]
            out.append((f"{file}:{doc['metadata']['name']}", template["metadata"]["labels"], template["spec"]))
    job = manifests.to_dict(manifests.render_job(manifests.example_run(), server_settings().kubernetes))
    out.append(("rendered Job", job["spec"]["template"]["metadata"]["labels"], job["spec"]["template"]["spec"]))
    return out


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def server_env() -> dict[str, str]:
    """The server container's environment as the kubelet would set it: the ConfigMap, then each
    env entry in order, $(VAR) references expanded, Secrets standing in as ``secret-<key>``."""
    deployment = find("Deployment", "edgeloop-server")
    server = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server")
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    env = {}
    for source in server["envFrom"]:
        env.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in server["env"]:
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Z0-9_]+)\)", lambda m: env[m.group(1)], var["value"])
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
        elif "secretKeyRef" in source:
            env[var["name"]] = f"secret-{source['secretKeyRef']['key']}"
        else:
            raise AssertionError(f"unexpected env source {var}")
    return env


def server_settings() -> ServerSettings:
    return _settings_from(server_env())


def _settings_from(env: dict[str, str]) -> ServerSettings:
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("EDGELOOP_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        return ServerSettings()


# ---------------------------------------------------------------------- Kubernetes


def test_every_manifest_is_yaml_with_a_known_kind():
    docs = k8s_docs()
    assert docs
    for file, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in EXPECTED_KINDS, f"{file}: {doc.get('kind')}"
        assert doc["metadata"].get("name"), file


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version):
    for file, doc in k8s_docs():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                        f"{exc.message} at {list(exc.path)}")


def test_kustomization_lists_every_applied_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization" and kustomization["namespace"] == "edgeloop"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - NOT_APPLIED
    assert listed == on_disk
    # The Jobs go to the namespace the server runs in.
    assert find("Namespace", "edgeloop") and server_settings().kubernetes.namespace == "edgeloop"


def test_every_pod_meets_the_restricted_pod_security_standard():
    assert find("Namespace", "edgeloop")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for where, _, pod in pod_specs():
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True, where
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        for c in containers(pod):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert not sc.get("privileged"), f"{where}/{c['name']}"


def test_secrets_and_config_maps_referenced_exist_with_their_keys():
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for _, d in k8s_docs() if d["kind"] == "Secret"}
    config_maps = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "ConfigMap"}
    for where, _, pod in pod_specs():
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, where
            if "configMap" in volume and not where.startswith(("rendered Job", "training-job")):
                # (the executor creates the training Job's spec ConfigMap beside the Job)
                assert volume["configMap"]["name"] in config_maps, where
        for c in containers(pod):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{where}/{c['name']}: {ref}"
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, where


def test_services_select_pods_and_their_named_ports():
    pods = pod_specs()
    for _, svc in [(f, d) for f, d in k8s_docs() if d["kind"] == "Service"]:
        selector = svc["spec"]["selector"]
        matched = [pod for _, labels, pod in pods if selector.items() <= labels.items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        names = {p.get("name") for pod in matched for c in pod["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            if isinstance(port["targetPort"], str):
                assert port["targetPort"] in names, f"{svc['metadata']['name']}: {port}"


def test_service_accounts_exist_and_training_pods_get_no_token():
    for _, _, pod in pod_specs():
        if pod.get("serviceAccountName"):
            find("ServiceAccount", pod["serviceAccountName"])
    assert find("ServiceAccount", "edgeloop-training")["automountServiceAccountToken"] is False


def test_server_role_allows_exactly_what_the_executor_calls():
    rules = find("Role", "edgeloop-training-jobs")["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # create_namespaced_job, read_namespaced_job_status, delete_namespaced_job,
    # create_namespaced_config_map, list/read_namespaced_pod, read_namespaced_pod_log.
    needed = {("batch", "jobs", "create"), ("batch", "jobs/status", "get"), ("batch", "jobs", "delete"),
              ("", "configmaps", "create"), ("", "pods", "list"), ("", "pods", "get"), ("", "pods/log", "get")}
    assert needed <= granted
    assert not [g for g in granted if g[2] in {"*", "update", "patch"} or g[1] in {"secrets", "*"}]
    binding = find("RoleBinding", "edgeloop-training-jobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "edgeloop-server"}]
    pod = find("Deployment", "edgeloop-server")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "edgeloop-server"


def test_server_settings_from_the_manifests_build_a_valid_training_job():
    settings = server_settings()
    assert settings.executor == "kubernetes"
    k8s = settings.kubernetes
    manifests.check_settings(k8s)
    images = {c["image"] for _, _, pod in pod_specs()[:-1] for c in containers(pod)
              if "edgeloop" in c["image"]}
    assert images == {k8s.image}, "EDGELOOP_K8S_IMAGE must be the image the server runs"
    find("Secret", k8s.s3_secret)
    find("ServiceAccount", k8s.service_account)
    assert k8s.run_as_user == 10001
    assert "golden" in settings.eval_sets
    assert settings.resolved_database_url() == "postgresql+psycopg://edgeloop:secret-password@postgres:5432/edgeloop"
    job = manifests.to_dict(manifests.render_job(manifests.example_run(), k8s))
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"edgeloop.io/pool": "training"}


def test_broker_config_matches_the_server_paths_and_rules():
    env = server_env()
    conf = find("ConfigMap", "edgeloop-mosquitto")["data"]["mosquitto.conf"]
    directives = _directives(conf)
    assert directives["password_file"] == [env["EDGELOOP_MQTT_PASSWORD_FILE"]]
    assert directives["pid_file"] == [env["EDGELOOP_MQTT_BROKER_PID_FILE"]]
    assert env["EDGELOOP_MQTT_BROKER_LOG_FILE"] in [v.split(" ", 1)[-1] for v in directives["log_dest"]]
    # BrokerUsers writes the ACL beside the password file.
    assert directives["acl_file"] == [str(Path(env["EDGELOOP_MQTT_PASSWORD_FILE"]).parent / "acl")]
    _assert_broker_rules(directives)
    # The server talks to the loopback listener; devices only to the TLS one.
    assert f"{env['EDGELOOP_MQTT_PORT']} 127.0.0.1" in directives["listener"]
    assert "8883 0.0.0.0" in directives["listener"] and "certfile" in directives
    pod = find("Deployment", "edgeloop-server")["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True  # so that the server can SIGHUP the broker


def _directives(conf: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in conf.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


def _assert_broker_rules(directives: dict[str, list[str]]) -> None:
    # The same security rules as the one-machine broker (server/stack/mosquitto.py render_config).
    assert directives["allow_anonymous"] == ["false"]
    assert directives["use_username_as_clientid"] == ["true"]
    assert directives["per_listener_settings"] == ["false"]


def test_training_job_copy_in_deploy_is_a_valid_job():
    (job,) = load_docs(K8S / "training-job.example.yaml")
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


# ---------------------------------------------------------------------- compose


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (enough for these files)."""
    def sub(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is required but env.example does not set it")
    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
             if line and not line.startswith("#")]
    return {k: v for k, v in pairs}


def compose() -> dict:
    return yaml.safe_load(_interpolate((DEPLOY / "compose.yaml").read_text(), _env_example()))


def test_compose_runs_the_four_services_with_healthchecks_and_volumes():
    spec = compose()
    services = spec["services"]
    assert {"mosquitto", "minio", "postgres", "server"} <= set(services)
    for name in ("mosquitto", "minio", "postgres", "server"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            wanted = "service_completed_successfully" if dependency == "broker-users" else "service_healthy"
            assert rule["condition"] == wanted, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("."):
                assert source in spec["volumes"], f"{name}: undeclared volume {source}"
            else:
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
    # Persistent data on named volumes.
    assert "postgres:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "minio:/data" in services["minio"]["volumes"]


def test_compose_server_settings_point_at_the_compose_services():
    services = compose()["services"]
    server = services["server"]
    settings = _settings_from({k: str(v) for k, v in server["environment"].items()})
    assert settings.resolved_database_url().startswith("postgresql+psycopg://edgeloop:")
    assert settings.resolved_database_url().endswith("@postgres:5432/edgeloop")
    assert settings.mqtt_host == "mosquitto" and settings.executor == "local"
    assert settings.s3_endpoint.endswith(":9000") and "golden" in settings.eval_sets
    # Enrollment: the server writes the broker's files and signals it.
    assert server["pid"] == "service:mosquitto"
    assert "broker:/broker" in server["volumes"] and "broker:/broker" in services["mosquitto"]["volumes"]
    conf = _directives((DEPLOY / "mosquitto" / "mosquitto.conf").read_text())
    assert conf["password_file"] == [str(settings.mqtt_password_file)]
    assert conf["pid_file"] == [str(settings.mqtt_broker_pid_file)]
    assert str(settings.mqtt_broker_log_file) in [v.split(" ", 1)[-1] for v in conf["log_dest"]]
    _assert_broker_rules(conf)
    # Credentials are the same on both sides.
    minio = services["minio"]["environment"]
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (
        settings.s3_access_key, settings.s3_secret_key.get_secret_value())
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] in settings.resolved_database_url()


def test_compose_gpu_overlay_reserves_nvidia_devices():
    overlay = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    (device,) = overlay["services"]["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# ---------------------------------------------------------------------- image


def test_image_installs_every_package_and_runs_as_the_pods_user():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r'include = \[([^\]]*)\]', pyproject).group(1)
    for package in re.findall(r'"([a-z_]+)\*"', packages):
        assert f"COPY {package} ./{package}" in dockerfile, package
        assert f"!{package}/" in (DEPLOY / "Dockerfile.dockerignore").read_text(), package
    assert "USER 10001:10001" in dockerfile
    assert 'pip install ".[server,training]"' in dockerfile


# ---------------------------------------------------------------------- Terraform


def _hcl(name: str) -> dict:
    with (DEPLOY / "terraform" / "gke-gpu-pool" / name).open() as fh:
        return hcl2.load(fh)


def _unquote(value):
    return value.strip('"') if isinstance(value, str) else value


def test_terraform_gpu_pool_matches_what_the_executor_asks_for():
    main = _hcl("main.tf")
    variables = {_unquote(k): v for block in _hcl("variables.tf")["variable"] for k, v in block.items()}
    (resource,) = main["resource"]
    pool = resource['"google_container_node_pool"']['"training"']
    (node,) = pool["node_config"]
    (accelerator,) = node["guest_accelerator"]
    assert accelerator["count"] == "${var.accelerator_count}"
    assert accelerator["gpu_driver_installation_config"][0]["gpu_driver_version"] == '"LATEST"'
    (autoscaling,) = pool["autoscaling"]
    assert autoscaling["total_min_node_count"] == "${var.min_nodes}"
    assert variables["min_nodes"]["default"] == 0  # scales to zero between retrains
    # Jobs land on this pool: its label is the executor's node selector, and its GPUs suffice.
    (local,) = main["locals"]
    label = {_unquote(k): _unquote(v) for k, v in local["pool_label"].items()}
    k8s = server_settings().kubernetes
    assert k8s.node_selector == label
    assert k8s.gpu_count <= variables["accelerator_count"]["default"]
    assert k8s.gpu_resource == "nvidia.com/gpu"
    # GKE taints GPU nodes nvidia.com/gpu:NoSchedule; the default toleration covers it.
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s.tolerations
    # Every variable used is declared.
    text = "".join((DEPLOY / "terraform" / "gke-gpu-pool" / f).read_text() for f in ("main.tf", "outputs.tf"))
    assert set(re.findall(r"var\.([a-z_]+)", text)) <= set(variables)


def test_terraform_outputs_the_executor_settings():
    (output,) = [v for block in _hcl("outputs.tf")["output"] for k, v in block.items()
                 if _unquote(k) == "executor_env"]
    assert set(output["value"]) == {"EDGELOOP_K8S_NODE_SELECTOR", "EDGELOOP_K8S_GPU_COUNT",
                                    "EDGELOOP_K8S_GPU_RESOURCE"}
    assert json.loads(server_env()["EDGELOOP_K8S_NODE_SELECTOR"]) == {"edgeloop.io/pool": "training"}
