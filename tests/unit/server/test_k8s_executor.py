"""The Kubernetes Job executor: rendered manifests (validated against the Kubernetes OpenAPI
schema), and create → stream → teardown against fakes of the BatchV1Api / CoreV1Api surfaces."""

from __future__ import annotations

import inspect
import io
import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import kubernetes_validate
import pytest
import urllib3
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from server.objectstore import ObjectNotFoundError
from server.pipeline import k8s_manifests as manifests
from server.pipeline.executor import JobFailed, LocalSubprocessExecutor, make_executor
from server.pipeline.k8s_executor import KubernetesJobExecutor
from server.settings import KubernetesExecutorSettings, ServerSettings

SCHEMA_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
REPO = Path(__file__).resolve().parents[3]


def k8s_settings(**overrides) -> KubernetesExecutorSettings:
    values = {"image": "registry.example.com/edgeloop:0.1.0", "poll_seconds": 5.0, **overrides}
    return KubernetesExecutorSettings.model_construct(**values)


def server_settings(tmp_path: Path, **k8s) -> ServerSettings:
    settings = ServerSettings.model_construct(data_dir=tmp_path, s3_endpoint="minio:9000", s3_bucket="edgeloop",
                                              s3_region="us-east-1", s3_secure=False, executor="kubernetes")
    settings.kubernetes = k8s_settings(**k8s)
    settings.training.timeout_seconds = 600
    return settings


def validate(manifest: dict) -> None:
    for version in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest.get('kind')} is not valid for Kubernetes {version}: "
                        f"{exc.message} at {list(exc.path)}")


def roundtrip(manifest: dict, kind: str):
    """Deserialize with the client's own models: unknown or mistyped fields do not survive."""
    api, text = client.ApiClient(), json.dumps(manifest)
    if "content_type" in inspect.signature(api.deserialize).parameters:  # client >= 35 takes the text
        return api.deserialize(text, kind, "application/json")
    return api.deserialize(type("Response", (), {"data": text})(), kind)


RUN = manifests.TrainingRun(name="edgeloop-train-000042-abc123", job_id="000042", s3_endpoint="minio:9000",
                            s3_bucket="edgeloop", s3_region="us-east-1", s3_secure=True,
                            active_deadline_seconds=9000)


# ---------------------------------------------------------------------- manifests


def test_rendered_job_requests_gpus_and_reads_keys_from_the_secret():
    job = manifests.to_dict(manifests.render_job(RUN, k8s_settings(gpu_count=2)))
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == RUN.name and job["metadata"]["namespace"] == "edgeloop"
    assert job["metadata"]["labels"][manifests.JOB_ID_LABEL] == "000042"
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 9000
    assert spec["ttlSecondsAfterFinished"] == 3600
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"][manifests.JOB_ID_LABEL] == "000042"
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "edgeloop-training"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "training.job_runner", "/etc/edgeloop/job/spec.json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e for e in container["env"]}
    assert env["EDGELOOP_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "edgeloop-object-store",
                                                                         "key": "access-key"}
    assert env["EDGELOOP_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "edgeloop-object-store",
                                                                         "key": "secret-key"}
    assert "value" not in env["EDGELOOP_S3_SECRET_KEY"]  # the secret never sits in the Job spec
    assert env["EDGELOOP_S3_SECURE"]["value"] == "true" and env["EDGELOOP_S3_ENDPOINT"]["value"] == "minio:9000"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spec"]["configMap"]["name"] == RUN.name
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    validate(job)
    assert roundtrip(job, "V1Job").spec.template.spec.containers[0].resources.limits == {
        "memory": "32Gi", "nvidia.com/gpu": "2"}


def test_cpu_only_job_asks_for_no_gpu_and_carries_placement():
    k8s = k8s_settings(gpu_count=0, node_selector={"cloud.google.com/gke-nodepool": "train"},
                       tolerations=[{"key": "dedicated", "operator": "Equal", "value": "training",
                                     "effect": "NoExecute", "tolerationSeconds": 60}],
                       image_pull_secrets=["regcred"], priority_class="batch-low")
    job = manifests.to_dict(manifests.render_job(RUN, k8s))
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert not any("gpu" in k for k in {**resources["limits"], **resources["requests"]})
    assert pod["nodeSelector"] == {"cloud.google.com/gke-nodepool": "train"}
    assert pod["tolerations"][0]["tolerationSeconds"] == 60
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "batch-low"
    validate(job)


