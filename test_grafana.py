"""The Docker stack and its Grafana dashboard, checked without Docker.

compose.yaml, the Dockerfile and the Grafana provisioning files are parsed and held to the facts
the stack relies on. The start-up script and the health checks run for real against local
processes. Every dashboard query runs on the InfluxDB stand-in over sample readings, with
Grafana's template variables and SQL macros expanded the way Grafana expands them.
"""

import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import yaml
from influxdb_client_3 import InfluxDBClient3

from conftest import free_port
from influx_standin import StandIn

HERE = Path(__file__).resolve().parent
PROVISIONING = HERE / "grafana-provisioning"
DASHBOARD_FILE = PROVISIONING / "dashboards" / "sensorflow.json"
DATA_SOURCE_UID = "sensorflow-influxdb"
TOKEN = "apiv3_test-token-for-the-dashboard"
DATABASE = "sensorflow"
MEASUREMENT = "sensor_readings"
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|API_KEY")
REQUIRED_REFERENCE = re.compile(r"\$\{(?P<name>[A-Z_]+):\?[^}]+\}")

ACTIVE = ("greenhouse-1", "greenhouse-2", "lab's-shelf")
SILENT = "cellar"  # stopped reporting 45 minutes ago
RETIRED = "retired"  # last seen two days ago, outside the dashboard's default six hours
BIN_SECONDS = 600


def sample_readings(now: datetime) -> list[tuple[str, datetime, dict[str, float]]]:
    """Readings relative to `now`; each active sensor's newest one is 30 seconds old."""
    readings = []
    for n, sensor_id in enumerate(ACTIVE):
        for minutes_ago in range(120, -1, -5):
            at = now - timedelta(minutes=minutes_ago, seconds=30)
            fields = {
                "temperature": 20.0 + n + minutes_ago / 100,
                "humidity": 40.0 + n + minutes_ago / 50,
                "pressure": 1010.0 + n + minutes_ago / 10,
            }
            readings.append((sensor_id, at, fields))
    silent_fields = {"temperature": 12.5, "humidity": 80.0, "pressure": 1001.0}
    for minutes_ago in (90, 60, 45):
        readings.append((SILENT, now - timedelta(minutes=minutes_ago), silent_fields))
    readings.append((RETIRED, now - timedelta(days=2), {"temperature": 5.0}))
    return readings


# --- Files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((HERE / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def data_source() -> dict:
    files = sorted((PROVISIONING / "datasources").glob("*.yaml"))
    sources = [s for f in files for s in yaml.safe_load(f.read_text())["datasources"]]
    assert len(sources) == 1, "expected exactly one provisioned data source"
    return sources[0]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those folded inside rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [p for p in panels if p["type"] != "row"]


def panel(dashboard: dict, title: str) -> dict:
    return next(p for p in all_panels(dashboard) if p["title"] == title)


