"""The Kubernetes objects of one retrain, built with the official client's models (pure: no API calls).

One retrain is a ``batch/v1`` Job running ``python -m training.job_runner SPEC`` — the same
command and argument the local executor runs — where SPEC comes from a ConfigMap owned by
the Job (deleting the Job garbage-collects it) and every input and output goes through the
object store (see :mod:`server.pipeline.k8s_staging`). The pod requests the GPUs, gets the
object-store keys from a Secret (``secretKeyRef``), never restarts (``backoffLimit: 0``,
``restartPolicy: Never``: a failed fine-tune is reported, not silently retried), is killed
after ``activeDeadlineSeconds`` and removed ``ttlSecondsAfterFinished`` after it ends if the
executor could not tear it down itself.

``python -m server.pipeline.k8s_manifests`` prints an example Job (deploy/k8s/ keeps a copy).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubernetes import client
from kubernetes.utils import parse_quantity

if TYPE_CHECKING:
    from server.settings import KubernetesExecutorSettings

CONTAINER = "train"
SPEC_MOUNT = "/etc/edgeloop/job"
SPEC_FILE = "spec.json"
SCRATCH = "/job"  # emptyDir: staged inputs, outputs, Ultralytics config, HOME
INPUTS_DIR = f"{SCRATCH}/in"
OUT_DIR = f"{SCRATCH}/out"
CONFIG_DIR = f"{SCRATCH}/ultralytics"
APP_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
JOB_ID_LABEL = "edgeloop.io/job-id"
# A label value: at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric.
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TOLERATION_FIELDS = {"key": "key", "operator": "operator", "value": "value", "effect": "effect",
                      "tolerationSeconds": "toleration_seconds"}


@dataclass(frozen=True)
class TrainingRun:
    """What differs between two retrains' Jobs."""

    name: str  # the Job's name (DNS label), also the ConfigMap's
    job_id: str  # the edgeloop training job id, as a label
    s3_endpoint: str
    s3_bucket: str
    s3_region: str
    s3_secure: bool
    active_deadline_seconds: int


def job_name(job_id: str, suffix: str) -> str:
    """``edgeloop-train-<job id>-<suffix>``: unique per attempt, a valid DNS label."""
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{job_id}".lower()).strip("-")[:30] or "job"
    name = f"edgeloop-train-{slug}-{suffix}".lower()
    if not _DNS_LABEL.match(name):
        raise ValueError(f"cannot make a Job name from {job_id!r} and {suffix!r}")
    return name


def labels(run: TrainingRun) -> dict[str, str]:
    if not _LABEL_VALUE.match(run.job_id):
        raise ValueError(f"job id {run.job_id!r} is not a valid label value")
    return {APP_LABEL: "edgeloop", COMPONENT_LABEL: "training", JOB_ID_LABEL: run.job_id}


def check_settings(k8s: KubernetesExecutorSettings) -> None:
    """Refuse settings that would only fail once the API server sees them."""
    problems = []
    if not k8s.image:
        problems.append("no training image (set EDGELOOP_K8S_IMAGE)")
    if not _DNS_LABEL.match(k8s.namespace):
        problems.append(f"namespace {k8s.namespace!r} is not a DNS label")
    for name in ("cpu_request", "memory_request", "memory_limit", "scratch_size", "shm_size"):
        try:
            parse_quantity(getattr(k8s, name))
        except ValueError:
            problems.append(f"{name} {getattr(k8s, name)!r} is not a Kubernetes quantity")
    if not problems and parse_quantity(k8s.memory_limit) < parse_quantity(k8s.memory_request):
        problems.append("memory_limit is below memory_request")
    for toleration in k8s.tolerations:
        unknown = set(toleration) - set(_TOLERATION_FIELDS)
        if unknown:
            problems.append(f"toleration {toleration} has unknown fields {sorted(unknown)}")
    if problems:
        raise ValueError("Kubernetes executor settings: " + "; ".join(problems))


def _tolerations(k8s: KubernetesExecutorSettings) -> list[client.V1Toleration] | None:
    items = [client.V1Toleration(**{_TOLERATION_FIELDS[k]: v for k, v in t.items()}) for t in k8s.tolerations]
    return items or None


def _env(run: TrainingRun, k8s: KubernetesExecutorSettings) -> list[client.V1EnvVar]:
    def secret(name: str, key: str) -> client.V1EnvVar:
        return client.V1EnvVar(name=name, value_from=client.V1EnvVarSource(
            secret_key_ref=client.V1SecretKeySelector(name=k8s.s3_secret, key=key)))

    # The same variable names the server reads (ServerSettings), so one Secret serves both.
    return [
        client.V1EnvVar(name="EDGELOOP_JOB_ID", value=run.job_id),
        client.V1EnvVar(name="EDGELOOP_S3_ENDPOINT", value=run.s3_endpoint),
        client.V1EnvVar(name="EDGELOOP_S3_BUCKET", value=run.s3_bucket),
        client.V1EnvVar(name="EDGELOOP_S3_REGION", value=run.s3_region),
        client.V1EnvVar(name="EDGELOOP_S3_SECURE", value="true" if run.s3_secure else "false"),
        secret("EDGELOOP_S3_ACCESS_KEY", k8s.s3_access_key_field),
        secret("EDGELOOP_S3_SECRET_KEY", k8s.s3_secret_key_field),
        client.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),  # progress lines reach the log at once
        client.V1EnvVar(name="YOLO_OFFLINE", value="1"),
        client.V1EnvVar(name="HOME", value=f"{SCRATCH}/home"),  # torch / matplotlib caches
    ]