def test_spec_config_map_is_owned_by_the_job_and_valid():
    created = client.V1Job(metadata=client.V1ObjectMeta(name=RUN.name, uid="uid-1"))
    cm = manifests.to_dict(manifests.render_spec_config_map(RUN, k8s_settings(), {"imgsz": 160}, owner=created))
    assert cm["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": RUN.name,
                                                  "uid": "uid-1", "blockOwnerDeletion": False}]
    assert json.loads(cm["data"]["spec.json"]) == {"imgsz": 160}
    validate(cm)
    assert roundtrip(cm, "V1ConfigMap").metadata.owner_references[0].uid == "uid-1"


@pytest.mark.parametrize("overrides, problem", [
    ({"image": ""}, "no training image"),
    ({"memory_request": "lots"}, "not a Kubernetes quantity"),
    ({"memory_request": "64Gi", "memory_limit": "32Gi"}, "below memory_request"),
    ({"namespace": "Edge_Loop"}, "not a DNS label"),
    ({"tolerations": [{"key": "a", "toleration_seconds": 3}]}, "unknown fields"),
])
def test_bad_settings_are_refused_before_any_api_call(overrides, problem):
    with pytest.raises(ValueError, match=problem):
        manifests.check_settings(k8s_settings(**overrides))


def test_job_names_are_dns_labels():
    assert manifests.job_name("000042", "abc123") == "edgeloop-train-000042-abc123"
    assert manifests.job_name("Job_7!", "x1") == "edgeloop-train-job-7-x1"


def test_deploy_copy_of_the_job_is_what_the_executor_renders():
    path = REPO / "deploy" / "k8s" / "training-job.example.yaml"
    assert path.read_text() == manifests.example_job_yaml(), (
        "regenerate with `python -m server.pipeline.k8s_manifests > deploy/k8s/training-job.example.yaml`")


def test_make_executor_defaults_to_the_local_subprocess(tmp_path):
    settings = ServerSettings.model_construct(data_dir=tmp_path, executor="local")
    assert isinstance(make_executor(settings, store=None), LocalSubprocessExecutor)


# ---------------------------------------------------------------------- fakes


