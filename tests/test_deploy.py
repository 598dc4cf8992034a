"""deploy/: the files an installer copies are consistent with each other and with the node.

What this machine allows is run for real: the example production config through the node's
own loader, the systemd unit through ``systemd-analyze verify`` and ``security``, Orthanc
started on the compose file's orthanc.json and answering a C-ECHO to the node's destination
settings.  The images are built only where a docker daemon answers (not on the development
machine; docs/deployment.md says so).
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from dicom_node.config import DicomDestination, NodeSettings, parse_config

yaml = pytest.importorskip("yaml", reason="pyyaml is a dev dependency (pip install -e '.[dev]')")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _node_toml(name: str = "node.toml") -> dict:
    return tomllib.loads((DEPLOY / name).read_text())


def _settings(tmp_path: Path, name: str = "node.toml") -> NodeSettings:
    """deploy/<name> through the node's loader; the HTTP token file (a container secret) stands in tmp."""
    raw = _node_toml(name)
    http = raw.get("http")
    if http and http.get("token_file"):
        token = tmp_path / "http-token"
        token.write_text("0123456789abcdef0123456789abcdef\n")
        token.chmod(0o600)
        raw["http"] = {**http, "token_file": str(token)}
    return parse_config(raw, base_dir=DEPLOY, source=f"deploy/{name}")


def _container_path(volume: str) -> tuple[str, str]:
    """``src:dst[:mode]`` -> (src, dst)."""
    parts = volume.split(":")
    return parts[0], parts[1]


def _published(ports: list[str]) -> dict[int, str]:
    """``[host_ip:]host:container`` -> {container port: host binding}."""
    out = {}
    for p in ports:
        parts = str(p).split(":")
        out[int(parts[-1])] = ":".join(parts[:-1])
    return out


def _dockerfile_value(text: str, name: str) -> str:
    # ``ARG NAME=v``, ``ENV NAME=v`` or a continuation line of a multi-line ENV (``ARG NAME=``: empty)
    m = re.search(rf"^\s*(?:ARG\s+|ENV\s+)?{name}=(\S*)", text, flags=re.M)
    assert m, f"{name} not set in the Dockerfile"
    return m.group(1).strip('"')


def _pip_installs(lines: list[str]) -> list[str]:
    """The requirement each ``pip install`` line installs, in order (``torch==X``, ``.[extras]``)."""
    out = []
    for line in lines:
        if "pip install" not in line or "--upgrade pip" in line:
            continue
        args = [a.strip("'\"") for a in line.split("pip install", 1)[1].split() if not a.startswith("-")]
        args = [a for a in args if not a.startswith("${TORCH_INDEX_URL")]
        out.append(args[-1])
    return out


def test_example_production_config_validates(tmp_path):
    cfg = _settings(tmp_path)
    assert cfg.storage.root == Path("/var/lib/fusion-node/data")
    assert cfg.logging.format == "json"  # a container or journald reads it, not a person
    assert cfg.pipelines and all(p.destinations for p in cfg.pipelines)
    assert cfg.query_retrieve.move_destinations == ["pacs"]


