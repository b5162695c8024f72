"""The InfluxDB 3 stand-in, driven by the real influxdb3-python client on 127.0.0.1."""

import json
import math
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import requests
import urllib3
from influxdb_client_3 import (
    InfluxDBClient3,
    Point,
    WriteOptions,
    WritePrecision,
    write_client_options,
)
from influxdb_client_3.exceptions import (
    InfluxDB3ClientQueryError,
    InfluxDBError,
    InfluxDBPartialWriteError,
)
from influxdb_client_3.write_client.client.write_api import WriteType

from influx_standin import StandIn

HERE = Path(__file__).resolve().parent
TOKEN = "standin-test-token"
DB = "sensors"
T0_MS = 1_780_000_000_000  # a fixed instant, in milliseconds since the epoch


@pytest.fixture
def standin():
    server = StandIn(TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def make_client(standin):
    """Factory for a synchronous client writing milliseconds to /api/v3/write_lp."""
    clients = []

    def make(token=TOKEN, timeout_ms=2000, **kwargs):
        options = WriteOptions(
            write_type=WriteType.synchronous,
            write_precision=WritePrecision.MS,
            use_v2_api=False,
            timeout=timeout_ms,
        )
        client = InfluxDBClient3(
            host=standin.http_url,
            token=token,
            database=DB,
            write_client_options=write_client_options(write_options=options),
            query_timeout=timeout_ms,
            **kwargs,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def reading(sensor_id, temperature, ms=T0_MS):
    point = Point("sensor_readings").tag("sensor_id", sensor_id)
    return point.field("temperature", temperature).time(ms, WritePrecision.MS)


def post_lp(standin, body, token=TOKEN, path="/api/v3/write_lp", **params):
    headers = {"Authorization": f"Bearer {token}"}
    return requests.post(
        standin.http_url + path, params={"db": DB, **params}, data=body, headers=headers, timeout=5
    )


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=2)


# -- Writing and reading back ----------------------------------------------------------------


def test_points_written_by_the_client_read_back_with_a_bound_parameter(standin, make_client):
    client = make_client()
    point = reading("hall, north", 22.5).field("count", 7).field("note", 'said "hi"')

    client.write([point, reading("roof", 18.25, T0_MS + 1000)])
    table = client.query(
        "SELECT sensor_id, temperature, count, note, time FROM sensor_readings "
        "WHERE sensor_id = $sid",
        query_parameters={"sid": "hall, north"},
    )

    rows = table.to_pylist()
    assert len(rows) == 1
    assert rows[0]["temperature"] == 22.5
    assert rows[0]["count"] == 7
    assert rows[0]["note"] == 'said "hi"'
    assert table.column("time").cast(pa.int64()).to_pylist() == [T0_MS * 10**6]
    assert table.schema.field("sensor_id").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("time").type == pa.timestamp("ns")
    assert table.schema.field("count").type == pa.int64()


def test_client_escapes_a_trailing_backslash_so_it_is_stored_as_a_trailing_space(
    standin, make_client
):
    client = make_client()

    client.write(reading("dev\\", 1.0))

    assert [row["sensor_id"] for row in standin.rows(DB, "sensor_readings")] == ["dev "]


def test_a_tag_value_ending_in_a_backslash_cannot_be_written(standin):
    response = post_lp(standin, "m,t=dev\\\\ v=1 1")

    assert response.status_code == 400
    message = response.json()["data"][0]["error_message"]
    assert (
        message == "Measurements, tag keys and values, and field keys may not end with a backslash"
    )


def test_escapes_types_comments_and_quoted_newlines_are_parsed(standin):
    body = (
        "# a comment line\n"
        "\n"
        'my\\ room,k\\=ey=a\\,b\\ c f=1.5e3,i=-4i,u=5u,s="two\nlines \\"q\\" \\\\",b=T 1000\n'
        "my\\ room,k\\=ey=z g=false, 2000\n"  # a comma after the first field is tolerated
    )

    response = post_lp(standin, body, precision="second")

    assert response.status_code == 204
    first, second = standin.rows(DB, "my room")
    assert first == {
        "time": 1000 * 10**9,
        "k=ey": "a,b c",
        "f": 1500.0,
        "i": -4,
        "u": 5,
        "s": 'two\nlines "q" \\',
        "b": True,
    }
    assert second == {"time": 2000 * 10**9, "k=ey": "z", "g": False}


@pytest.mark.parametrize(
    ("precision", "timestamp", "expected_ns"),
    [
        ("second", 1_780_000_000, 1_780_000_000 * 10**9),
        ("millisecond", T0_MS, T0_MS * 10**6),
        ("nanosecond", 5, 5),
        ("auto", T0_MS, T0_MS * 10**6),
        ("auto", 1_780_000_000, 1_780_000_000 * 10**9),
    ],
)
def test_timestamps_are_read_in_the_requested_precision(standin, precision, timestamp, expected_ns):
    response = post_lp(standin, f"m v=1 {timestamp}", precision=precision)

    assert response.status_code == 204
    assert standin.rows(DB, "m")[0]["time"] == expected_ns


def test_the_client_writes_to_the_v2_path_by_default_and_it_is_accepted(standin):
    client = InfluxDBClient3(host=standin.http_url, token=TOKEN, database=DB)

    client.write(reading("a", 1.0))
    client.close()

    assert standin.requests[-1]["path"] == "/api/v2/write"
    assert "bucket=sensors" in standin.requests[-1]["query"]
    assert "precision=ms" in standin.requests[-1]["query"]
    assert standin.rows(DB, "sensor_readings")[0]["time"] == T0_MS * 10**6


def test_same_series_and_timestamp_overwrites_instead_of_duplicating(standin, make_client):
    client = make_client()

    client.write(reading("a", 1.0))
    client.write(reading("a", 2.0))
    client.write(reading("b", 3.0))

    rows = standin.rows(DB, "sensor_readings")
    assert sorted((row["sensor_id"], row["temperature"]) for row in rows) == [
        ("a", 2.0),
        ("b", 3.0),
    ]


def test_query_method_runs_the_same_sql_as_flight(standin, make_client):
    client = make_client()
    client.write([reading("a", 1.0), reading("a", 3.0, T0_MS + 1), reading("b", 9.0)])
    sql = "SELECT count(*) AS n, avg(temperature) AS mean FROM sensor_readings WHERE sensor_id = $s"

    direct = standin.query(sql, {"s": "a"}, database=DB)
    over_flight = client.query(sql, query_parameters={"s": "a"})

    assert direct.to_pylist() == over_flight.to_pylist() == [{"n": 2, "mean": 2.0}]


def test_the_flight_only_port_answers_queries(standin, make_client):
    make_client().write(reading("a", 1.0))
    client = make_client(query_port_overwrite=standin.flight_port)

    rows = client.query("SELECT temperature FROM sensor_readings").to_pylist()

    assert rows == [{"temperature": 1.0}]


def test_unknown_table_and_database_are_query_errors(standin, make_client):
    client = make_client()
    client.write(reading("a", 1.0))

    with pytest.raises(InfluxDB3ClientQueryError, match="table 'public.iox.nope' not found"):
        client.query("SELECT * FROM nope")
    with pytest.raises(InfluxDB3ClientQueryError, match="Database 'elsewhere' not found"):
        client.query("SELECT 1", database="elsewhere")


# -- Rejected lines ---------------------------------------------------------------------------


def test_a_type_conflict_is_a_400_naming_the_line(standin, make_client):
    client = make_client()
    client.write(reading("a", 21.5))

    with pytest.raises(InfluxDBPartialWriteError) as caught:
        client.write([reading("b", 1.0, T0_MS + 1), reading("c", 22, T0_MS + 2)])

    assert caught.value.response.status == 400
    [error] = caught.value.line_errors
    assert error.line_number == 2
    assert error.original_line == f"sensor_readings,sensor_id=c temperature=22i {T0_MS + 2}"
    assert error.error_message == (
        "invalid column type for column 'temperature', "
        "expected iox::column_type::field::float, got iox::column_type::field::integer"
    )
    assert sorted(row["sensor_id"] for row in standin.rows(DB, "sensor_readings")) == ["a", "b"]


def test_partial_write_body_lists_each_rejected_line(standin):
    response = post_lp(standin, "cpu,host=b val=2 155\ncpu,host=a val= 123\ncpu,host=b val=5 199")

    assert response.status_code == 400
    assert response.json() == {
        "error": "partial write of line protocol occurred",
        "data": [
            {
                "original_line": "cpu,host=a val= 123",
                "line_number": 2,
                "error_message": "No fields were provided",
            }
        ],
    }
    assert [row["val"] for row in standin.rows(DB, "cpu")] == [2.0, 5.0]


def test_without_accept_partial_one_bad_line_rejects_the_whole_request(standin):
    response = post_lp(standin, "m v=1 1\nm v=\nm v=3 3", accept_partial="false")

    assert response.status_code == 400
    assert response.json() == {
        "error": "parsing failed for write_lp endpoint",
        "data": {
            "original_line": "m v=",
            "line_number": 2,
            "error_message": "No fields were provided",
        },
    }
    assert standin.rows(DB, "m") == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("m v=1 100 200", "Could not parse entire line. Found trailing content: `200`"),
        ("m v=.5 1", "No fields were provided"),
        ("m v=1,w=2,x=3,y= 5", "Could not parse entire line. Found trailing content: `,y= 5`"),
        (
            "m v=1i badtimestamp",
            "Could not parse entire line. Found trailing content: ` badtimest...`",
        ),
        ("m,t= v=1 5", "Expected tag value, got ` v=1 5`"),
        ("m,t v=1 5", "Tag set malformed: could not find equals sign in `t v=1 5`"),
        ("m\tv=1 5", "Expected at least one space character, got `\tv=1 5`"),
        ("m v=1,v=2 5", "invalid line protocol - multiple instances of 'v' field found"),
        ('m v="never closed 5', "No fields were provided"),
        ("m v=9223372036854775808i", "Unable to parse integer value `9223372036854775808`"),
        (
            "m,time=x v=1 5",
            "invalid column type for column 'time', expected "
            "iox::column_type::timestamp, got iox::column_type::tag",
        ),
    ],
)
def test_malformed_lines_are_rejected_in_the_real_parser_words(standin, line, message):
    response = post_lp(standin, line)

    assert response.status_code == 400
    assert response.json()["data"] == [
        {"original_line": line, "line_number": 1, "error_message": message}
    ]


