"""Fixtures that start the real services: a Mosquitto broker and a SeaweedFS S3 gateway.

Nothing is mocked. A missing binary FAILS the test with the install hint (CI installs
them); it is never a skip.

- ``mqtt_broker`` (session): a started :class:`MosquittoBroker`; its server user is
  ``mqtt_broker.server_username`` / ``mqtt_broker.server_password``.
- ``device_credentials`` (function): factory ``make(device_id=None) -> (username, password)``
  adding a device user to the broker (removed again after the test).
- ``seaweedfs`` (session): a started :class:`SeaweedS3`.
- ``s3_store`` (session): an :class:`ObjectStore` on ``seaweedfs`` with its bucket created.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.stack import _proc
from server.stack.errors import ServiceError
from server.stack.mosquitto import MosquittoBroker
from server.stack.seaweedfs import SeaweedS3


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[MosquittoBroker]:
    from fleet_kit import running_broker

    with running_broker() as broker:
        yield broker


@pytest.fixture
def device_credentials(mqtt_broker: MosquittoBroker) -> Iterator[Callable[..., tuple[str, str]]]:
    created: list[str] = []

    def make(device_id: str | None = None) -> tuple[str, str]:
        username = device_id or f"dev-{uuid.uuid4().hex[:12]}"
        password = _proc.random_secret()
        mqtt_broker.add_user(username, password)
        created.append(username)
        return username, password

    yield make
    for username in created:
        mqtt_broker.remove_user(username)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        s3.start()
    except ServiceError as exc:
        pytest.fail(f"cannot start SeaweedFS S3: {exc}", pytrace=False)
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="session")
def s3_store(seaweedfs: SeaweedS3):
    store = seaweedfs.object_store("edgeloop-test")
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of our own on a free port; yields its SQLAlchemy URL."""
    from server.stack.postgres import PostgresServer

    workdir = Path(tempfile.mkdtemp(prefix="edgeloop-postgres-"))
    os.chmod(workdir, 0o755)
    server = PostgresServer(workdir / "pg")
    try:
        server.start()
    except ServiceError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Callable[[str], Path]:
    """Writes a minimal valid ONNX model (an Identity on a 1x3x32x32 input) and returns its path."""
    import onnx
    from onnx import TensorProto, helper

    def make(name: str = "model.onnx") -> Path:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["images"], ["output0"])], "tiny",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
            [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 32, 32])],
        )
        path = tmp_path / name
        onnx.save(helper.make_model(graph), path)
        return path

    return make


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The same test on SQLite and on a fresh database of the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgeloop.db'}"
    from fleet_kit import fresh_postgres_database

    return fresh_postgres_database(request.getfixturevalue("postgres"))