def test_compose_matches_node_config(tmp_path):
    compose, cfg, raw = _compose(), _settings(tmp_path), _node_toml()
    node = compose["services"]["node"]
    # the config the command names is the file mounted there, read-only
    config_path = node["command"][node["command"].index("--config") + 1]
    mounts = dict(_container_path(v)[::-1] for v in node["volumes"])
    assert mounts[config_path] == "./node.toml" and any(v.endswith(f"{config_path}:ro") for v in node["volumes"])
    # the store (database, instances, heartbeat) lives on a named volume, not in the container
    assert str(cfg.storage.root) in mounts and not mounts[str(cfg.storage.root)].startswith(".")
    assert mounts[str(cfg.storage.root)] in compose["volumes"]
    # the weights volume is where the node looks (FUSION_CACHE_DIR), as in the image
    cache = node["environment"]["FUSION_CACHE_DIR"]
    assert cache in mounts and mounts[cache] in compose["volumes"]
    assert _dockerfile_value((DEPLOY / "Dockerfile").read_text(), "FUSION_CACHE_DIR") == cache
    # the DICOM port is published as configured
    published = _published(node["ports"])
    assert cfg.node.port in published and published[cfg.node.port].endswith(str(cfg.node.port))
    # the HTTP side: bound to all interfaces inside the container, published on the host's loopback only,
    # protected by the token mounted as a compose secret; the health check asks that port
    http = raw["http"]
    assert http["host"] == "0.0.0.0" and published[http["port"]].startswith("127.0.0.1:")
    secret = next(s for s in node["secrets"] if s["source"] == "http-token")
    assert http["token_file"] == f"/run/secrets/{secret['target']}"
    assert "http-token" in compose["secrets"]
    check = " ".join(node["healthcheck"]["test"])
    assert f"127.0.0.1:{http['port']}/healthz" in check and http["token_file"] in check
    compile(node["healthcheck"]["test"][-1], "healthcheck", "exec")  # the python -c program is valid Python
    # what the image runs is what compose runs
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert json.loads(re.search(r"^CMD (.+)$", dockerfile, flags=re.M).group(1)) == node["command"]
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, flags=re.M) for p in line.split()}
    assert {cfg.node.port, cfg.node.tls.port, http["port"]} <= exposed
    # every file compose refers to exists (secrets are made on site: their folder explains them)
    build = node["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in compose["services"].values():
        for v in service.get("volumes", []):
            src = _container_path(v)[0]
            if src.startswith("."):
                assert (DEPLOY / src).is_file(), f"compose mounts {src}, which is not in deploy/"
    assert (DEPLOY / Path(compose["secrets"]["http-token"]["file"]).parent / "README.md").is_file()


def test_compose_pacs_is_the_nodes_destination(tmp_path):
    compose, cfg = _compose(), _settings(tmp_path)
    orthanc_cfg = json.loads((DEPLOY / "orthanc.json").read_text())
    pacs = cfg.destination("pacs")
    assert isinstance(pacs, DicomDestination)
    orthanc = compose["services"][pacs.host]  # the destination host is the compose service's name
    assert "orthanc" in orthanc["image"]
    assert pacs.ae_title == orthanc_cfg["DicomAet"] and pacs.port == orthanc_cfg["DicomPort"]
    assert pacs.port in _published(orthanc["ports"])
    assert orthanc_cfg["HttpPort"] in _published(orthanc["ports"])
    assert _published(orthanc["ports"])[orthanc_cfg["HttpPort"]].startswith("127.0.0.1:")
    mounts = dict(_container_path(v)[::-1] for v in orthanc["volumes"])
    assert mounts["/etc/orthanc/orthanc.json"] == "./orthanc.json"
    assert mounts[orthanc_cfg["StorageDirectory"]] in compose["volumes"]
    # Orthanc knows the node (for C-MOVE / sending back): AE title, service name, DICOM port
    assert [cfg.node.ae_title, "node", cfg.node.port] in orthanc_cfg["DicomModalities"].values()
    assert orthanc_cfg["AuthenticationEnabled"] is True


def test_prometheus_scrapes_the_nodes_metrics(tmp_path):
    compose, raw = _compose(), _node_toml()
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]  # optional
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "fusion-node"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"node:{raw['http']['port']}"]
    target = next(s["target"] for s in prom["secrets"] if s["source"] == "http-token")
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{target}" == raw["http"]["token_file"]


@pytest.mark.parametrize("dockerfile, extras_needed", [("Dockerfile", set()), ("Dockerfile.cuda", {"gpu"})])
def test_image_installs_as_the_makefile_does(dockerfile, extras_needed):
    """torch pinned to the Makefile's version and installed first, then the package (not editable)."""
    text = (DEPLOY / dockerfile).read_text()
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0].splitlines()
    make_steps = _pip_installs(recipe)
    assert make_steps[0].startswith("torch==") and make_steps[1].startswith(".[")
    image_steps = [s.replace("${TORCH_VERSION}", _dockerfile_value(text, "TORCH_VERSION"))
                   for s in _pip_installs(text.splitlines())]
    assert image_steps[0] == make_steps[0], "the image's torch is not the Makefile's"
    # ".${EXTRAS:+[${EXTRAS}]}": "." when the build arg is empty (pip refuses ".[]")
    assert image_steps[1] in (".", ".[${EXTRAS}]", ".${EXTRAS:+[${EXTRAS}]}") and len(image_steps) == 2
    readme = (REPO / "README.md").read_text()
    assert f"pip install {make_steps[0]}" in readme
    # the Python the project supports
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11" in requires and "3.11" in text
    # the extras it names exist (the HTTP side's packages are base dependencies: no extra)
    extras = set(_dockerfile_value(text, "EXTRAS").split(",")) - {""} if image_steps[1] != "." else set()
    assert extras_needed <= extras
    defined = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    missing = extras - defined
    assert not missing, f"{dockerfile} installs extras {sorted(missing)} that pyproject.toml does not define"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "fusion-node.service").read_text())
    return parser


