"""A real PostgreSQL server under a Dagster instance configured by deploy/dagster/*.yaml.

Finds Debian's PostgreSQL server binaries (/usr/lib/postgresql/*/bin) or installs them with
apt-get (as root), starts a throwaway cluster on a free loopback port in a temporary folder (as
an unprivileged user when the tests run as root: postgres refuses to run as root), points the
shipped instance configuration at it, materializes the demo asset graph, reads the event log
back (through Dagster and straight from the tables), and stops the cluster in a `finally`.

Skips, saying why, only where no PostgreSQL server can be found or installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from deploy_support import apt_install

ROOT = Path(__file__).resolve().parents[1]
DAGSTER_CONFIGS = ROOT / "deploy" / "dagster"
# The stages every deployment must show (issue 5's graph).
DEMO_GRAPH_ASSETS = (
    "dataset_manifest", "class_descriptions", "cde_classifier", "dino_features", "cde_pseudo_labels",
    "alignment_checkpoint", "prompt_tuned_encoder", "predictions", "evaluation",
)


# --------------------------------------------------------------------------------------------
# Finding or installing the server


def _pg_bin_dirs() -> list[Path]:
    found = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            found.append(candidate)
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    initdb = shutil.which("initdb")
    if not found and initdb and shutil.which("pg_ctl"):
        found.append(Path(initdb).resolve().parent)
    return found


def find_or_install_postgres() -> Path:
    dirs = _pg_bin_dirs()
    if dirs:
        return dirs[0]
    problem = apt_install("postgresql")
    dirs = _pg_bin_dirs()
    if dirs:
        return dirs[0]
    pytest.skip(
        "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb, pg_ctl) "
        f"and could not be installed: {problem or 'installed, but initdb is still missing'}"
    )


# --------------------------------------------------------------------------------------------
# A throwaway cluster


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    database: str

    @property
    def env(self) -> dict[str, str]:
        """The variables the shipped dagster.yaml files read."""
        return {
            "DAGSTER_POSTGRES_HOST": self.host,
            "DAGSTER_POSTGRES_PORT": str(self.port),
            "DAGSTER_POSTGRES_USER": self.user,
            "DAGSTER_POSTGRES_PASSWORD": "unused-trust-auth",
            "DAGSTER_POSTGRES_DB": self.database,
        }

    def connect(self):
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname=self.database, connect_timeout=10
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: postgres refuses root. None: run as ourselves."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    pytest.skip("running as root and neither a 'postgres' nor a 'nobody' user exists")


@contextmanager
def throwaway_postgres(bin_dir: Path, *, database: str = "dagster", user: str = "dagster") -> Iterator[PostgresServer]:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; always stopped and deleted afterwards."""
    owner = _server_user()
    # Not under pytest's tmp_path: its root is mode 0700 and the server user could not enter it.
    base = Path(tempfile.mkdtemp(prefix="nola-pg-"))
    data, sockets, log = base / "data", base / "sockets", base / "server.log"
    sockets.mkdir()
    run_as = {} if owner is None else {"user": owner[0], "group": owner[1]}
    if owner is not None:
        os.chown(base, *owner)
        os.chown(sockets, *owner)
    started = False
    try:
        subprocess.run(
            [bin_dir / "initdb", "-D", data, "-U", user, "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            check=True, capture_output=True, timeout=120, **run_as,
        )
        for attempt in range(3):  # a port picked as free can be taken before the server binds it
            port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            result = subprocess.run(
                [bin_dir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"],
                capture_output=True, text=True, timeout=90, **run_as,
            )
            if result.returncode == 0:
                started = True
                break
        if not started:
            tail = log.read_text()[-2000:] if log.exists() else result.stderr
            raise RuntimeError(f"pg_ctl start failed 3 times; server log:\n{tail}")
        server = PostgresServer("127.0.0.1", port, user, database)
        import psycopg2

        admin = psycopg2.connect(host=server.host, port=port, user=user, dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{database}"')
        admin.close()
        yield server
    finally:
        if started:
            subprocess.run([bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop"],
                           capture_output=True, timeout=90, **run_as)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = find_or_install_postgres()
    with throwaway_postgres(bin_dir) as server:
        yield server


def _instance_home(tmp_path: Path, variant: str) -> Path:
    """A DAGSTER_HOME holding deploy/dagster/<variant>, container paths redirected into tmp."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((DAGSTER_CONFIGS / variant).read_text())
    if "compute_logs" in config:
        config["compute_logs"]["config"]["base_dir"] = str(tmp_path / "compute_logs")
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


# --------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("variant", ["dagster.yaml", "dagster.cpu.yaml", "dagster.postgres-local.yaml"])
def test_every_postgres_instance_config_opens_on_a_real_server(postgres, tmp_path, monkeypatch, variant):
    """Each shipped Postgres variant builds its instance (storage schema created on the real server)."""
    from dagster import DagsterInstance

    for key, value in postgres.env.items():
        monkeypatch.setenv(key, value)
    if variant in ("dagster.yaml", "dagster.cpu.yaml"):  # compose files use the default port
        config = yaml.safe_load((DAGSTER_CONFIGS / variant).read_text())
        assert config["storage"]["postgres"]["postgres_db"]["port"] == 5432
        config["storage"]["postgres"]["postgres_db"]["port"] = postgres.port
        home = _instance_home(tmp_path, variant)
        stored = yaml.safe_load((home / "dagster.yaml").read_text())
        stored["storage"] = config["storage"]
        (home / "dagster.yaml").write_text(yaml.safe_dump(stored))
    else:
        home = _instance_home(tmp_path, variant)
    instance = DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_monitoring_enabled
        assert instance.run_retries_enabled
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        launcher = type(instance.run_launcher).__name__
        assert launcher == ("DefaultRunLauncher" if variant.endswith("local.yaml") else "DockerRunLauncher")
        assert instance.get_runs() == []
    finally:
        instance.dispose()
    with postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {row[0] for row in cursor.fetchall()}
    assert {"runs", "event_logs", "jobs", "kvs"} <= tables


def test_materialize_the_demo_graph_into_postgres(postgres, tmp_path, monkeypatch):
    """The demo graph materialized on a Postgres-backed instance; its events read back from Postgres."""
    from dagster import AssetKey, DagsterInstance

    from deploy_support import demo_environment, materialize_demo

    for key, value in {**postgres.env, **demo_environment(tmp_path / "work")}.items():
        monkeypatch.setenv(key, value)
    home = _instance_home(tmp_path, "dagster.postgres-local.yaml")
    instance = DagsterInstance.from_config(str(home))
    try:
        started = time.monotonic()
        outcome = materialize_demo(instance, tmp_path / "work")
        assert outcome.success, "the demo run failed"
        assert set(DEMO_GRAPH_ASSETS) <= set(outcome.asset_names), outcome.asset_names
        elapsed = time.monotonic() - started

        missing = [name for name in outcome.asset_names
                   if not instance.fetch_materializations(AssetKey(name), limit=1).records]
        assert not missing, f"no materialization recorded for {missing} ({elapsed:.0f}s run)"
        for name, keys in outcome.metadata_keys.items():
            latest = instance.get_latest_materialization_event(AssetKey(name))
            assert latest is not None
            assert set(keys) <= set(latest.asset_materialization.metadata), name
        run = instance.get_run_by_id(outcome.run_id)
        assert run is not None and run.is_success
    finally:
        instance.dispose()

    # Straight from the tables: the rows are in Postgres, not in some local SQLite file.
    with postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = %s",
            ("ASSET_MATERIALIZATION",),
        )
        keys_in_postgres = {AssetKey.from_db_string(row[0]) for row in cursor.fetchall()}
        cursor.execute("SELECT status FROM runs WHERE run_id = %s", (outcome.run_id,))
        (status,) = cursor.fetchone()
    assert {AssetKey(name) for name in outcome.asset_names} <= keys_in_postgres
    assert status == "SUCCESS"
    assert not list(home.glob("**/*.db")), "a SQLite file appeared: storage did not go to Postgres"