class FakeStore:
    """The ObjectStore surface the executor uses, in memory."""

    bucket = "edgeloop"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.uploaded: list[str] = []

    def put_file(self, key, path, content_type="application/octet-stream"):
        self.objects[key] = Path(path).read_bytes()
        self.uploaded.append(key)
        return "etag"

    def get_bytes(self, key, max_bytes):
        if key not in self.objects:
            raise ObjectNotFoundError(f"{key} does not exist", code="NoSuchKey")
        return self.objects[key]

    def download_file(self, key, path, *, max_bytes=None):
        Path(path).write_bytes(self.objects[key])
        return len(self.objects[key])

    def list(self, prefix=""):
        return [type("Info", (), {"key": k})() for k in sorted(self.objects) if k.startswith(prefix)]

    def delete(self, key):
        self.objects.pop(key, None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class LogResponse:
    def __init__(self, chunks, fail_with=None) -> None:
        self._chunks, self._fail = chunks, fail_with
        self.closed = False

    def stream(self, amt=None, decode_content=False):
        yield from self._chunks
        if self._fail is not None:
            raise self._fail

    def close(self):
        self.closed = True

    def release_conn(self):
        pass


def lines(*events: dict, noise: bool = True) -> list[str]:
    out = ["Ultralytics 8.4 🚀 Python-3.11 torch CUDA:0 (NVIDIA L4)"] if noise else []
    return out + [json.dumps(e) for e in events]


def chunked(text_lines: list[str], size: int = 7) -> list[bytes]:
    """The log as the API server sends it: arbitrary chunks that split lines (and UTF-8) anywhere."""
    data = "".join(line + "\n" for line in text_lines).encode()
    return [data[i:i + size] for i in range(0, len(data), size)]


class FakeCluster:
    """A namespace with one Job's worth of behaviour, scripted per test.

    ``pending_polls`` pod listings see the pod Pending (``waiting``/``unschedulable`` say why;
    None: it never starts); then it runs, and reading its log "runs" the training: the pod
    reads the staged spec, and (``upload``) puts outputs into the store like the job runner must.
    """

    def __init__(self, store: FakeStore, *, log_lines: list[str], outcome: str = "succeeded",
                 pending_polls: int | None = 1, waiting: str | None = None, unschedulable: bool = False,
                 log_breaks: int = 0, silent: bool = False, upload: bool | str = True,
                 terminated_reason: str = "Completed", exit_code: int = 0, create_error: ApiException | None = None,
                 flaky_reads: int = 0):
        self.store = store
        self.log_lines, self.outcome = log_lines, outcome
        self.pending_polls, self.waiting, self.unschedulable = pending_polls, waiting, unschedulable
        self.log_breaks, self.silent, self.upload = log_breaks, silent, upload
        self.terminated_reason, self.exit_code = terminated_reason, exit_code
        self.create_error = create_error
        self.flaky_reads = flaky_reads  # the API server answers 503 to this many status reads first
        self.calls: list[str] = []
        self.jobs: dict[str, client.V1Job] = {}
        self.config_maps: dict[str, client.V1ConfigMap] = {}
        self.deleted: list[tuple[str, str]] = []
        self.log_reads = 0
        self.finished = False
        self.staged_members: list[str] = []
        self.pod_spec: dict | None = None

    # -- BatchV1Api
    def create_namespaced_job(self, namespace, body):
        self.calls.append("create_job")
        if self.create_error is not None:
            raise self.create_error
        assert isinstance(body, client.V1Job)
        validate(manifests.to_dict(body))
        body.metadata.uid = "job-uid-1"
        self.jobs[body.metadata.name] = body
        return body

    def read_namespaced_job_status(self, name, namespace):
        if self.flaky_reads:
            self.flaky_reads -= 1
            self.calls.append("503")
            raise ApiException(status=503, reason="Service Unavailable")
        job = self.jobs[name]
        status = client.V1JobStatus(active=1)
        if self.finished and self.outcome == "succeeded":
            status = client.V1JobStatus(succeeded=1, conditions=[
                client.V1JobCondition(type="Complete", status="True")])
        elif self.finished and self.outcome == "failed":
            status = client.V1JobStatus(failed=1, conditions=[
                client.V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded",
                                      message="Job has reached the specified backoff limit")])
        return client.V1Job(metadata=job.metadata, status=status)

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self.calls.append("delete_job")
        self.deleted.append((name, propagation_policy))
        if name not in self.jobs:
            raise ApiException(status=404, reason="Not Found")
        del self.jobs[name]

    # -- CoreV1Api
    def create_namespaced_config_map(self, namespace, body):
        self.calls.append("create_config_map")
        validate(manifests.to_dict(body))
        self.config_maps[body.metadata.name] = body
        return body

    def _pod(self, name: str) -> client.V1Pod:
        if self.finished:
            phase = "Succeeded" if self.outcome == "succeeded" else "Failed"
            state = client.V1ContainerState(terminated=client.V1ContainerStateTerminated(
                exit_code=self.exit_code, reason=self.terminated_reason))
        elif self.pending_polls is None or self.pending_polls > 0:
            phase = "Pending"
            state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(
                reason=self.waiting or "ContainerCreating", message="Back-off pulling image"))
        else:
            phase = "Running"
            state = client.V1ContainerState(running=client.V1ContainerStateRunning())
        conditions = None
        if phase == "Pending" and self.unschedulable:
            conditions = [client.V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                                                message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")]
            state = None
        return client.V1Pod(
            metadata=client.V1ObjectMeta(name=name + "-pod", creation_timestamp=datetime(2024, 5, 1, tzinfo=UTC)),
            status=client.V1PodStatus(phase=phase, conditions=conditions, container_statuses=None if state is None
                                      else [client.V1ContainerStatus(name="train", state=state, image="i",
                                                                     image_id="", ready=False, restart_count=0)]))

    def list_namespaced_pod(self, namespace, label_selector):
        self.calls.append("list_pods")
        name = label_selector.removeprefix("job-name=")
        pod = self._pod(name)
        if self.pending_polls:
            self.pending_polls -= 1
        return client.V1PodList(items=[pod])

    def read_namespaced_pod(self, name, namespace):
        return self._pod(name.removesuffix("-pod"))

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content, _request_timeout):
        assert container == "train" and follow is True and _preload_content is False
        self.calls.append("read_log")
        self.log_reads += 1
        if self.silent:
            return LogResponse([], fail_with=urllib3.exceptions.ReadTimeoutError(None, "/log", "Read timed out."))
        self._run_training(name.removesuffix("-pod"))
        chunks = chunked(self.log_lines)
        if self.log_reads <= self.log_breaks:  # the connection drops half-way through
            return LogResponse(chunks[: len(chunks) // 2],
                               fail_with=urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead"))
        self.finished = True
        return LogResponse(chunks)

    def _run_training(self, job_name: str) -> None:
        """What the pod does: read its spec and staged inputs, write outputs back."""
        if self.pod_spec is not None:
            return
        spec = json.loads(self.config_maps[job_name].data["spec.json"])
        self.pod_spec = spec
        key = spec["inputs_uri"].removeprefix("s3://edgeloop/")
        with tarfile.open(fileobj=io.BytesIO(self.store.objects[key])) as tar:
            self.staged_members = tar.getnames()
        if self.upload and self.outcome == "succeeded":
            out = spec["outputs_uri"].removeprefix("s3://edgeloop/")
            self.store.objects[out + "train/weights/best.pt"] = b"best weights"
            if self.upload != "no-onnx":
                self.store.objects[out + "model.onnx"] = b"onnx bytes"
            self.store.objects[out + "engines/sm89-trt10.engine"] = b"engine bytes"
            self.store.objects[out + "result.json"] = json.dumps(RESULT).encode()


RESULT = {"best_pt": "/job/out/train/weights/best.pt", "onnx": "/job/out/model.onnx",
          "metrics": {"candidate": {"golden": {"map50": 0.8}}, "production": {"golden": {"map50": 0.7}}},
          "stages": {"train": 12.0}, "hyperparameters": {"epochs": 2}, "environment": {"torch": "2.14.1"},
          "engines": [{"target": "sm89-trt10", "status": "built", "path": "/job/out/engines/sm89-trt10.engine"},
                      {"target": "sm72-trt8", "status": "skipped", "path": None}]}
TRAINING_EVENTS = [
    {"event": "stage", "stage": "train", "status": "started"},
    {"event": "epoch", "epoch": 1, "epochs": 2, "losses": {"box": 1.5, "cls": 2.0}, "seconds": 30.0},
    {"event": "epoch", "epoch": 2, "epochs": 2, "losses": {"box": 1.2, "cls": 1.6}, "seconds": 61.0},
    {"event": "evaluated", "eval_set": "golden", "candidate": 0.8, "production": 0.7},
    {"event": "result", "result": RESULT},
]


@pytest.fixture
def spec(tmp_path: Path) -> dict:
    data = tmp_path / "data"
    for i in range(2):
        (data / "train" / "images").mkdir(parents=True, exist_ok=True)
        (data / "train" / "labels").mkdir(parents=True, exist_ok=True)
        (data / "train" / "images" / f"a{i}.jpg").write_bytes(b"jpeg")
        (data / "train" / "labels" / f"a{i}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (data / "data.yaml").write_text(yaml.safe_dump({"path": str(data), "train": str(data / "train" / "images"),
                                                    "val": str(data / "train" / "images"), "names": {0: "a"}}))
    weights = tmp_path / "production.pt"
    weights.write_bytes(b"weights")
    return {"base_weights": str(weights), "production_weights": str(weights), "data_yaml": str(data / "data.yaml"),
            "out_dir": str(tmp_path / "work" / "out"), "imgsz": 160, "finetune": {"epochs": 2},
            "eval_sets": {"golden": str(data / "data.yaml")}, "config_dir": str(tmp_path / "cfg")}