def test_systemd_unit_is_hardened_and_matches_the_config(tmp_path):
    unit = _unit()["Service"]
    assert unit["User"] not in ("", "root") and unit["User"] == unit["Group"]
    sysusers = (DEPLOY / "fusion-node.sysusers").read_text()
    assert re.search(rf"^u {re.escape(unit['User'])} ", sysusers, flags=re.M), "the service user is not declared"
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
                 "PrivateDevices": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                 "RestrictSUIDSGID": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                 "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes"}
    for key, value in hardening.items():
        assert unit.get(key) == value, f"{key}={unit.get(key)!r}, expected {value!r}"
    # it may write only where the node keeps its state (the store of the production config) and logs
    cfg = _settings(tmp_path)
    writable = [Path(p) for p in unit["ReadWritePaths"].split()]
    assert any(cfg.storage.root.is_relative_to(p) for p in writable)
    assert Path("/var/lib") / unit["StateDirectory"] in writable
    assert unit["ExecStart"].endswith("serve --config /etc/fusion-node/node.toml")
    assert "FUSION_CACHE_DIR=/var/lib/fusion-node/weights" in (DEPLOY / "fusion-node.service").read_text()


def _unit_with_local_binary(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's fusion-node, so verify can check it exists."""
    exe = Path(sys.executable).with_name("fusion-node")
    if not exe.exists():
        exe = tmp_path / "fusion-node"
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    text = (DEPLOY / "fusion-node.service").read_text().replace("/opt/fusion-node/venv/bin/fusion-node", str(exe))
    path = tmp_path / "fusion-node.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    unit = _unit_with_local_binary(tmp_path)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify reports unknown keys and bad values as warnings with exit 0: any line about the unit fails
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if "fusion-node.service" in line]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert m, security.stdout + security.stderr
    assert float(m.group(1)) <= 2.0, f"exposure {m.group(1)} (0 = fully locked down, 10 = unprotected)"


def test_compose_orthanc_config_runs_and_answers_the_nodes_echo(tmp_path):
    """The real Orthanc on deploy/orthanc.json (ports and storage moved to free ones here) accepts the
    node's association to the destination named in deploy/node.toml."""
    from dicom_helpers import free_port
    from peers import ORTHANC
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom generates them

    if not Path(ORTHANC).exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc; `make test` does it)")
    cfg = json.loads((DEPLOY / "orthanc.json").read_text())
    dicom_port, http_port = free_port(), free_port()
    cfg.update(StorageDirectory=str(tmp_path / "db"), IndexDirectory=str(tmp_path / "db"), DicomPort=dicom_port,
               HttpPort=http_port, RemoteAccessAllowed=False)
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    settings = _settings(tmp_path)
    pacs = settings.destination("pacs")
    with open(tmp_path / "orthanc.log", "w") as log:
        proc = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        ae = AE(ae_title=settings.node.ae_title)
        ae.add_requested_context(Verification)
        deadline, assoc = time.monotonic() + 30, None
        while time.monotonic() < deadline and proc.poll() is None:
            assoc = ae.associate("127.0.0.1", dicom_port, ae_title=pacs.ae_title)
            if assoc.is_established:
                break
            time.sleep(0.3)
        assert assoc is not None and assoc.is_established, (tmp_path / "orthanc.log").read_text()[-2000:]
        status = assoc.send_c_echo()
        assoc.release()
        assert status.Status == 0x0000
        # a wrong called AE title is refused: DicomCheckCalledAet is on
        wrong = ae.associate("127.0.0.1", dicom_port, ae_title="NOT_ORTHANC")
        assert not wrong.is_established
    finally:
        proc.terminate()
        proc.wait(10)