def test_a_nan_only_point_becomes_a_blank_line_that_shifts_line_numbers(standin, make_client):
    client = make_client()
    client.write(reading("a", 1.0))
    points = [reading("b", math.nan), reading("c", "warm")]

    with pytest.raises(InfluxDBPartialWriteError) as caught:
        client.write(points)

    assert [error.line_number for error in caught.value.line_errors] == [1]


def test_reject_sensor_refuses_only_that_sensors_lines(standin, make_client):
    client = make_client()
    standin.reject_sensor("bad-1")

    with pytest.raises(InfluxDBPartialWriteError) as caught:
        client.write([reading("ok-1", 1.0), reading("bad-1", 2.0), reading("ok-2", 3.0)])
    standin.reject_sensor(None)
    client.write(reading("bad-1", 4.0, T0_MS + 5))

    [error] = caught.value.line_errors
    assert error.line_number == 2
    assert "sensor_id=bad-1" in error.original_line
    stored = sorted(row["sensor_id"] for row in standin.rows(DB, "sensor_readings"))
    assert stored == ["bad-1", "ok-1", "ok-2"]


# -- Authentication ---------------------------------------------------------------------------


def test_a_wrong_or_missing_token_is_refused_on_both_protocols(standin, make_client):
    client = make_client(token="wrong")

    with pytest.raises(InfluxDBError) as caught:
        client.write(reading("a", 1.0))
    with pytest.raises(InfluxDB3ClientQueryError, match="not authenticated"):
        client.query("SELECT 1")
    no_header = requests.post(standin.http_url + "/api/v3/write_lp?db=x", data="m v=1", timeout=5)

    assert caught.value.status == 401
    assert no_header.status_code == 401
    assert standin.rows(DB, "sensor_readings") == []