def sensor_variable(dashboard: dict) -> dict:
    return next(v for v in dashboard["templating"]["list"] if v["name"] == "sensor")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (HERE / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def compose_text(value: str) -> str:
    """A compose string as the container sees it: `$$` is an escaped `$`."""
    assert "${" not in value.replace("$${", ""), "unexpected compose interpolation"
    return value.replace("$$", "$")


# --- Grafana macros and variables, expanded as Grafana does --------------------------------

TEMPLATE_VARIABLE = re.compile(
    r"\$\{(?P<braced>[A-Za-z]\w*)(?::(?P<format>\w+))?\}"
    r"|\$(?P<plain>[A-Za-z]\w*)"
)
MACRO = re.compile(r"\$__(?P<name>\w+)(?:\((?P<args>[^)]*)\))?")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def interpolate_variables(sql: str, variables: dict[str, list[str]]) -> str:
    """The browser's step: replace $sensor, ${sensor} and ${sensor:sqlstring}."""

    def replace(match: re.Match) -> str:
        name = match["braced"] or match["plain"]
        values, fmt = variables[name], match["format"]
        if fmt == "sqlstring":
            return ",".join("'" + value.replace("'", "''") + "'" for value in values)
        if fmt is None and len(values) == 1:
            return values[0]
        raise ValueError(f"variable format {fmt!r} for {len(values)} values is not handled")

    return TEMPLATE_VARIABLE.sub(replace, sql)


def expand_macros(sql: str, start: datetime, end: datetime, interval_seconds: int) -> str:
    """The data source's step: Grafana's SQL macros for InfluxDB 3.

    $__interval is left out on purpose: the browser turns it into text such as `1m` before
    the data source sees it, which is not valid SQL; charts use $__dateBin instead.
    """

    def replace(match: re.Match) -> str:
        name, column = match["name"], (match["args"] or "").strip()
        bin_expr = (
            f"date_bin(interval '{interval_seconds} second', {column}, "
            "timestamp '1970-01-01T00:00:00Z')"
        )
        if name == "timeFilter":
            return f"{column} >= '{rfc3339(start)}' AND {column} <= '{rfc3339(end)}'"
        if name == "timeFrom":
            return f"cast('{rfc3339(start)}' as timestamp)"
        if name == "timeTo":
            return f"cast('{rfc3339(end)}' as timestamp)"
        if name == "dateBin":
            return bin_expr
        if name == "dateBinAlias":
            return f"{bin_expr} as {column}_binned"
        raise ValueError(f"macro $__{name} is not expanded by this test")

    return MACRO.sub(replace, sql)


def grafana_sql(sql: str, sensors: list[str], start: datetime, end: datetime) -> str:
    expanded = expand_macros(
        interpolate_variables(sql, {"sensor": sensors}), start, end, BIN_SECONDS
    )
    assert "$" not in expanded, f"unexpanded template text left in: {expanded}"
    return expanded


# --- The InfluxDB stand-in with sample readings ---------------------------------------------


def line(sensor_id: str, at: datetime, fields: dict[str, float]) -> str:
    values = ",".join(f"{name}={value}" for name, value in fields.items())
    milliseconds = int(at.timestamp() * 1000)
    return f'{MEASUREMENT},sensor_id={sensor_id} {values},client_ip="127.0.0.1" {milliseconds}'


class SampleInflux:
    """The stand-in holding sample readings, queried over Flight as the dashboard queries it:
    over the last six hours, with every active sensor selected unless told otherwise."""

    def __init__(self, client: InfluxDBClient3, now: datetime) -> None:
        self.client = client
        self.readings = sample_readings(now)
        self.start, self.end = now - timedelta(hours=6), now + timedelta(minutes=1)

    def run(self, sql: str, sensors: list[str] | None = None) -> list[dict]:
        selected = list(ACTIVE) if sensors is None else sensors
        return self.client.query(grafana_sql(sql, selected, self.start, self.end)).to_pylist()

    def newest(self, sensor_id: str, field: str) -> float:
        return max((at, f[field]) for s, at, f in self.readings if s == sensor_id)[1]


@pytest.fixture(scope="module")
def influx():
    standin = StandIn(TOKEN).start()
    client = InfluxDBClient3(host=standin.http_url, token=TOKEN, database=DATABASE)
    try:
        sample = SampleInflux(client, datetime.now(UTC).replace(microsecond=0))
        response = requests.post(
            f"{standin.http_url}/api/v3/write_lp",
            params={"db": DATABASE, "precision": "millisecond"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            data="\n".join(line(*reading) for reading in sample.readings),
            timeout=10,
        )
        assert response.status_code == 204, response.text
        yield sample
    finally:
        client.close()
        standin.stop()


# --- Grafana data source ---------------------------------------------------------------------


def test_data_source_queries_influxdb_3_with_sql_over_plain_grpc(data_source, compose):
    service_host = data_source["url"].removeprefix("http://").split(":")[0]

    assert data_source["type"] == "influxdb"
    assert data_source["uid"] == DATA_SOURCE_UID
    assert data_source["jsonData"]["version"] == "SQL"
    assert data_source["jsonData"]["insecureGrpc"] is True
    assert data_source["jsonData"]["httpMode"] == "POST"
    assert data_source["url"] == "http://influxdb:8181"
    assert service_host in compose["services"]


def test_data_source_takes_token_and_database_from_grafana_environment(data_source, compose):
    environment = compose["services"]["grafana"]["environment"]

    assert data_source["secureJsonData"]["token"] == "${INFLUX_TOKEN}"
    assert data_source["jsonData"]["dbName"] == "${INFLUX_DATABASE}"
    assert REQUIRED_REFERENCE.fullmatch(environment["INFLUX_TOKEN"])["name"] == "INFLUX_TOKEN"
    assert environment["INFLUX_DATABASE"] == "${INFLUX_DATABASE:-sensorflow}"
    server_environment = compose["services"]["sensorflow"]["environment"]
    assert server_environment["INFLUX_DATABASE"] == environment["INFLUX_DATABASE"]


def test_dashboard_provider_reads_the_folder_compose_mounts(compose):
    provider_file = PROVISIONING / "dashboards" / "sensorflow.yaml"
    provider = yaml.safe_load(provider_file.read_text())["providers"][0]
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]

    assert provider["type"] == "file"
    assert mounts["./grafana-provisioning/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana-provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert home == f"{provider['options']['path']}/{DASHBOARD_FILE.name}"


# --- Dashboard structure ---------------------------------------------------------------------


def test_every_panel_and_query_uses_the_provisioned_data_source(dashboard):
    panels = all_panels(dashboard)

    assert panels
    for p in panels:
        assert p["datasource"] == {"type": "influxdb", "uid": DATA_SOURCE_UID}, p["title"]
        assert p["targets"], p["title"]
        for target in p["targets"]:
            assert target["datasource"]["uid"] == DATA_SOURCE_UID, p["title"]
            assert target["rawSql"].strip(), p["title"]


def test_sensor_variable_uses_the_provisioned_data_source(dashboard):
    variable = sensor_variable(dashboard)

    assert variable["datasource"]["uid"] == DATA_SOURCE_UID
    assert variable["type"] == "query"
    assert variable["query"]["query"].startswith("SELECT DISTINCT sensor_id")
    assert variable["refresh"] == 2  # follows the time range


def test_dashboard_has_charts_latest_values_and_silent_sensors(dashboard):
    kinds = {(p["type"], p["title"]) for p in all_panels(dashboard)}

    for field in ("Temperature", "Humidity", "Pressure"):
        assert ("timeseries", field) in kinds
        assert ("stat", f"Latest {field.lower()}") in kinds
    assert ("table", "Silent sensors") in kinds


def test_every_query_is_bounded_by_the_dashboard_time_range(dashboard):
    # InfluxDB 3 refuses queries that would read too many files, so none reads all history.
    queries = [t["rawSql"] for p in all_panels(dashboard) for t in p["targets"]]
    queries.append(sensor_variable(dashboard)["query"]["query"])

    for sql in queries:
        assert "$__timeFilter(time)" in sql, sql


# --- Dashboard queries on sample readings ----------------------------------------------------


def test_sensor_variable_lists_the_sensors_seen_in_the_time_range(influx, dashboard):
    rows = influx.run(sensor_variable(dashboard)["query"]["query"])

    assert [row["sensor_id"] for row in rows] == sorted([*ACTIVE, SILENT])


@pytest.mark.parametrize(
    "title",
    [
        "Latest temperature",
        "Latest humidity",
        "Latest pressure",
        "Temperature",
        "Humidity",
        "Pressure",
        "Silent sensors",
    ],
)
def test_panel_query_returns_rows(influx, dashboard, title):
    target = panel(dashboard, title)["targets"][0]

    rows = influx.run(target["rawSql"])

    assert rows, f"{title} returned no rows"
    assert target["format"] in ("time_series", "table")
    if target["format"] == "time_series":
        assert "time" in rows[0], "Grafana draws a time series only from a column named time"


@pytest.mark.parametrize("field", ["temperature", "humidity", "pressure"])
def test_chart_shows_time_buckets_of_the_selected_sensor_only(influx, dashboard, field):
    sql = panel(dashboard, field.capitalize())["targets"][0]["rawSql"]

    rows = influx.run(sql, ["greenhouse-2"])

    times = [row["time"] for row in rows]
    assert {row["sensor_id"] for row in rows} == {"greenhouse-2"}
    assert len(rows) > 1
    assert times == sorted(times)  # Grafana needs ascending time to draw one line per sensor
    assert all(isinstance(row[field], float) for row in rows)


@pytest.mark.parametrize("field", ["temperature", "humidity", "pressure"])
def test_latest_stat_shows_each_sensors_newest_reading(influx, dashboard, field):
    sql = panel(dashboard, f"Latest {field}")["targets"][0]["rawSql"]

    rows = influx.run(sql, list(ACTIVE))

    assert {row["sensor_id"]: row[field] for row in rows} == {
        sensor_id: influx.newest(sensor_id, field) for sensor_id in ACTIVE
    }


def test_sensor_id_with_a_quote_is_escaped_in_queries(influx, dashboard):
    sql = panel(dashboard, "Latest temperature")["targets"][0]["rawSql"]

    rows = influx.run(sql, ["lab's-shelf"])

    assert rows == [
        {"sensor_id": "lab's-shelf", "temperature": influx.newest("lab's-shelf", "temperature")}
    ]


def test_silent_sensors_table_lists_only_sensors_quiet_for_ten_minutes(influx, dashboard):
    sql = panel(dashboard, "Silent sensors")["targets"][0]["rawSql"]

    rows = influx.run(sql)

    assert [row["sensor_id"] for row in rows] == [SILENT]
    assert rows[0]["readings"] == 3


# --- compose.yaml ----------------------------------------------------------------------------


def test_stack_has_influxdb_server_and_grafana(compose):
    services = compose["services"]

    assert set(services) == {"influxdb", "sensorflow", "grafana"}
    assert services["influxdb"]["image"] == "influxdb:3-core"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["sensorflow"]["build"] == "."


def test_every_service_restarts_and_has_a_health_check(compose):
    for name, service in compose["services"].items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert len(service["healthcheck"]["test"]) > 1, name


def test_server_and_grafana_wait_for_a_healthy_influxdb(compose):
    services = compose["services"]

    for name in ("sensorflow", "grafana"):
        assert services[name]["depends_on"] == {"influxdb": {"condition": "service_healthy"}}


def test_data_lives_on_named_volumes(compose):
    services = compose["services"]
    named = set(compose["volumes"])

    def named_mounts(service: str) -> dict[str, str]:
        pairs = (volume.split(":")[:2] for volume in services[service]["volumes"])
        return {target: source for source, target in pairs if source in named}

    serve = compose_text(services["influxdb"]["command"][0])
    data_dir = re.search(r"--data-dir (\S+)", serve)[1]
    sqlite_dir = str(Path(services["sensorflow"]["environment"]["SQLITE_PATH"]).parent)
    assert any(data_dir.startswith(target + "/") for target in named_mounts("influxdb"))
    assert sqlite_dir in named_mounts("sensorflow")
    assert "/var/lib/grafana" in named_mounts("grafana")
    used = {s for name in services for s in named_mounts(name).values()}
    assert used == named


def test_compose_holds_no_secret_value(compose):
    text = (HERE / "compose.yaml").read_text()

    assert not re.search(r"apiv3_[A-Za-z0-9+/=_-]{6,}", text)
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_REFERENCE.fullmatch(str(value)), f"{name}: {key}"


def test_every_required_setting_is_in_env_example():
    required = set(REQUIRED_REFERENCE.findall((HERE / "compose.yaml").read_text()))
    example = (HERE / ".env.example").read_text()

    assert required == {"INFLUX_TOKEN", "API_KEY", "GRAFANA_ADMIN_PASSWORD"}
    for name in required:
        assert re.search(rf"^{name}=", example, re.MULTILINE), name


def test_influxdb_is_published_on_this_machine_only(compose):
    assert compose["services"]["influxdb"]["ports"] == ["127.0.0.1:${INFLUX_PORT:-8181}:8181"]


# --- InfluxDB start-up script and health check, run for real ---------------------------------


def run_influx_startup(tmp_path: Path, compose: dict, token: str) -> subprocess.CompletedProcess:
    """Run the influxdb service's start-up script with a fake `influxdb3` that records its
    arguments, and the token file kept in tmp_path instead of /tmp."""
    fake = tmp_path / "bin" / "influxdb3"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/serve-args\n')
    fake.chmod(0o755)
    service = compose["services"]["influxdb"]
    script = compose_text(service["command"][0]).replace("/tmp/", f"{tmp_path}/")
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "INFLUX_TOKEN": token}
    return subprocess.run(
        [*service["entrypoint"], script], env=env, capture_output=True, text=True, timeout=30
    )


def test_influxdb_starts_with_an_admin_token_file_from_the_environment(tmp_path, compose):
    result = run_influx_startup(tmp_path, compose, TOKEN)

    assert result.returncode == 0, result.stderr
    args = (tmp_path / "serve-args").read_text().splitlines()
    token_file = Path(args[args.index("--admin-token-file") + 1])
    assert args[0] == "serve"
    assert args[args.index("--object-store") + 1] == "file"
    assert args[args.index("--node-id") + 1]
    assert json.loads(token_file.read_text()) == {"token": TOKEN, "name": "_admin"}
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("token", ["not-an-influx-token", 'apiv3_"quoted"', "apiv3_"])
def test_influxdb_refuses_to_start_with_a_malformed_token(tmp_path, compose, token):
    result = run_influx_startup(tmp_path, compose, token)

    assert result.returncode == 64
    assert "INFLUX_TOKEN" in result.stderr
    assert not (tmp_path / "serve-args").exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_influxdb_health_check_needs_the_token(compose):
    check = compose_text(compose["services"]["influxdb"]["healthcheck"]["test"][1])
    standin = StandIn(TOKEN).start()
    try:
        command = check.replace("127.0.0.1:8181", f"127.0.0.1:{standin.http_port}")

        def health(token: str) -> int:
            env = {"PATH": os.environ["PATH"], "INFLUX_TOKEN": token}
            return subprocess.run(
                ["sh", "-c", command], env=env, capture_output=True, timeout=30
            ).returncode

        assert health(TOKEN) == 0
        assert health("apiv3_wrong-token") != 0
    finally:
        standin.stop()


# --- Server image ----------------------------------------------------------------------------


def dockerfile_health_command() -> list[str]:
    arguments = dict(dockerfile_instructions())["HEALTHCHECK"]
    return json.loads(arguments[arguments.index("CMD") + 3 :].strip())


def test_image_runs_the_server_from_slim_python_as_an_unprivileged_user():
    instructions = dockerfile_instructions()
    values = dict(instructions)

    assert re.fullmatch(r"python:3\.1[1-9]-slim", values["FROM"])
    assert values["USER"] not in ("root", "0")
    assert instructions.index(("USER", values["USER"])) > instructions.index(
        ("RUN", "pip install -r requirements.txt")
    )
    assert values["EXPOSE"] == "8000"
    assert json.loads(values["CMD"]) == ["python", "app.py"]
    assert ("COPY", "app.py dashboard.html docs.html ./") in instructions
    assert "SQLITE_PATH=/data/sensorflow.db" in values["ENV"]
    assert json.loads(values["VOLUME"]) == ["/data"]


def test_image_holds_every_file_the_server_serves():
    served = set(re.findall(r'HERE / "([^"]+)"', (HERE / "app.py").read_text()))
    copied = {
        name
        for instruction, value in dockerfile_instructions()
        if instruction == "COPY"
        for name in value.split()[:-1]
    }
    ignore = (HERE / ".dockerignore").read_text().splitlines()
    let_through = {line[1:] for line in ignore if line.startswith("!")}

    assert served == {"dashboard.html", "docs.html"}
    assert served <= copied and served <= let_through


@pytest.mark.parametrize("source", ["Dockerfile", "compose.yaml"])
def test_server_health_check_passes_on_a_running_server_only(server, compose, source):
    command = (
        dockerfile_health_command()
        if source == "Dockerfile"
        else compose["services"]["sensorflow"]["healthcheck"]["test"][1:]
    )
    command = [sys.executable if part == "python" else part for part in command]

    def health(port: int) -> int:
        env = {"PATH": os.environ["PATH"], "PORT": str(port)}
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    assert health(server.port) == 0
    assert health(free_port()) != 0


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: patterns apply in order, the last one that matches decides."""
    excluded = False
    for raw in (HERE / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!")
        top = path.split("/")[0]
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(top, pattern):
            excluded = not negated
    return excluded


def test_image_build_context_holds_only_what_the_image_needs():
    copied = [
        source
        for instruction, arguments in dockerfile_instructions()
        if instruction == "COPY"
        for source in arguments.split()[:-1]
    ]

    for name in copied:
        assert not dockerignore_excludes(name), name
    for name in (".env", "sensorflow.db", "sensorflow.db.key", ".git/config", "test_app.py"):
        assert dockerignore_excludes(name), name