def _docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_daemon(), reason="no docker daemon answers here (docker info); see docs/deployment.md")
def test_cpu_image_builds_and_runs():
    tag = "fusion-node:test"
    subprocess.run(["docker", "build", "-f", "deploy/Dockerfile", "-t", tag, "."], cwd=REPO, check=True, timeout=3600)
    out = subprocess.run(["docker", "run", "--rm", tag, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("fusion-node ")


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 shell is not installed (Debian sqlite3)")
def test_database_backup_while_the_node_writes(tmp_path):
    """docs/deployment.md's backup command on a database a writer is busy with: a consistent copy, and
    the restored copy opens with every job committed before the backup began."""
    import threading

    from dicom_node.workflow.jobs import JobQueue

    db_path = tmp_path / "data" / "node.sqlite"
    queue = JobQueue(db_path)
    queue.ensure_schema()
    for n in range(200):
        queue.enqueue(f"before-{n}", "mr-ct", "1.2.3", "1.2.4")
    stop = threading.Event()

    def writer() -> None:
        q, n = JobQueue(db_path), 0
        while not stop.is_set():
            q.enqueue(f"during-{n}", "mr-ct", "1.2.3", "1.2.4")
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        backup = tmp_path / "backup.sqlite"
        done = subprocess.run(["sqlite3", str(db_path), f".backup '{backup}'"], capture_output=True, text=True,
                              timeout=120)
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr
    check = subprocess.run(["sqlite3", str(backup), "PRAGMA integrity_check"], capture_output=True, text=True)
    assert check.stdout.strip() == "ok"
    restored = JobQueue(backup)
    keys = {j.key for j in restored.list()}
    assert {f"before-{n}" for n in range(200)} <= keys
    assert len(queue.list()) >= len(keys)  # the live database went on; the copy is a moment of it


# -- the scale-out stack: deploy/docker-compose.scale.yml (docs/scale-out.md) ---------------------------

SCALE = "docker-compose.scale.yml"
SCALE_CONFIG = "node-scale.toml"
NODES = ("node-1", "node-2")
CPU_WORKERS = ("worker-1", "worker-2")
WORKERS = (*CPU_WORKERS, "worker-gpu")
#: what deploy/node-scale.toml may change against deploy/node.toml, and nothing else
SCALE_KEYS = {("workers",), ("storage", "database_url"), ("executor",)}


def _scale() -> dict:
    return yaml.safe_load((DEPLOY / SCALE).read_text())


def _mounts(service: dict) -> dict[str, str]:
    """{container path: source} of a service's volumes."""
    return dict(_container_path(v)[::-1] for v in service.get("volumes", []))


def _networks(service: dict) -> set[str]:
    nets = service.get("networks", ["default"])
    return set(nets) if isinstance(nets, list) else set(nets)


def _extras(service: dict) -> set[str]:
    return set(str(service["build"].get("args", {}).get("EXTRAS", "")).split(",")) - {""}


def _pyproject_extras() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {}))


def _without(raw: dict, keys: set[tuple[str, ...]]) -> dict:
    out = json.loads(json.dumps(raw))  # a deep copy of plain TOML data
    for key in keys:
        parent = out
        for part in key[:-1]:
            parent = parent.get(part, {})
        parent.pop(key[-1], None)
    return out


def _loader_knows_the_scale_keys() -> bool:
    from dicom_node.config import StorageConfig

    return "database_url" in StorageConfig.model_fields and "executor" in NodeSettings.model_fields


def test_scale_compose_has_every_service():
    services = _scale()["services"]
    assert {"postgres", "scheduler", *WORKERS, *NODES, "orthanc", "prometheus"} <= set(services)
    # started by a plain `up`: the database, the scheduler, the CPU workers, the nodes and the PACS
    optional = {name: svc["profiles"] for name, svc in services.items() if "profiles" in svc}
    assert optional == {"worker-gpu": ["gpu"], "prometheus": ["monitoring"]}
    assert _scale()["name"] != _compose()["name"]  # its own project: volumes never mixed with the single node's