def make(tmp_path: Path, cluster: FakeCluster, store: FakeStore, **k8s):
    clock = Clock()
    executor = KubernetesJobExecutor(server_settings(tmp_path, **k8s), store, cluster, cluster, clock=clock,
                                     sleep=clock.sleep, suffix=lambda: "abc123")
    work = tmp_path / "jobs" / "000042"
    work.mkdir(parents=True)
    return executor, work, clock


def assert_torn_down(cluster: FakeCluster, store: FakeStore) -> None:
    assert cluster.deleted == [("edgeloop-train-000042-abc123", "Background")]
    assert cluster.calls[-1] == "delete_job"
    assert not [k for k in store.objects if k.startswith("k8s-jobs/")], "staged objects left behind"


# ---------------------------------------------------------------------- runs


def test_run_creates_the_job_streams_progress_fetches_outputs_and_tears_down(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=lines(*TRAINING_EVENTS))
    executor, work, _ = make(tmp_path, cluster, store)
    events: list[dict] = []

    result = executor.run(spec, work, events.append)

    # Progress arrives as the job runner's own events, in order, plus the executor's stages.
    assert [e["stage"] for e in events if e["event"] == "stage"] == [
        "stage-inputs", "scheduling", "train", "fetch-outputs"]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [(e["epoch"], e["epochs"], e["losses"]["box"], e["seconds"]) for e in epochs] == [
        (1, 2, 1.5, 30.0), (2, 2, 1.2, 61.0)]
    assert cluster.calls[:2] == ["create_job", "create_config_map"]
    # The ConfigMap is owned by the Job, so deleting the Job removes it too.
    cm = cluster.config_maps["edgeloop-train-000042-abc123"]
    assert cm.metadata.owner_references[0].uid == "job-uid-1"
    # The pod got a spec of pod paths and object-store URIs, and its inputs were in the tar.
    assert cluster.pod_spec["inputs_uri"] == "s3://edgeloop/k8s-jobs/edgeloop-train-000042-abc123/inputs.tar"
    assert cluster.pod_spec["outputs_uri"] == "s3://edgeloop/k8s-jobs/edgeloop-train-000042-abc123/out/"
    assert cluster.pod_spec["base_weights"] == "/job/in/weights/production.pt"
    assert "weights/production.pt" in cluster.staged_members
    assert sum(m.endswith(".jpg") for m in cluster.staged_members) == 2
    # The result points at local copies of the pod's outputs, as the runner expects.
    assert Path(result["best_pt"]).read_bytes() == b"best weights"
    assert Path(result["onnx"]).read_bytes() == b"onnx bytes"
    assert Path(result["best_pt"]).is_relative_to(work)
    assert result["metrics"] == RESULT["metrics"] and result["stages"] == {"train": 12.0}
    # Any other output the result names (engines) is fetched and re-pointed as well.
    assert Path(result["engines"][0]["path"]).read_bytes() == b"engine bytes"
    assert result["engines"][1] == {"target": "sm72-trt8", "status": "skipped", "path": None}
    assert "Ultralytics 8.4" in (work / "job.log").read_text()
    assert not (work / "inputs.tar").exists()
    assert_torn_down(cluster, store)


