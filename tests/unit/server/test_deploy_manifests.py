"""deploy/: Kubernetes manifests (the primary server and its ingest replicas) valid against the
Kubernetes OpenAPI schema and consistent with each other and with the server's settings; the
compose file; the Terraform GPU node pool."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hcl2
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from server.pipeline import k8s_manifests as manifests
from server.settings import ServerSettings
from server.stack.mosquitto import BrokerUsers

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
    ("networking.k8s.io/v1", "NetworkPolicy"), ("policy/v1", "PodDisruptionBudget"),
}
PRIMARY_POD = "edgeloop-server-5d9c8f7b6-x7k2p"  # a Deployment pod's name: random, not stable


def load_docs(path: Path) -> list[dict]:
    return list(_parsed(path.read_text()))


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> tuple[dict, ...]:
    """Parsed once per file content (the tests only read the documents)."""
    return tuple(d for d in yaml.safe_load_all(text) if d is not None)


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


def container(workload: dict, name: str) -> dict:
    return next(c for c in containers(workload["spec"]["template"]["spec"]) if c["name"] == name)


def container_env(c: dict, pod_name: str) -> dict[str, str]:
    """A container's environment as the kubelet would set it: its ConfigMaps, then each env entry
    in order, $(VAR) references expanded, Secrets standing in as ``secret-<key>``, the downward
    API's metadata.name as ``pod_name``."""
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    env = {}
    for source in c.get("envFrom", []):
        env.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        source = var.get("valueFrom", {})
        field = source.get("fieldRef", {}).get("fieldPath")
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Z0-9_]+)\)", lambda m: env[m.group(1)], var["value"])
        elif field == "metadata.namespace":
            env[var["name"]] = namespace
        elif field == "metadata.name":
            env[var["name"]] = pod_name
        elif "secretKeyRef" in source:
            env[var["name"]] = f"secret-{source['secretKeyRef']['key']}"
        else:
            raise AssertionError(f"unexpected env source {var}")
    return env


def server_env() -> dict[str, str]:
    """The primary's server container's environment."""
    return container_env(container(find("Deployment", "edgeloop-server"), "server"), PRIMARY_POD)


def server_settings() -> ServerSettings:
    return _settings_from(server_env())


def ingest_env(ordinal: int) -> dict[str, str]:
    """The environment of the ingest StatefulSet's pod ``<name>-<ordinal>``."""
    sts = find("StatefulSet", "edgeloop-ingest")
    return container_env(container(sts, "server"), f"{sts['metadata']['name']}-{ordinal}")


def ingest_settings(ordinal: int) -> ServerSettings:
    return _settings_from(ingest_env(ordinal))


def server_workloads() -> list[tuple[dict, dict]]:
    """(workload, container) of every Deployment/StatefulSet container that runs ``edgeloop server``."""
    return [(doc, c) for _, doc in k8s_docs(include_examples=False) if doc["kind"] in {"Deployment", "StatefulSet"}
            for c in doc["spec"]["template"]["spec"]["containers"] if c.get("command") == ["edgeloop", "server"]]


def replica_settings() -> list[tuple[str, ServerSettings]]:
    """(pod, settings) of every server replica the manifests run at their replica counts."""
    out = []
    for workload, c in server_workloads():
        name, replicas = workload["metadata"]["name"], workload["spec"].get("replicas", 1)
        pods = [f"{name}-{i}" for i in range(replicas)] if workload["kind"] == "StatefulSet" else [PRIMARY_POD]
        out += [(pod, _settings_from(container_env(c, pod))) for pod in pods]
    return out


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
    _assert_every_listener_forces_the_user_name(conf)
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
    assert set(directives["use_username_as_clientid"]) == {"true"}
    assert directives["per_listener_settings"] == ["false"]