def test_scale_config_is_the_single_node_config_plus_the_scale_keys():
    """node-scale.toml may differ from node.toml only where scale-out needs it (no drift in pipelines,
    destinations, access rules ...), and its database and scheduler are the compose services."""
    from urllib.parse import urlsplit

    raw, single, services = _node_toml(SCALE_CONFIG), _node_toml(), _scale()["services"]
    assert _without(raw, SCALE_KEYS) == _without(single, SCALE_KEYS)
    url = urlsplit(raw["storage"]["database_url"])
    assert url.scheme == "postgresql+psycopg"  # SQLAlchemy with psycopg 3
    pg = services[url.hostname]
    assert pg["image"].startswith("postgres:")
    assert url.port == 5432  # the image's port (not changed in its command)
    assert url.username == pg["environment"]["POSTGRES_USER"] and url.path == "/" + pg["environment"]["POSTGRES_DB"]
    assert url.password is None  # no secret in the config file; trust on the internal network (below)
    assert raw["executor"] == {"kind": "dask", "scheduler": "tcp://scheduler:8786"}
    sched = urlsplit(raw["executor"]["scheduler"])
    command = services[sched.hostname]["command"]
    assert services[sched.hostname]["entrypoint"] == ["dask"] and command[0] == "scheduler"
    assert command[command.index("--port") + 1] == str(sched.port)
    for name in WORKERS:  # every worker is `fusion-node worker` on this same configuration (the scheduler
        worker = services[name]  # the nodes submit to, one task at a time: cli.worker_command)
        assert "entrypoint" not in worker, name  # the image's: fusion-node
        assert worker["command"][:3] == ["worker", "--config", "/etc/fusion-node/node.toml"], name
        assert _mounts(worker)["/etc/fusion-node/node.toml"] == f"./{SCALE_CONFIG}", name
    assert raw["workers"] * len(NODES) >= len(WORKERS)  # the nodes keep every worker busy


@pytest.mark.xfail(not _loader_knows_the_scale_keys(), strict=False,
                   reason="the node's loader does not know [storage] database_url and [executor] yet "
                          "(the PostgreSQL and Dask branches add them)")
def test_scale_config_validates_with_the_nodes_loader(tmp_path):
    cfg, raw = _settings(tmp_path, SCALE_CONFIG), _node_toml(SCALE_CONFIG)
    assert cfg.storage.database_url == raw["storage"]["database_url"]  # kept through the loader
    assert cfg.executor.kind == "dask" and cfg.executor.scheduler == "tcp://scheduler:8786"
    assert cfg.storage.root == Path("/var/lib/fusion-node/data") == _settings(tmp_path).storage.root
    assert cfg.workers == raw["workers"]


def test_scale_store_and_weights_are_one_volume_at_one_path_everywhere(tmp_path):
    """Workers open the series where the nodes stored them: the same volume at the same path."""
    compose, root = _scale(), str(_settings(tmp_path).storage.root)
    services = compose["services"]
    weights = services["node-1"]["environment"]["FUSION_CACHE_DIR"]
    stores, caches = set(), set()
    for name in (*NODES, *WORKERS):
        svc = services[name]
        mounts = _mounts(svc)
        assert root in mounts, f"{name} does not mount the store at {root}"
        assert weights in mounts and svc["environment"]["FUSION_CACHE_DIR"] == weights, name
        stores.add(mounts[root])
        caches.add(mounts[weights])
    assert len(stores) == 1 and len(caches) == 1, (stores, caches)
    (store,), (cache,) = stores, caches
    assert store in compose["volumes"] and cache in compose["volumes"] and store != cache
    for name in WORKERS:  # workers read the weights; only a node fetches them (`run --rm node-1 models fetch`)
        assert f"{cache}:{weights}:ro" in services[name]["volumes"], name
    # the database keeps its own volume, which no node or worker mounts
    assert "postgres-data" in _mounts(services["postgres"]).values()
    assert all("postgres-data" not in _mounts(services[n]).values() for n in (*NODES, *WORKERS))


def test_scale_nodes_run_as_the_single_node_does(tmp_path):
    services, single = _scale()["services"], _compose()["services"]["node"]
    cfg = _settings(tmp_path, "node.toml")
    host_ports = []
    for name in NODES:
        node = services[name]
        for key in ("command", "healthcheck", "secrets", "read_only", "tmpfs", "cap_drop", "security_opt",
                    "stop_grace_period", "logging"):
            assert node[key] == single[key], f"{name}: {key} differs from the single node's"
        config_path = node["command"][node["command"].index("--config") + 1]
        assert f"./{SCALE_CONFIG}:{config_path}:ro" in node["volumes"]
        published = _published(node["ports"])
        assert cfg.node.port in published and published[8080].startswith("127.0.0.1:")
        host_ports += [published[cfg.node.port].split(":")[-1], published[8080].split(":")[-1]]
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert len(host_ports) == len(set(host_ports)), "two nodes publish the same host port"
    # the lease owner is host name + store (workflow/jobs.node_identity): fixed and different per node,
    # or a re-created container (a new random host name) could not take its own jobs back at once
    assert sorted(services[n].get("hostname", "") for n in NODES) == sorted(NODES)
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"