def test_a_broken_log_stream_is_reopened_without_repeating_events(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=lines(*TRAINING_EVENTS), log_breaks=2)
    executor, work, _ = make(tmp_path, cluster, store)
    events: list[dict] = []
    executor.run(spec, work, events.append)
    assert cluster.log_reads == 3
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert sum(e["event"] == "result" for e in events) == 1
    assert (work / "job.log").read_text().count('"event": "epoch"') == 2
    assert_torn_down(cluster, store)


def test_failed_training_reports_the_runners_error_and_tears_down(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, outcome="failed", exit_code=1, terminated_reason="Error", log_lines=lines(
        TRAINING_EVENTS[0], {"event": "error", "error": "RuntimeError: CUDA error: device-side assert"}))
    executor, work, _ = make(tmp_path, cluster, store)
    events: list[dict] = []
    with pytest.raises(JobFailed, match="CUDA error: device-side assert"):
        executor.run(spec, work, events.append)
    assert events[-1]["event"] == "error"
    assert_torn_down(cluster, store)


def test_killed_pod_reports_why_it_stopped(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, outcome="failed", exit_code=137, terminated_reason="OOMKilled",
                          log_lines=lines(TRAINING_EVENTS[0], TRAINING_EVENTS[1]))
    executor, work, _ = make(tmp_path, cluster, store)
    with pytest.raises(JobFailed) as info:
        executor.run(spec, work, lambda e: None)
    message = str(info.value)
    assert "BackoffLimitExceeded" in message and "OOMKilled, exit 137" in message
    assert '"epoch": 1' in message  # the log tail
    assert_torn_down(cluster, store)