# Settings of one listener in Mosquitto 2 (even with per_listener_settings false). Above the first
# `listener` they configure its default listener, which then also opens, on port 1883 of every
# address: beside a `listener 1883 ...` the broker exits with "Address already in use".
LISTENER_SETTINGS = {
    "bind_address", "port", "protocol", "max_connections", "max_qos", "mount_point", "socket_domain",
    "use_username_as_clientid", "cafile", "capath", "certfile", "keyfile", "ciphers", "ciphers_tls13",
    "dhparamfile", "psk_hint", "require_certificate", "crlfile", "tls_version", "use_identity_as_username",
    "use_subject_as_username",
}


def _assert_every_listener_forces_the_user_name(conf: str) -> None:
    before_first = set(_directives(conf.split("\nlistener ", 1)[0]))
    assert not before_first & LISTENER_SETTINGS, before_first & LISTENER_SETTINGS
    for listener, settings in _listeners(conf).items():
        # The client id is the user name on every listener: devices' ACL patterns and the
        # replicas' sessions rely on it.
        assert settings.get("use_username_as_clientid") == ["true"], listener


def test_training_job_copy_in_deploy_is_a_valid_job():
    (job,) = load_docs(K8S / "training-job.example.yaml")
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


# ---------------------------------------------------------------------- replicas (server-ingest.yaml)


def _listeners(conf: str) -> dict[str, dict[str, list[str]]]:
    """mosquitto.conf's listeners ("port address") with the directives that follow each one."""
    out: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in conf.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "listener":
            current = out.setdefault(value.strip(), {})
        elif current is not None and key and not key.startswith("#"):
            current.setdefault(key, []).append(value.strip())
    return out


def _broker_client_id(settings: ServerSettings) -> str:
    """The client id the broker keeps the session under: Mosquitto forces the user name."""
    conf = _directives(find("ConfigMap", "edgeloop-mosquitto")["data"]["mosquitto.conf"])
    forced = conf["use_username_as_clientid"] == ["true"]
    return settings.mqtt_username if forced else settings.resolved_mqtt_client_id()