def test_scale_dask_processes_run_one_image(tmp_path):
    """Dask needs the same Python, dask, distributed and package on the client (the nodes) and every
    worker: the nodes, the scheduler and the CPU workers are one image with the dask and postgres extras."""
    services = _scale()["services"]
    one = [services[n] for n in ("scheduler", *CPU_WORKERS, *NODES)]
    assert len({s["image"] for s in one}) == 1 and all(s["build"] == one[0]["build"] for s in one)
    build = one[0]["build"]
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).read_text()
    assert "ARG EXTRAS=" in dockerfile and {"dask", "postgres"} <= _extras(one[0])
    gpu = services["worker-gpu"]
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.cuda" and {"gpu", "dask"} <= _extras(gpu)
    assert "ARG EXTRAS=" in (DEPLOY / "Dockerfile.cuda").read_text()
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["FUSION_DEVICE"] == "auto"
    assert all(services[n]["environment"]["FUSION_DEVICE"] == "cpu" for n in CPU_WORKERS)


@pytest.mark.xfail(not {"dask", "postgres"} <= _pyproject_extras(), strict=False,
                   reason="pyproject.toml does not define the dask and postgres extras yet (the Dask and "
                          "PostgreSQL branches add them)")
def test_scale_images_install_extras_the_package_defines():
    services = _scale()["services"]
    for name in ("node-1", "worker-gpu"):
        missing = _extras(services[name]) - _pyproject_extras()
        assert not missing, f"{name} installs extras {sorted(missing)} that pyproject.toml does not define"


def test_scale_database_and_scheduler_are_reachable_only_inside(tmp_path):
    """PostgreSQL trusts, and a Dask scheduler runs what it is sent: both only on an internal network."""
    compose = _scale()
    services, networks = compose["services"], compose["networks"]
    assert networks["backend"]["internal"] is True and not networks["frontend"].get("internal")
    for name in ("postgres", "scheduler", *WORKERS):
        assert _networks(services[name]) == {"backend"} and "ports" not in services[name], name
    assert services["postgres"]["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    for name in NODES:
        assert _networks(services[name]) == {"backend", "frontend"}, name
    # the PACS: the nodes' destination is the orthanc service, on the nodes' outer network
    cfg, orthanc_cfg = _settings(tmp_path, "node.toml"), json.loads((DEPLOY / "orthanc.json").read_text())
    pacs = cfg.destination("pacs")
    assert _networks(services[pacs.host]) == {"frontend"}
    assert _mounts(services[pacs.host])["/etc/orthanc/orthanc.json"] == "./orthanc.json"
    # orthanc.json's entry for the node names host "node": one node answers to that name there
    (node_entry,) = [m for m in orthanc_cfg["DicomModalities"].values() if m[0] == cfg.node.ae_title]
    answering = [n for n in NODES if isinstance(services[n]["networks"], dict)
                 and node_entry[1] in (services[n]["networks"].get("frontend") or {}).get("aliases", [])]
    assert len(answering) == 1 and node_entry[2] == cfg.node.port


def test_scale_prometheus_scrapes_every_node_and_files_exist():
    compose, raw = _scale(), _node_toml(SCALE_CONFIG)
    prom = compose["services"]["prometheus"]
    mounts = _mounts(prom)
    scrape = yaml.safe_load((DEPLOY / Path(mounts["/etc/prometheus/prometheus.yml"])).read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "fusion-node"]
    assert job["static_configs"][0]["targets"] == [f"{n}:{raw['http']['port']}" for n in NODES]
    target = next(s["target"] for s in prom["secrets"] if s["source"] == "http-token")
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{target}" == raw["http"]["token_file"]
    assert set(prom["depends_on"]) == set(NODES)
    for name, service in compose["services"].items():
        for v in service.get("volumes", []):
            src = _container_path(v)[0]
            if src.startswith("."):
                assert (DEPLOY / src).is_file(), f"{name} mounts {src}, which is not in deploy/"
            else:
                assert src in compose["volumes"], f"{name} mounts volume {src}, which is not declared"
    assert compose["secrets"] == _compose()["secrets"]  # the same token file as the single node


def _docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _docker_compose(), reason="the docker compose plugin is not installed here "
                                                  "(`docker compose version` fails); the files are checked statically")