def _resources(k8s: KubernetesExecutorSettings) -> client.V1ResourceRequirements:
    requests = {"cpu": k8s.cpu_request, "memory": k8s.memory_request}
    limits = {"memory": k8s.memory_limit}
    if k8s.gpu_count:
        # Extended resources cannot be overcommitted: request == limit.
        requests[k8s.gpu_resource] = str(k8s.gpu_count)
        limits[k8s.gpu_resource] = str(k8s.gpu_count)
    return client.V1ResourceRequirements(requests=requests, limits=limits)


def render_job(run: TrainingRun, k8s: KubernetesExecutorSettings) -> client.V1Job:
    meta_labels = labels(run)
    container = client.V1Container(
        name=CONTAINER,
        image=k8s.image,
        image_pull_policy=k8s.image_pull_policy,
        command=["python", "-m", "training.job_runner", f"{SPEC_MOUNT}/{SPEC_FILE}"],
        working_dir=SCRATCH,
        env=_env(run, k8s),
        resources=_resources(k8s),
        volume_mounts=[
            client.V1VolumeMount(name="spec", mount_path=SPEC_MOUNT, read_only=True),
            client.V1VolumeMount(name="scratch", mount_path=SCRATCH),
            client.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        ],
        security_context=client.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=client.V1Capabilities(drop=["ALL"])),
        # When the job dies without printing its error, the log tail is the pod's last word.
        termination_message_policy="FallbackToLogsOnError",
    )
    pod_spec = client.V1PodSpec(
        restart_policy="Never",
        service_account_name=k8s.service_account,
        automount_service_account_token=False,  # the training pod never talks to the API server
        containers=[container],
        volumes=[
            client.V1Volume(name="spec", config_map=client.V1ConfigMapVolumeSource(name=run.name)),
            client.V1Volume(name="scratch", empty_dir=client.V1EmptyDirVolumeSource(size_limit=k8s.scratch_size)),
            client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(
                medium="Memory", size_limit=k8s.shm_size)),
        ],
        node_selector=dict(k8s.node_selector) or None,
        tolerations=_tolerations(k8s),
        priority_class_name=k8s.priority_class or None,
        image_pull_secrets=[client.V1LocalObjectReference(name=n) for n in k8s.image_pull_secrets] or None,
        security_context=client.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=k8s.run_as_user, run_as_group=k8s.run_as_user,
            fs_group=k8s.run_as_user, seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")),
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=run.name, namespace=k8s.namespace, labels=meta_labels),
        spec=client.V1JobSpec(
            backoff_limit=0,
            active_deadline_seconds=run.active_deadline_seconds,
            ttl_seconds_after_finished=k8s.ttl_seconds_after_finished,
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=meta_labels), spec=pod_spec),
        ),
    )


def render_spec_config_map(run: TrainingRun, k8s: KubernetesExecutorSettings, spec: dict,
                           owner: client.V1Job | None = None) -> client.V1ConfigMap:
    """The job spec the pod reads; owned by the Job once it exists, so it goes when the Job goes."""
    owners = None
    if owner is not None and owner.metadata is not None and owner.metadata.uid:
        owners = [client.V1OwnerReference(api_version="batch/v1", kind="Job", name=owner.metadata.name,
                                          uid=owner.metadata.uid, block_owner_deletion=False)]
    return client.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=client.V1ObjectMeta(name=run.name, namespace=k8s.namespace, labels=labels(run),
                                     owner_references=owners),
        data={SPEC_FILE: json.dumps(spec, indent=2, sort_keys=True, default=str)},
    )


def to_dict(obj) -> dict:
    """The manifest as the API server receives it (camelCase keys, no nulls)."""
    return client.ApiClient().sanitize_for_serialization(obj)


def example_run() -> TrainingRun:
    return TrainingRun(name="edgeloop-train-000001-example", job_id="000001", s3_endpoint="minio.edgeloop:9000",
                       s3_bucket="edgeloop", s3_region="us-east-1", s3_secure=False,
                       active_deadline_seconds=6 * 3600 + 1800)


def example_job_yaml() -> str:
    """The Job of :func:`example_run` with default settings, as YAML (deploy/k8s keeps a copy)."""
    import yaml

    from server.settings import KubernetesExecutorSettings

    # model_construct: defaults only, whatever EDGELOOP_K8S_* the caller's environment holds.
    k8s = KubernetesExecutorSettings.model_construct(image="registry.example.com/edgeloop:0.1.0")
    header = ("# Generated by `python -m server.pipeline.k8s_manifests` (a test keeps it in sync).\n"
              "# The server renders one such Job per retrain (server/pipeline/k8s_executor.py) with a\n"
              "# ConfigMap of the same name holding spec.json; this copy is for review, not for apply.\n")
    return header + yaml.safe_dump(to_dict(render_job(example_run(), k8s)), sort_keys=False)


def main() -> int:
    sys.stdout.write(example_job_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