def test_token_scheme_may_be_token_or_bearer(standin):
    response = requests.post(
        standin.http_url + "/api/v2/write",
        params={"bucket": DB, "precision": "s"},
        data="m v=1 1",
        headers={"Authorization": f"Token {TOKEN}"},
        timeout=5,
    )

    assert response.status_code == 204
    assert standin.rows(DB, "m")[0]["time"] == 10**9


# -- Fault modes ------------------------------------------------------------------------------


def test_refuse_mode_closes_both_ports_and_reopens_them_on_the_same_numbers(standin, make_client):
    client = make_client()
    ports = (standin.http_port, standin.flight_port)

    standin.set_mode("refuse")
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            connect(port)
    with pytest.raises(urllib3.exceptions.NewConnectionError):
        client.write(reading("a", 1.0))
    standin.set_mode("normal")
    client.write(reading("a", 2.0))

    assert (standin.http_port, standin.flight_port) == ports
    assert [row["temperature"] for row in standin.rows(DB, "sensor_readings")] == [2.0]


def test_hang_mode_accepts_connections_and_never_answers(standin, make_client):
    client = make_client(timeout_ms=1000)
    client.write(reading("a", 1.0))  # leaves a kept-alive connection that "hang" must also stop

    standin.set_mode("hang")
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        client.write(reading("a", 2.0, T0_MS + 1))
    with pytest.raises(InfluxDB3ClientQueryError, match="Deadline Exceeded"):
        client.query("SELECT * FROM sensor_readings")
    with connect(standin.http_port) as raw:
        raw.settimeout(0.5)
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            raw.recv(1)
    standin.set_mode("normal")
    client.write(reading("a", 3.0, T0_MS + 2))

    assert [row["temperature"] for row in standin.rows(DB, "sensor_readings")] == [1.0, 3.0]