def test_pod_that_never_gets_a_gpu_node_times_out_and_tears_down(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=[], pending_polls=None, unschedulable=True)
    executor, work, clock = make(tmp_path, cluster, store, pod_start_timeout_seconds=600)
    with pytest.raises(JobFailed, match="did not start within 600s: Unschedulable: .*Insufficient nvidia.com/gpu"):
        executor.run(spec, work, lambda e: None)
    assert 600 <= clock.now < 610
    assert "read_log" not in cluster.calls
    assert_torn_down(cluster, store)


def test_image_pull_back_off_fails_at_once(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=[], pending_polls=None, waiting="ImagePullBackOff")
    executor, work, clock = make(tmp_path, cluster, store)
    with pytest.raises(JobFailed, match="cannot start: ImagePullBackOff"):
        executor.run(spec, work, lambda e: None)
    assert clock.now == 0  # no waiting for the start timeout
    assert_torn_down(cluster, store)


def test_silent_training_past_the_deadline_times_out_and_tears_down(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=[], silent=True)
    executor, work, clock = make(tmp_path, cluster, store, pod_start_timeout_seconds=60)
    with pytest.raises(JobFailed, match="exceeded its 600s training timeout"):
        executor.run(spec, work, lambda e: None)
    assert clock.now >= 600 + 60
    assert cluster.log_reads > 1  # re-opened after each silent stretch, until the deadline
    assert_torn_down(cluster, store)


def test_refused_job_creation_fails_and_teardown_tolerates_a_missing_job(tmp_path, spec):
    store = FakeStore()
    refused = ApiException(status=403, reason="Forbidden")
    refused.body = json.dumps({"message": 'jobs.batch is forbidden: User "system:serviceaccount:edgeloop:x"'})
    cluster = FakeCluster(store, log_lines=[], create_error=refused)
    executor, work, _ = make(tmp_path, cluster, store)
    with pytest.raises(JobFailed, match="403 Forbidden: jobs.batch is forbidden"):
        executor.run(spec, work, lambda e: None)
    assert_torn_down(cluster, store)


def test_a_pod_that_does_not_upload_its_outputs_is_a_failure(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=lines(*TRAINING_EVENTS), upload=False)
    executor, work, _ = make(tmp_path, cluster, store)
    with pytest.raises(JobFailed, match="result.json is not in the object store .*printed a result"):
        executor.run(spec, work, lambda e: None)
    assert_torn_down(cluster, store)


def test_unstageable_inputs_fail_before_anything_is_created(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=[])
    executor, work, _ = make(tmp_path, cluster, store)
    Path(spec["base_weights"]).unlink()
    with pytest.raises(JobFailed, match="cannot stage the job's inputs"):
        executor.run(spec, work, lambda e: None)
    assert "create_job" not in cluster.calls and not store.uploaded


def test_api_server_blips_are_retried_not_fatal(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=lines(*TRAINING_EVENTS), flaky_reads=2)
    executor, work, _ = make(tmp_path, cluster, store)
    result = executor.run(spec, work, lambda e: None)
    assert cluster.calls.count("503") == 2
    assert Path(result["onnx"]).read_bytes() == b"onnx bytes"
    assert_torn_down(cluster, store)


def test_an_api_server_that_stays_down_fails_the_run_and_still_tears_down(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=lines(*TRAINING_EVENTS), flaky_reads=100)
    executor, work, _ = make(tmp_path, cluster, store)
    with pytest.raises(ApiException):
        executor.run(spec, work, lambda e: None)
    assert_torn_down(cluster, store)


def test_a_result_naming_an_output_that_was_not_uploaded_is_a_failure(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=lines(*TRAINING_EVENTS), upload="no-onnx")
    executor, work, _ = make(tmp_path, cluster, store)
    with pytest.raises(JobFailed, match="onnx .*was not uploaded"):
        executor.run(spec, work, lambda e: None)
    assert_torn_down(cluster, store)


# ---------------------------------------------------------------------- the job runner's real upload path