@pytest.mark.parametrize("compose_file", ["docker-compose.yml", SCALE])
def test_docker_compose_accepts_the_file(tmp_path, compose_file):
    """``docker compose config`` (no daemon needed) on a copy of deploy/ with a made-up token file."""
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy)
    (deploy / "secrets" / "http-token").write_text("0123456789abcdef0123456789abcdef\n")
    done = subprocess.run(["docker", "compose", "-f", str(deploy / compose_file), "--profile", "gpu",
                           "--profile", "monitoring", "config", "--quiet"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_scale_dask_command_lines_make_a_cluster(tmp_path):
    """The scheduler's and workers' command lines of the compose file, run as they are by the installed
    ``dask`` and ``fusion-node`` (only the scheduler's address and the store moved to loopback and tmp):
    the workers join with their names, one thread each, the GPU worker with its resource, the fusion
    task module preloaded, and a task runs."""
    distributed = pytest.importorskip("distributed", reason="dask distributed is not installed (the dask extra)")
    from dicom_helpers import free_port

    bin_dir = Path(sys.executable).parent
    dask_cli, node_cli = bin_dir / "dask", bin_dir / "fusion-node"
    if not dask_cli.exists() or not node_cli.exists():
        pytest.skip(f"no dask or fusion-node command beside {sys.executable} (the dask extra)")
    services = _scale()["services"]
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # the compose configuration with the scheduler on loopback and the store in tmp (with the
    # instances/ folder a node makes, which `fusion-node worker` checks for)
    raw, token = _node_toml(SCALE_CONFIG), tmp_path / "http-token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    text = (DEPLOY / SCALE_CONFIG).read_text()
    for key, value in [("root", raw["storage"]["root"]), ("scheduler", raw["executor"]["scheduler"]),
                       ("token_file", raw["http"]["token_file"])]:
        assert text.count(f'{key} = "{value}"') == 1, key
    text = (text.replace(f'root = "{raw["storage"]["root"]}"', f'root = "{tmp_path / "store"}"')
            .replace(f'scheduler = "{raw["executor"]["scheduler"]}"', f'scheduler = "{address}"')
            .replace(f'token_file = "{raw["http"]["token_file"]}"', f'token_file = "{token}"'))
    (tmp_path / "store" / "instances").mkdir(parents=True)
    config = tmp_path / "node.toml"
    config.write_text(text)
    sched_cmd = [str(dask_cli), *services["scheduler"]["command"], "--host", "127.0.0.1"]
    sched_cmd[sched_cmd.index("--port") + 1] = str(port)
    procs = []
    logs = []
    try:
        for name, cmd in [("scheduler", sched_cmd)] + [
                (w, [str(node_cli), *[str(config) if a == "/etc/fusion-node/node.toml" else a
                                      for a in services[w]["command"]]]) for w in WORKERS]:
            log = open(tmp_path / f"{name}.log", "w")
            logs.append(log)
            (tmp_path / name).mkdir()
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path / name))
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(len(WORKERS), timeout=180)
            workers = client.scheduler_info(n_workers=-1)["workers"]  # {address: info}
            by_name = {w["name"]: (addr, w) for addr, w in workers.items()}
            assert set(by_name) == {"cpu-1", "cpu-2", "gpu-1"}
            assert all(w["nthreads"] == 1 for w in workers.values())  # one job at a time per worker
            assert by_name["gpu-1"][1]["resources"] == {"GPU": 1} and not by_name["cpu-1"][1]["resources"]
            # the fusion task module is loaded in every worker (the preload), with torch's threads intact
            loaded = client.run(lambda: "dicom_node.workflow.remote" in sys.modules)
            assert set(loaded.values()) == {True}, loaded
            # a task pinned to the GPU resource lands on the GPU worker
            task = client.submit(lambda: 6 * 7, resources={"GPU": 1}, pure=False)
            assert task.result(timeout=60) == 42
            assert client.who_has(task)[task.key] == (by_name["gpu-1"][0],)
    except Exception:
        for log in logs:
            log.flush()
        print("\n".join((tmp_path / f"{n}.log").read_text()[-1500:] for n in ("scheduler", *WORKERS)
                        if (tmp_path / f"{n}.log").exists()))
        raise
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