def test_503_mode_answers_503_with_retry_after(standin, make_client):
    client = make_client()

    standin.set_mode("503")
    with pytest.raises(InfluxDBError) as caught:
        client.write(reading("a", 1.0))
    with pytest.raises(InfluxDB3ClientQueryError, match="unavailable"):
        client.query("SELECT 1")
    standin.set_mode("normal")

    assert caught.value.status == 503
    assert caught.value.retry_after == "1"
    assert standin.rows(DB, "sensor_readings") == []


def test_an_unknown_mode_is_refused(standin):
    with pytest.raises(ValueError):
        standin.set_mode("slow")


# -- As a subprocess --------------------------------------------------------------------------


def test_subprocess_is_steered_through_its_control_port():
    process = subprocess.Popen(
        [sys.executable, str(HERE / "influx_standin.py"), "--token", TOKEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ports = json.loads(process.stdout.readline())
        control = f"http://127.0.0.1:{ports['control_port']}"
        client = InfluxDBClient3(
            host=f"http://127.0.0.1:{ports['http_port']}",
            token=TOKEN,
            database=DB,
            write_client_options=write_client_options(
                write_options=WriteOptions(write_type=WriteType.synchronous, timeout=2000)
            ),
        )

        client.write(reading("a", 1.0))
        requests.post(control + "/mode", params={"value": "503"}, timeout=5).raise_for_status()
        with pytest.raises(InfluxDBError) as caught:
            client.write(reading("a", 2.0, T0_MS + 1))
        requests.post(control + "/mode", params={"value": "normal"}, timeout=5).raise_for_status()
        rows = requests.get(
            control + "/rows", params={"db": DB, "measurement": "sensor_readings"}, timeout=5
        ).json()
        client.close()

        assert caught.value.status == 503
        assert rows == [{"time": T0_MS * 10**6, "sensor_id": "a", "temperature": 1.0}]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