class FakeMinio:
    """The two Minio calls training.job_io makes, into the FakeStore's objects."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def fput_object(self, bucket, key, path):
        assert bucket == "edgeloop"
        self.store.objects[key] = Path(path).read_bytes()


class JobRunnerPod(FakeCluster):
    """A pod whose outputs go up through ``training.job_io.upload_outputs``, as the job runner's do:
    whatever that function leaves out never reaches the server."""

    def _run_training(self, job_name: str) -> None:
        from training.job_io import upload_outputs

        if self.pod_spec is not None:
            return
        spec = json.loads(self.config_maps[job_name].data["spec.json"])
        self.pod_spec = spec
        out = Path(spec["out_dir"])
        (out / "train" / "weights").mkdir(parents=True)
        (out / "engines").mkdir()
        (out / "train" / "weights" / "best.pt").write_bytes(b"best weights")
        (out / "model.onnx").write_bytes(b"fp32 onnx")
        (out / "model.int8.onnx").write_bytes(b"int8 onnx")
        (out / "engines" / "sm89-trt10.engine").write_bytes(b"engine bytes")
        result = {**RESULT, "best_pt": str(out / "train" / "weights" / "best.pt"), "onnx": str(out / "model.onnx"),
                  "int8_onnx": str(out / "model.int8.onnx"), "int8": {"calibration_images": 2},
                  "engines": [{"target": "sm89-trt10", "status": "built", "path": str(out / "engines" /
                                                                                     "sm89-trt10.engine")}]}
        (out / "result.json").write_text(json.dumps(result))
        self.uploaded_keys = upload_outputs(spec, result, client=FakeMinio(self.store))
        self.log_lines = lines(TRAINING_EVENTS[0], {"event": "result", "result": result})


def test_the_int8_model_comes_back_through_the_job_runners_upload(tmp_path, spec, monkeypatch):
    # The pod's scratch folder, on this machine: the job runner's real upload code runs against it.
    pod_out = tmp_path / "pod" / "job" / "out"
    monkeypatch.setattr(manifests, "OUT_DIR", str(pod_out))
    store = FakeStore()
    cluster = JobRunnerPod(store, log_lines=[])
    executor, work, _ = make(tmp_path, cluster, store)

    result = executor.run(spec, work, lambda e: None)

    prefix = "k8s-jobs/edgeloop-train-000042-abc123/out/"
    assert prefix + "model.int8.onnx" in cluster.uploaded_keys
    assert cluster.uploaded_keys[-1] == prefix + "result.json"
    int8 = Path(result["int8_onnx"])
    assert int8.is_relative_to(work) and int8.read_bytes() == b"int8 onnx"
    assert Path(result["onnx"]).read_bytes() == b"fp32 onnx"
    assert Path(result["engines"][0]["path"]).read_bytes() == b"engine bytes"
    assert_torn_down(cluster, store)


def test_a_result_naming_an_int8_model_that_was_not_uploaded_is_a_failure(tmp_path, spec, monkeypatch):
    from training import job_io

    monkeypatch.setattr(manifests, "OUT_DIR", str(tmp_path / "pod" / "job" / "out"))
    # The upload as it was before: weights, ONNX and engines only.
    monkeypatch.setattr(job_io, "OUTPUT_KEYS", ("best_pt", "onnx"))
    monkeypatch.setattr(job_io, "named_outputs", lambda result: [
        result["best_pt"], result["onnx"], *(e["path"] for e in result["engines"] if e.get("path"))])
    store = FakeStore()
    cluster = JobRunnerPod(store, log_lines=[])
    executor, work, _ = make(tmp_path, cluster, store)
    with pytest.raises(JobFailed, match="int8_onnx .*was not uploaded"):
        executor.run(spec, work, lambda e: None)
    assert_torn_down(cluster, store)


def test_a_run_a_dead_server_left_behind_is_deleted_on_resume(tmp_path, spec):
    store = FakeStore()
    cluster = FakeCluster(store, log_lines=lines(*TRAINING_EVENTS))
    executor, work, _ = make(tmp_path, cluster, store)
    events: list[dict] = []
    executor.run(spec, work, events.append)
    (started,) = [e for e in events if e["event"] == "started"]
    assert started["k8s_job"] == "edgeloop-train-000042-abc123"
    assert started["prefix"] == "k8s-jobs/edgeloop-train-000042-abc123/"
    # As if the server had died mid-run: the Job and its staged inputs are still there.
    cluster.jobs[started["k8s_job"]] = client.V1Job(metadata=client.V1ObjectMeta(name=started["k8s_job"]))
    store.objects[started["prefix"] + "inputs.tar"] = b"tar"
    cluster.deleted.clear()
    assert executor.abandon(started) is True
    assert_torn_down(cluster, store)
    assert executor.abandon({"k8s_job": "x", "prefix": "k8s-jobs/x/", "namespace": "elsewhere"}) is False
