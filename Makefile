# Two entry points (see README): `make demo` runs the main job, `make test` the suite.
# Everything installs into ./.venv; torch is the local CPU build (pip install torch==2.13.0).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fusion-node demo

# Real peers for the tests: DCMTK, dicom3tools (dciodvfy), Orthanc with its DICOMweb plugin,
# headless Chromium (the status page, tests/test_web.py); systemd-analyze checks
# deploy/fusion-node.service, sqlite3 the backup command of docs/deployment.md; the PostgreSQL
# server (tests/postgres_server.py starts a temporary cluster from /usr/lib/postgresql/<version>/bin).
# The server's binaries live under a version-numbered folder, so the path that stands for it is the
# one file of the version-independent `postgresql` metapackage that slim images keep (its copyright).
TEST_TOOLS := /usr/bin/storescu /usr/bin/dciodvfy /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
	/usr/bin/chromium /usr/bin/systemd-analyze /usr/bin/sqlite3 /usr/share/doc/postgresql/copyright
$(TEST_TOOLS):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
		dcmtk dicom3tools orthanc orthanc-dicomweb chromium systemd sqlite3 postgresql >/dev/null

# Static checks first (seconds), then the suite. pytest's exit code 5 (no tests ran) fails the run.
# `make test` (and CI) leaves out the tests marked `slow` (the fault-injection, lifecycle, hostile-corpus
# and full status-page runs: ~15 more minutes on 2 cores; their fast representatives stay in);
# `make test-all` runs everything.
test: $(STAMP) $(TEST_TOOLS) lint
	$(BIN)/fusion-node models fetch
	FUSION_REQUIRE_WEIGHTS=1 $(BIN)/python -m pytest -m "not slow"

test-all: $(STAMP) $(TEST_TOOLS) lint
	$(BIN)/fusion-node models fetch
	FUSION_REQUIRE_WEIGHTS=1 $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) demo-output
