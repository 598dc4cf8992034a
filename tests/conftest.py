"""Shared fixtures: where ../shared lives, GPU detection, weight availability, a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusion import environment

REPO = Path(__file__).resolve().parents[1]
SHARED = environment.shared_dir()
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set FUSION_SHARED_DIR to the shared folder)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(REFERENCE, "reference material")


@pytest.fixture(scope="session")
def harvard_dir() -> Path:
    return _require(DATA / "harvard", "Harvard fusion pairs")


@pytest.fixture(scope="session")
def cirs_dir() -> Path:
    return _require(DATA / "cirs057a", "CIRS phantom DICOM pair")


def pytest_collection_modifyitems(config, items):
    from fusion.backend import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (pip install .[gpu])")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vgg_weights():
    """Path of the provisioned VGG16 weights.

    Skips when they are absent, except when FUSION_REQUIRE_WEIGHTS=1 (set by
    .ci/run after `fusion-node models fetch`), where absence is a failure.
    """
    from fusion.weights import WeightsUnavailableError, vgg16_weights_path

    try:
        return vgg16_weights_path()
    except WeightsUnavailableError as exc:
        if environment.flag("FUSION_REQUIRE_WEIGHTS"):
            pytest.fail(f"VGG16 weights required but missing: {exc}")
        pytest.skip(f"VGG16 weights not provisioned: {exc}")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL for the session: a temporary cluster on a loopback port (tests/postgres_server.py).

    Skips, saying why, where the Debian ``postgresql`` server or psycopg is not installed
    (``make test`` installs the server; psycopg comes with the package's PostgreSQL extra).
    """
    from postgres_server import PostgresServer, PostgresUnavailable

    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed in this venv")
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server here: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server, one per test: its SQLAlchemy URL."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(params=["sqlite", "postgresql"])
def db_location(request, tmp_path):
    """A fresh node database on each engine: the SQLite file (the default) and a real PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "node.sqlite"
    return request.getfixturevalue("postgres_url")