def test_ingest_replicas_are_a_statefulset_whose_client_ids_come_from_the_pod_name():
    sts = find("StatefulSet", "edgeloop-ingest")
    spec = sts["spec"]
    assert spec["replicas"] == 2 and spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    headless = find("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == spec["selector"]["matchLabels"]
    env = {v["name"]: v for v in container(sts, "server")["env"]}
    assert env["EDGELOOP_MQTT_CLIENT_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for ordinal in range(spec["replicas"]):
        settings = ingest_settings(ordinal)
        assert settings.replica_role == "ingest" and not settings.is_primary
        # The same pod name, the same id after a restart: the broker's session is found again.
        assert settings.resolved_mqtt_client_id() == f"edgeloop-ingest-{ordinal}"
        assert settings.mqtt_username == f"_edgeloop-ingest-{ordinal}"
        assert _broker_client_id(settings) == _broker_client_id(ingest_settings(ordinal))
    # The primary's pods have no stable name: it stays one Deployment replica, under its fixed user.
    for workload, _ in server_workloads():
        if workload["kind"] == "Deployment":
            assert workload["spec"]["replicas"] == 1 and workload["spec"]["strategy"]["type"] == "Recreate"
    primary = server_settings()
    assert primary.is_primary and primary.mqtt_client_id == "" and primary.resolved_mqtt_client_id() == "_edgeloop-server"


def test_every_replica_joins_one_shared_group_with_its_own_broker_session():
    replicas = replica_settings()
    assert len(replicas) >= 3
    groups = {settings.mqtt_shared_group for _, settings in replicas}
    # One group for all: a replica outside it (or unshared) would get every message a second time.
    assert len(groups) == 1 and None not in groups, groups
    assert [pod for pod, settings in replicas if settings.is_primary] == [PRIMARY_POD]
    assert all(s.replica_role == "ingest" for pod, s in replicas if pod != PRIMARY_POD)
    # Two connections under one client id take each other's session over.
    ids = [_broker_client_id(settings) for _, settings in replicas]
    assert len(set(ids)) == len(ids), ids
    # Up to the most ingest replicas the primary creates broker users for.
    most = int(container_env(container(find("Deployment", "edgeloop-server"), "broker-users"),
                             PRIMARY_POD)["INGEST_BROKER_USERS"])
    ids = [_broker_client_id(ingest_settings(i)) for i in range(most)] + [_broker_client_id(server_settings())]
    assert len(set(ids)) == len(ids)


def test_replicas_share_one_postgresql_database_from_the_secret():
    workloads = server_workloads()
    total = sum(workload["spec"].get("replicas", 1) for workload, _ in workloads)
    assert total > 1
    urls = set()
    for pod, settings in replica_settings():
        url = settings.resolved_database_url()
        # SQLite is a file in each pod's own data_dir: replicas would not share it.
        assert not url.startswith("sqlite"), pod
        assert url == "postgresql+psycopg://edgeloop:secret-password@postgres:5432/edgeloop", pod
        urls.add(url)
    assert len(urls) == 1
    for _, c in workloads:
        env = {v["name"]: v for v in c["env"]}
        assert "$(EDGELOOP_DB_PASSWORD)" in env["EDGELOOP_DATABASE_URL"]["value"]
        assert env["EDGELOOP_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "edgeloop-database",
                                                                            "key": "password"}
    postgres = {v["name"]: v for v in container(find("StatefulSet", "postgres"), "postgres")["env"]}
    assert postgres["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "edgeloop-database",
                                                                         "key": "password"}
    find("Service", "postgres")


def test_ingest_replicas_reach_the_primarys_broker_through_a_service_only_they_may_use():
    settings = ingest_settings(0)
    service = find("Service", settings.mqtt_host)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == settings.mqtt_port]
    primary = find("Deployment", "edgeloop-server")
    assert service["spec"]["selector"].items() <= primary["spec"]["template"]["metadata"]["labels"].items()
    mosquitto = container(primary, "mosquitto")
    (target,) = [p["containerPort"] for p in mosquitto["ports"] if p["name"] == port["targetPort"]]
    listeners = _listeners(find("ConfigMap", "edgeloop-mosquitto")["data"]["mosquitto.conf"])
    assert f"{target} 0.0.0.0" in listeners, listeners
    # Devices still reach only the TLS listener from outside the cluster.
    assert "certfile" in listeners["8883 0.0.0.0"] and "certfile" not in listeners[f"{target} 0.0.0.0"]
    outside = find("Service", "edgeloop-mqtt")
    assert [p["targetPort"] for p in outside["spec"]["ports"]] == ["mqtts"]
    # The same broker credentials as the primary: the server account's Secret.
    for name in ("EDGELOOP_MQTT_PASSWORD",):
        assert ingest_env(0)[name] == server_env()[name] == "secret-mqtt-password"
    # The NetworkPolicy on the primary's pod: every port it serves stays open, the plain
    # replica listener only to the ingest pods.
    (policy,) = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    pod_labels = primary["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ingest_labels = find("StatefulSet", "edgeloop-ingest")["spec"]["template"]["metadata"]["labels"]
    served = {p["name"] for c in primary["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    open_to_all = {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
    assert open_to_all == served - {port["targetPort"]}
    (restricted,) = [rule for rule in policy["spec"]["ingress"] if "from" in rule]
    assert [p["port"] for p in restricted["ports"]] == [port["targetPort"]]
    assert [f["podSelector"]["matchLabels"] for f in restricted["from"]] == [
        {k: ingest_labels[k] for k in restricted["from"][0]["podSelector"]["matchLabels"]}]


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_the_primary_creates_a_broker_user_for_every_ingest_replica(tmp_path):
    init = container(find("Deployment", "edgeloop-server"), "broker-users")
    env = container_env(init, PRIMARY_POD)
    assert env["INGEST_STATEFULSET"] == "edgeloop-ingest"
    most = int(env["INGEST_BROKER_USERS"])
    assert most >= find("StatefulSet", "edgeloop-ingest")["spec"]["replicas"]
    # The init container's own script, run against a temporary state volume.
    script = init["command"][2].replace("/var/lib/edgeloop", str(tmp_path))
    assert init["command"][:2] == ["python", "-c"] and str(tmp_path) in script
    env["EDGELOOP_MQTT_PASSWORD"] = "mqtt-password-from-the-secret"
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60,
                   env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **env})
    users = BrokerUsers(tmp_path / "broker" / "passwd")
    wanted = {server_settings().mqtt_username} | {ingest_settings(i).mqtt_username for i in range(most)}
    assert set(users.users()) == wanted and set(users.server_users()) == wanted
    acl = users.acl_file.read_text()
    for name in wanted:
        assert f"user {name}\n" in acl
    # The primary's server container reads the same password.
    assert server_settings().mqtt_password.get_secret_value() == ingest_env(0)["EDGELOOP_MQTT_PASSWORD"]


def test_ingest_replicas_run_like_the_primary_but_never_enroll_or_train():
    primary, ingest = server_settings(), ingest_settings(0)
    differ = {"replica_role", "mqtt_host", "mqtt_port", "mqtt_username", "mqtt_client_id",
              "mqtt_password_file", "mqtt_broker_pid_file", "mqtt_broker_log_file", "executor", "kubernetes",
              "eval_sets"}
    a, b = primary.model_dump(exclude=differ), ingest.model_dump(exclude=differ)
    assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    # No password file: enrollment (which only the primary's pod can write) answers 503 there...
    assert ingest.mqtt_password_file is None and ingest.broker_accounts == "password_file"
    # ...so the API Service selects the primary only.
    api = find("Service", "edgeloop-api")["spec"]["selector"]
    sts = find("StatefulSet", "edgeloop-ingest")
    assert not api.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # Retrains run on the primary: no executor that needs the Kubernetes API, and no token.
    assert ingest.executor == "local"
    pod = sts["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    # The same keys mean the same values in both ConfigMaps, but for the broker's address.
    mine, theirs = find("ConfigMap", "edgeloop-ingest")["data"], find("ConfigMap", "edgeloop-server")["data"]
    assert {k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k]} == {"EDGELOOP_MQTT_HOST",
                                                                               "EDGELOOP_MQTT_PORT"}
    # Image, probes, resources and security as the primary's server container.
    primary_pod = find("Deployment", "edgeloop-server")["spec"]["template"]["spec"]
    theirs_c, mine_c = container(find("Deployment", "edgeloop-server"), "server"), container(sts, "server")
    for key in ("image", "command", "ports", "readinessProbe", "livenessProbe", "resources", "securityContext"):
        assert mine_c[key] == theirs_c[key], key
    assert pod["securityContext"] == primary_pod["securityContext"]
    # data_dir: an emptyDir (nothing to keep, no PVC); the deployment's one signing key.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in mine_c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[str(ingest.data_dir)]] and "volumeClaimTemplates" not in sts["spec"]
    primary_volumes = {v["name"]: v for v in primary_pod["volumes"]}
    key_volume = mounts[str(ingest.signing_key.parent)]
    assert volumes[key_volume]["secret"] == primary_volumes["signing-key"]["secret"]
    assert ingest.signing_key == primary.signing_key


def test_ingest_replicas_wait_for_the_primary_and_keep_one_up_through_disruptions():
    sts = find("StatefulSet", "edgeloop-ingest")
    script = container(sts, "wait-for-primary")["command"][2]
    host, port, path = re.search(r"http://([a-z0-9-]+):(\d+)(/\S*?)\"", script).groups()
    api = find("Service", host)
    assert api["spec"]["selector"].items() <= find("Deployment", "edgeloop-server")["spec"]["template"][
        "metadata"]["labels"].items()
    assert int(port) in [p["port"] for p in api["spec"]["ports"]]
    assert path == container(find("Deployment", "edgeloop-server"), "server")["readinessProbe"]["httpGet"]["path"]
    (pdb,) = [d for _, d in k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == sts["spec"]["selector"]
    assert sts["spec"]["replicas"] > pdb["spec"]["minAvailable"]  # a node drain can still evict one


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None,
                    reason="needs mosquitto and mosquitto_passwd")
def test_the_broker_config_shares_device_traffic_across_the_replicas(tmp_path):
    """broker.yaml's Mosquitto config, run (on free loopback ports, files in tmp_path) with the
    users the primary's init container creates: it opens exactly its listeners, keeps each
    replica's session under its user name, and hands each message to one replica of the group
    (drift reports to the primary only)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol import Channel, device_topic, server_subscriptions
    from server.stack.ports import find_free_ports, wait_for_port
    from server.stack.tls import write_dev_pki

    conf = find("ConfigMap", "edgeloop-mosquitto")["data"]["mosquitto.conf"]
    pki = write_dev_pki(tmp_path / "tls")
    pki.server_cert.rename(tmp_path / "tls" / "tls.crt")
    pki.server_key.rename(tmp_path / "tls" / "tls.key")
    conf = conf.replace("/var/lib/edgeloop", str(tmp_path)).replace("/etc/edgeloop/mqtt-tls", str(tmp_path / "tls"))
    listeners = list(_listeners(conf))
    ports = dict(zip([item.split()[0] for item in listeners], find_free_ports(len(listeners)), strict=True))
    for item in listeners:
        conf = conf.replace(f"\nlistener {item}\n", f"\nlistener {ports[item.split()[0]]} 127.0.0.1\n")
    if os.geteuid() == 0:
        conf = "user root\n" + conf  # else Mosquitto switches to the mosquitto user
    (tmp_path / "mosquitto.conf").write_text(conf)
    init = container(find("Deployment", "edgeloop-server"), "broker-users")
    env = {**container_env(init, PRIMARY_POD), "EDGELOOP_MQTT_PASSWORD": "mqtt-password-from-the-secret"}
    subprocess.run([sys.executable, "-c", init["command"][2].replace("/var/lib/edgeloop", str(tmp_path))],
                   cwd=REPO, check=True, timeout=60, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **env})
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    clients, received = [], {}

    def connect(settings: ServerSettings, port: int, subscriptions) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.resolved_mqtt_client_id(),
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(settings.mqtt_username, env["EDGELOOP_MQTT_PASSWORD"])
        client.on_connect = lambda c, *_: c.subscribe(subscriptions) if subscriptions else None
        client.on_subscribe = lambda *_: received.setdefault(settings.mqtt_username, [])
        client.on_message = lambda c, u, m: received.setdefault(settings.mqtt_username, []).append(m.topic)
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)

    try:
        for port in ports.values():
            wait_for_port(port, timeout=10)
        replicas = [(server_settings(), ports[str(server_settings().mqtt_port)])] + [
            (ingest_settings(i), ports[str(ingest_settings(i).mqtt_port)]) for i in range(2)]
        for settings, port in replicas:
            connect(settings, port, server_subscriptions(settings.mqtt_shared_group, primary=settings.is_primary))
        deadline = time.monotonic() + 10
        while len(received) < len(replicas) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(received) == len(replicas), "not every replica subscribed"
        # A spare ingest replica's user stands in for devices (it may publish under the root).
        connect(ingest_settings(5), ports[str(ingest_settings(5).mqtt_port)], [])
        time.sleep(0.5)
        for i in range(60):
            clients[-1].publish(device_topic(f"cam{i:02d}", Channel.HEARTBEAT), b"{}", qos=1)
        for i in range(10):
            clients[-1].publish(device_topic(f"cam{i:02d}", Channel.DRIFT), b"{}", qos=1)
        deadline = time.monotonic() + 10
        while sum(map(len, received.values())) < 70 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more arrives (a message handled twice would)
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        broker.terminate()
        log = broker.communicate(timeout=10)[0]
    heartbeats = {user: sum(t.endswith("/heartbeat") for t in topics) for user, topics in received.items()}
    drift = {user: sum(t.endswith("/drift") for t in topics) for user, topics in received.items()}
    assert sum(heartbeats.values()) == 60 and all(heartbeats.values()), (heartbeats, log)
    assert drift == {"_edgeloop-server": 10, "_edgeloop-ingest-0": 0, "_edgeloop-ingest-1": 0}, drift
    opened = {int(p) for p in re.findall(r"Opening ipv4 listen socket on port (\d+)", log)}
    assert opened == set(ports.values()), log  # no default listener besides the configured ones
    for settings, _ in replicas:
        # Mosquitto kept the session under the user name, whatever client id was asked for.
        assert f" as {settings.mqtt_username} (" in log, log


def setting_env_names() -> set[str]:
    """Every environment variable ServerSettings reads: EDGELOOP_<FIELD>, EDGELOOP_<FIELD>__<SUB> for
    nested models, and a nested settings class's own prefix (EDGELOOP_K8S_<SUB>, EDGELOOP_TRAIN_...)."""
    config = ServerSettings.model_config
    prefix, delimiter = config["env_prefix"], config["env_nested_delimiter"]
    assert not config.get("case_sensitive")
    names = set()
    for name, field in ServerSettings.model_fields.items():
        assert field.alias is None and field.validation_alias is None, name
        top = f"{prefix}{name}".upper()
        names.add(top)
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            for sub in nested.model_fields:
                names.add(f"{top}{delimiter}{sub}".upper())
                if issubclass(nested, BaseSettings):
                    names.add(f"{nested.model_config['env_prefix']}{sub}".upper())
    return names


def test_every_edgeloop_env_var_in_the_manifests_is_a_server_setting():
    known = setting_env_names()
    assert {"EDGELOOP_MQTT_SHARED_GROUP", "EDGELOOP_K8S_IMAGE", "EDGELOOP_TRAIN_EPOCHS",
            "EDGELOOP_INGEST__FLUSH_INTERVAL", "EDGELOOP_ROLLOUT_LEASE_SECONDS"} <= known
    assert "EDGELOOP_MQTT_SHARED_GRUOP" not in known
    prefix = ServerSettings.model_config["env_prefix"]
    checked = 0
    for file, doc in k8s_docs(include_examples=False):
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        for c in containers(doc["spec"]["template"]["spec"]):
            names = {v["name"] for v in c.get("env", [])}
            for source in c.get("envFrom", []):
                names |= set(find("ConfigMap", source["configMapRef"]["name"])["data"])
            # A variable only there to be spliced into another one, $(EDGELOOP_DB_PASSWORD), is no setting.
            helpers = {m for v in c.get("env", []) for m in re.findall(r"\$\(([A-Z0-9_]+)\)", v.get("value", ""))}
            unknown = {n for n in names - helpers if n.upper().startswith(prefix.upper()) and n.upper() not in known}
            assert not unknown, f"{file} {doc['metadata']['name']}/{c['name']}: not ServerSettings fields: {unknown}"
            checked += len(names)
    assert checked > 40
    # ServerSettings ignores unknown variables (extra="ignore"): a typo would pass silently.
    assert ServerSettings.model_config["extra"] == "ignore"


def test_every_manifest_not_in_the_kustomization_is_a_documented_example():
    kustomization_text = (K8S / "kustomization.yaml").read_text()
    for name in NOT_APPLIED - {"kustomization.yaml"}:
        assert name.endswith(".example.yaml"), name
        header = (K8S / name).read_text().split("\n", 3)
        assert (f"{name} is not listed" in kustomization_text
                or any("NOT part of kustomization.yaml" in line for line in header)), name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize built in)")
def test_kustomize_builds_every_applied_manifest_into_the_namespace():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    expected = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_docs(include_examples=False)}
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == expected
    for doc in built:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edgeloop"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "edgeloop", doc["metadata"]["name"]


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


def test_compose_broker_config_sets_listener_settings_on_its_listener():
    _assert_every_listener_forces_the_user_name((DEPLOY / "mosquitto" / "mosquitto.conf").read_text())


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
