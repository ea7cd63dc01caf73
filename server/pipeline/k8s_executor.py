"""Run a retrain's compute as a Kubernetes Job on a GPU node.

Same interface as :class:`server.pipeline.executor.LocalSubprocessExecutor`:
``run(spec, work_dir, on_event) -> result``, relaying the job runner's JSON-line events
(``stage``, ``epoch`` with losses, ``evaluated``, ``error``, ``result``) as they arrive.

One run:

1. stage the inputs the spec points at (weights, every dataset) into one tar in the object
   store, and rewrite the spec to the pod's paths (:mod:`server.pipeline.k8s_staging`);
2. create the Job, then the ConfigMap holding the spec, owned by the Job;
3. wait for its pod to start — failing at once on a pod that can never start (image pull
   back-off, missing Secret), and after ``pod_start_timeout_seconds`` on one that is still
   unschedulable (no GPU node came up);
4. follow the pod's log, parsing the job runner's lines like the local executor does; a log
   stream that breaks or stays silent is re-opened, skipping the lines already seen;
5. wait until the Job is Complete or Failed (or the deadline passes);
6. download ``result.json``, the best weights, the ONNX export and (when it passed its gate)
   the INT8 ONNX from the object store, and return the result with local paths, as the
   runner expects;
7. always, even on failure or timeout: delete the Job (propagation ``Background``: its pod
   and ConfigMap go with it) and the staged objects.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from server.objectstore import ObjectNotFoundError
from server.pipeline import k8s_manifests as manifests
from server.pipeline import k8s_staging as staging
from server.pipeline.executor import JobFailed, parse_event
from training.job_io import OUTPUT_KEYS

log = structlog.get_logger(__name__)

#: Waiting reasons after which a pod never starts on its own.
FATAL_WAITING = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                           "CreateContainerConfigError", "CreateContainerError"})
RESULT_MAX_BYTES = 16 * 1024 * 1024
_LOG_TAIL = 2000
_CONNECT_TIMEOUT = 10
_TRANSIENT = frozenset({429, 500, 502, 503, 504})
_API_ATTEMPTS = 5


class KubernetesJobExecutor:
    """Runs ``python -m training.job_runner SPEC`` as one Kubernetes Job per retrain."""

    def __init__(self, settings, store, batch_api, core_api, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, suffix: Callable[[], str] = lambda: secrets.token_hex(3)):
        self._k8s = settings.kubernetes
        manifests.check_settings(self._k8s)
        self._settings = settings
        self._store = store
        self._batch = batch_api
        self._core = core_api
        self._clock = clock
        self._sleep = sleep
        self._suffix = suffix
        self._timeout = settings.training.timeout_seconds

    @classmethod
    def from_settings(cls, settings, store) -> KubernetesJobExecutor:
        """Talk to the cluster as the server's service account (in a pod) or through a kubeconfig."""
        from kubernetes import config

        k8s = settings.kubernetes
        if k8s.kubeconfig is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config(context=k8s.context)
        else:
            config.load_kube_config(config_file=str(k8s.kubeconfig), context=k8s.context)
        api = client.ApiClient()
        return cls(settings, store, client.BatchV1Api(api), client.CoreV1Api(api))

    # ------------------------------------------------------------------ the run

    def run(self, spec: dict, work_dir: Path, on_event: Callable[[dict], None]) -> dict:
        job_id = work_dir.name
        name = manifests.job_name(job_id, self._suffix())
        prefix = f"k8s-jobs/{name}/"
        run = manifests.TrainingRun(
            name=name, job_id=job_id, s3_endpoint=self._k8s.s3_endpoint or self._settings.s3_endpoint,
            s3_bucket=self._settings.s3_bucket, s3_region=self._settings.s3_region,
            s3_secure=self._settings.s3_secure,
            # The Job's clock starts at creation, so it includes the wait for a GPU node.
            active_deadline_seconds=self._timeout + self._k8s.pod_start_timeout_seconds,
        )
        deadline = self._clock() + run.active_deadline_seconds + 120
        state = _RunState(log_path=work_dir / "job.log")
        logger = log.bind(job=job_id, k8s_job=name, namespace=self._k8s.namespace)
        try:
            on_event({"event": "stage", "stage": "stage-inputs", "status": "started"})
            pod_spec = self._stage_inputs(spec, work_dir, prefix)
            self._create(run, pod_spec)
            logger.info("k8s.job.created")
            # What a restarted server deletes if this server dies before its teardown (``abandon``).
            on_event({"event": "started", "executor": "kubernetes", "k8s_job": name, "prefix": prefix,
                      "namespace": self._k8s.namespace})
            on_event({"event": "stage", "stage": "scheduling", "status": "started"})
            pod = self._wait_for_pod(name, self._clock() + self._k8s.pod_start_timeout_seconds)
            logger.info("k8s.pod.started", pod=pod)
            self._follow_logs(name, pod, deadline, state, on_event)
            succeeded, why = self._wait_for_job(name, pod, deadline)
            if not succeeded:
                raise JobFailed(state.error or f"Kubernetes Job {name} failed: {why}; log tail:\n{state.tail()}")
            on_event({"event": "stage", "stage": "fetch-outputs", "status": "started"})
            return self._fetch_outputs(prefix, work_dir, state)
        finally:
            self._teardown(name, prefix, logger)

    def abandon(self, started: dict) -> bool:
        """Delete the Job and staged objects a ``started`` event named (a server that died left them)."""
        name, prefix = started.get("k8s_job"), started.get("prefix")
        if not name or not prefix or started.get("namespace", self._k8s.namespace) != self._k8s.namespace:
            return False
        self._teardown(name, prefix, log.bind(k8s_job=name, namespace=self._k8s.namespace, abandoned=True))
        return True

    # ------------------------------------------------------------------ steps

    def _read(self, fn, **kwargs):
        """A read the run must not die of when the API server blinks (restart, overload)."""
        for attempt in range(1, _API_ATTEMPTS + 1):
            try:
                return fn(namespace=self._k8s.namespace, **kwargs)
            except ApiException as exc:
                if exc.status not in _TRANSIENT or attempt == _API_ATTEMPTS:
                    raise
                why = f"{exc.status} {exc.reason}"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt == _API_ATTEMPTS:
                    raise
                why = type(exc).__name__
            log.warning("k8s.api.retry", call=getattr(fn, "__name__", "?"), attempt=attempt, reason=why)
            self._sleep(self._k8s.poll_seconds)

    def _stage_inputs(self, spec: dict, work_dir: Path, prefix: str) -> dict:
        try:
            pod_spec, plan = staging.plan_inputs(spec, inputs_dir=manifests.INPUTS_DIR, out_dir=manifests.OUT_DIR,
                                                 config_dir=manifests.CONFIG_DIR)
        except staging.StagingError as exc:
            raise JobFailed(f"cannot stage the job's inputs for Kubernetes: {exc}") from None
        archive = work_dir / "inputs.tar"
        try:
            staging.write_archive(plan, archive)
            self._store.put_file(prefix + "inputs.tar", archive, content_type="application/x-tar")
        finally:
            archive.unlink(missing_ok=True)
        bucket = self._settings.s3_bucket
        pod_spec["inputs_uri"] = f"s3://{bucket}/{prefix}inputs.tar"
        pod_spec["outputs_uri"] = f"s3://{bucket}/{prefix}out/"
        return pod_spec

    def _create(self, run: manifests.TrainingRun, pod_spec: dict) -> None:
        ns = self._k8s.namespace
        try:
            created = self._batch.create_namespaced_job(namespace=ns, body=manifests.render_job(run, self._k8s))
            self._core.create_namespaced_config_map(
                namespace=ns, body=manifests.render_spec_config_map(run, self._k8s, pod_spec, owner=created))
        except ApiException as exc:
            raise JobFailed(f"Kubernetes refused the training Job {run.name} in {ns}: "
                            f"{exc.status} {exc.reason}: {_api_message(exc)}") from None

    def _pods(self, name: str) -> list:
        pods = self._read(self._core.list_namespaced_pod, label_selector=f"job-name={name}")
        return sorted(pods.items or [], key=lambda p: p.metadata.creation_timestamp or 0)

    def _wait_for_pod(self, name: str, start_deadline: float) -> str:
        """The pod's name once it runs (or already ended)."""
        last = "no pod created yet"
        while True:
            job = self._read(self._batch.read_namespaced_job_status, name=name)
            finished = _job_outcome(job)
            pods = self._pods(name)
            if pods:
                pod = pods[-1]
                phase = pod.status.phase if pod.status else None
                if phase in {"Running", "Succeeded", "Failed"}:
                    return pod.metadata.name
                waiting = _waiting(pod)
                if waiting and waiting[0] in FATAL_WAITING:
                    raise JobFailed(f"training pod {pod.metadata.name} cannot start: {waiting[0]}: {waiting[1]}")
                last = _pending_reason(pod) or f"pod {pod.metadata.name} is {phase}"
            if finished is not None:  # e.g. the deadline passed while it was pending
                raise JobFailed(f"Kubernetes Job {name} ended before its pod ran: {finished[1]}")
            if self._clock() >= start_deadline:
                raise JobFailed(f"training pod did not start within {self._k8s.pod_start_timeout_seconds}s: {last}")
            self._sleep(self._k8s.poll_seconds)

    def _follow_logs(self, name: str, pod: str, deadline: float, state: _RunState,
                     on_event: Callable[[dict], None]) -> None:
        ns = self._k8s.namespace
        with state.log_path.open("w") as log_file:
            while True:
                seen = 0
                response = None
                try:
                    response = self._core.read_namespaced_pod_log(
                        name=pod, namespace=ns, container=manifests.CONTAINER, follow=True,
                        _preload_content=False, _request_timeout=(_CONNECT_TIMEOUT, self._k8s.log_idle_seconds))
                    for line in iter_resp_lines(response):
                        seen += 1
                        if seen <= state.lines:  # a re-opened stream starts from the beginning again
                            continue
                        state.lines += 1
                        log_file.write(line + "\n")
                        log_file.flush()
                        state.keep(line)
                        event = parse_event(line)
                        if event is None:
                            continue
                        if event.get("event") == "result":
                            state.result = event.get("result")
                        elif event.get("event") == "error":
                            state.error = event.get("error", "")
                        on_event(event)
                except ApiException as exc:
                    if exc.status not in {400, 404, 500, 502, 503, 504}:
                        raise JobFailed(f"cannot read the log of pod {pod}: {exc.status} {exc.reason}") from None
                    log.warning("k8s.log.unavailable", pod=pod, status=exc.status)
                except (urllib3.exceptions.HTTPError, OSError) as exc:  # read timeout, broken stream
                    log.info("k8s.log.reopen", pod=pod, reason=type(exc).__name__)
                finally:
                    if response is not None:
                        response.close()
                        response.release_conn()
                if self._pod_done(pod):
                    return
                if _job_outcome(self._read(self._batch.read_namespaced_job_status, name=name)) is not None:
                    return
                if self._clock() >= deadline:
                    raise JobFailed(f"Kubernetes Job {name} exceeded its {self._timeout}s training timeout")
                self._sleep(self._k8s.poll_seconds)

    def _pod_done(self, pod: str) -> bool:
        try:
            status = self._read(self._core.read_namespaced_pod, name=pod).status
        except ApiException as exc:
            if exc.status == 404:
                return True  # gone: the Job's outcome says how it ended
            raise
        return bool(status and status.phase in {"Succeeded", "Failed"})

    def _wait_for_job(self, name: str, pod: str, deadline: float) -> tuple[bool, str]:
        while True:
            job = self._read(self._batch.read_namespaced_job_status, name=name)
            outcome = _job_outcome(job)
            if outcome is not None:
                succeeded, why = outcome
                if not succeeded:
                    why = "; ".join(filter(None, [why, self._container_end(pod)]))
                return succeeded, why
            if self._clock() >= deadline:
                raise JobFailed(f"Kubernetes Job {name} exceeded its {self._timeout}s training timeout")
            self._sleep(self._k8s.poll_seconds)

    def _container_end(self, pod: str) -> str:
        """``OOMKilled, exit 137`` and the like: why the training container stopped."""
        try:
            status = self._read(self._core.read_namespaced_pod, name=pod).status
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            return ""
        for cs in (status.container_statuses or []) if status else []:
            if cs.name == manifests.CONTAINER and cs.state and cs.state.terminated:
                t = cs.state.terminated
                return f"container {t.reason or 'terminated'}, exit {t.exit_code}"
        return ""

    def _fetch_outputs(self, prefix: str, work_dir: Path, state: _RunState) -> dict:
        """Download what the pod uploaded and point the result's pod paths at the local copies."""
        out_prefix = prefix + "out/"
        try:
            result = json.loads(self._store.get_bytes(out_prefix + "result.json", max_bytes=RESULT_MAX_BYTES))
        except ObjectNotFoundError:
            streamed = "it printed a result" if state.result else "it printed no result"
            raise JobFailed(f"the training pod finished but {out_prefix}result.json is not in the object store "
                            f"({streamed}): the job runner must upload its outputs to the spec's outputs_uri"
                            ) from None
        out_dir = work_dir / "out"
        local: dict[str, str] = {}
        for info in self._store.list(out_prefix):
            member = info.key[len(out_prefix):]
            pod_path = f"{manifests.OUT_DIR}/{member}"
            try:
                staging.output_member(pod_path, manifests.OUT_DIR)  # refuses keys that climb out
            except staging.StagingError as exc:
                raise JobFailed(f"the training pod uploaded an unexpected object: {exc}") from None
            target = out_dir / member
            target.parent.mkdir(parents=True, exist_ok=True)
            self._store.download_file(info.key, target)
            local[pod_path] = str(target)
        for key in OUTPUT_KEYS:  # what the runner bundles and registers (INT8 only when it passed its gate)
            if key == "int8_onnx" and not result.get(key):
                continue
            if str(result.get(key)) not in local:
                raise JobFailed(f"the training pod's {key} ({result.get(key)!r}) was not uploaded to {out_prefix}")
        result = _localize(result, local)
        (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
        return result

    def _teardown(self, name: str, prefix: str, logger) -> None:
        try:
            self._batch.delete_namespaced_job(name=name, namespace=self._k8s.namespace,
                                              propagation_policy="Background")
            logger.info("k8s.job.deleted")
        except ApiException as exc:
            if exc.status != 404:  # never created, or already gone: nothing to tear down
                logger.warning("k8s.job.delete_failed", status=exc.status, reason=exc.reason)
        except Exception as exc:  # teardown must not hide the run's own error
            logger.warning("k8s.job.delete_failed", error=f"{type(exc).__name__}: {exc}")
        try:
            for info in self._store.list(prefix):
                self._store.delete(info.key)
        except Exception as exc:
            logger.warning("k8s.staging.cleanup_failed", prefix=prefix, error=f"{type(exc).__name__}: {exc}")


class _RunState:
    """What the log stream told us so far."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.lines = 0
        self.result: dict | None = None
        self.error = ""
        self._tail: list[str] = []

    def keep(self, line: str) -> None:
        self._tail.append(line)
        if len(self._tail) > 200:
            del self._tail[:100]

    def tail(self) -> str:
        return "\n".join(self._tail)[-_LOG_TAIL:]


def _localize(value, local: dict[str, str]):
    """``value`` with every pod output path (e.g. engine files) replaced by its downloaded copy."""
    if isinstance(value, str):
        return local.get(value, value)
    if isinstance(value, dict):
        return {k: _localize(v, local) for k, v in value.items()}
    if isinstance(value, list):
        return [_localize(v, local) for v in value]
    return value


def _job_outcome(job) -> tuple[bool, str] | None:
    """``(succeeded, why)`` once the Job is finished, else None."""
    status = job.status if job is not None else None
    if status is None:
        return None
    for cond in status.conditions or []:
        if cond.status != "True":
            continue
        if cond.type in {"Complete", "SuccessCriteriaMet"}:
            return True, cond.reason or "Complete"
        if cond.type in {"Failed", "FailureTarget"}:
            return False, ": ".join(filter(None, [cond.reason, cond.message])) or "Failed"
    if status.succeeded:
        return True, "Complete"
    if status.failed:
        return False, "pod failed"
    return None


def _waiting(pod) -> tuple[str, str] | None:
    statuses = (pod.status.init_container_statuses or []) + (pod.status.container_statuses or []) \
        if pod.status else []
    for cs in statuses:
        if cs.state and cs.state.waiting and cs.state.waiting.reason:
            return cs.state.waiting.reason, cs.state.waiting.message or ""
    return None


def _pending_reason(pod) -> str:
    for cond in (pod.status.conditions or []) if pod.status else []:
        if cond.type == "PodScheduled" and cond.status != "True":
            return ": ".join(filter(None, [cond.reason, cond.message]))
    waiting = _waiting(pod)
    return ": ".join(filter(None, waiting)) if waiting else ""


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message", "") if exc.body else ""
    except (TypeError, ValueError):
        return str(exc.body)[:300]
