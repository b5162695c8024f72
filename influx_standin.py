"""A test-only stand-in for InfluxDB 3 Core, built on the engines InfluxDB 3 uses.

Writes arrive over HTTP (`/api/v3/write_lp` and the `/api/v2/write` compatibility path that
influxdb3-python uses by default), are parsed as strict line protocol and kept in memory per
database and measurement. Queries arrive over Apache Arrow Flight as the JSON ticket the
influxdb3-python client sends (`database`, `sql_query`, `query_type`, `params`) and run on an
Apache DataFusion SessionContext with the `$name` parameters bound.

Like the real server, one port speaks both protocols: the HTTP port forwards HTTP/2 (gRPC)
connections to the Flight server, so `InfluxDBClient3(host=standin.http_url, ...)` needs no
other setting. A Flight-only port is offered too (`query_port_overwrite=standin.flight_port`).

Fault modes, switchable while running: "normal"; "refuse" (listening sockets closed, reopened
on the same ports when switched back); "hang" (connections accepted, never answered); "503"
(every request answered 503 with Retry-After: 1). `reject_sensor(x)` makes any line whose tag
`sensor_id` equals x fail with a 400 that names the line.

In-process: `StandIn(token).start()`. As a subprocess:
`python influx_standin.py --http-port P --flight-port Q --control-port C --token T`, then
POST /mode?value=refuse, POST /reject?sensor_id=X (empty clears), GET /rows?db=&measurement=
on the control port. Everything binds 127.0.0.1 only.
"""

import argparse
import gzip
import json
import re
import selectors
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import datafusion
import pyarrow as pa
import pyarrow.flight as flight

LOOPBACK = "127.0.0.1"
MODES = ("normal", "refuse", "hang", "503")
MAX_LINE_ERRORS = 100  # the real server lists at most 100 rejected lines
ERROR_CONTEXT_CHARS = 10  # the real parser quotes at most 10 characters of a bad line
SNIFF_TIMEOUT_SECONDS = 30.0
HTTP2_PREFACE_START = b"PRI"  # first bytes of every gRPC (HTTP/2) connection
# Nanoseconds per unit of each `precision` parameter; 0 means "guess from the magnitude".
V3_PRECISIONS = dict(auto=0, second=10**9, millisecond=10**6, microsecond=10**3, nanosecond=1)
V2_PRECISIONS = dict(s=10**9, ms=10**6, us=10**3, ns=1)
INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
FIELD_ARROW_TYPES = dict(
    float=pa.float64(),
    integer=pa.int64(),
    uinteger=pa.uint64(),
    string=pa.string(),
    boolean=pa.bool_(),
)
TAG_ARROW_TYPE = pa.dictionary(pa.int32(), pa.string())

# -- Line protocol --------------------------------------------------------------------------

INTEGER = re.compile(r"-?\d+i")
UNSIGNED = re.compile(r"\d+u")
FLOAT = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
TIMESTAMP = re.compile(r" +(-?\d+) *")
BOOLEANS = [(word, True) for word in ("true", "True", "TRUE", "t", "T")] + [
    (word, False) for word in ("false", "False", "FALSE", "f", "F")
]
WHITESPACE = " \t\n"


class LineError(Exception):
    """A line that is not valid line protocol, in the real parser's words."""


class DatabaseNotFound(Exception):
    """A query named a database that has never been written to."""


def quote_context(text: str) -> str:
    if len(text.encode()) > ERROR_CONTEXT_CHARS:
        return f"`{text[:ERROR_CONTEXT_CHARS]}...`"
    return f"`{text}`" if text else "end of input"


def split_lines(body: str) -> list[str]:
    """Split a body into lines; a newline inside a quoted string field does not end a line."""
    lines, start, quoted, in_fields, escaped, equals, commas = [], 0, False, False, False, 0, 0
    for i, c in enumerate(body):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == " ":
            in_fields = True
        elif in_fields and not quoted and c == "=":
            equals += 1
        elif in_fields and not quoted and c == ",":
            commas += 1
        elif in_fields and c == '"' and equals > commas:
            quoted = not quoted
        elif c == "\n" and not quoted:
            lines.append(body[start:i])
            start, in_fields, equals, commas = i + 1, False, 0, 0
    lines.append(body[start:])
    return lines


def read_name(s: str, i: int, stops: str, escapable: str) -> tuple[str, int]:
    """Read a measurement, tag key, tag value or field key, undoing backslash escapes."""
    out = []
    while i < len(s) and s[i] not in stops:
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in escapable:
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i : i + 2] if s[i] == "\\" else s[i])
            i += 2 if s[i] == "\\" else 1
    name = "".join(out)
    if name.endswith("\\"):
        raise LineError(
            "Measurements, tag keys and values, and field keys may not end with a backslash"
        )
    return name, i


def read_field_value(s: str, i: int) -> tuple[str, object, int] | None:
    """Read one field value as (kind, value, end), or None when nothing valid starts at i."""
    if m := INTEGER.match(s, i):
        value = int(m.group()[:-1])
        if not INT64_MIN <= value <= INT64_MAX:
            raise LineError(f"Unable to parse integer value `{m.group()[:-1]}`")
        return "integer", value, m.end()
    if m := UNSIGNED.match(s, i):
        value = int(m.group()[:-1])
        if value > UINT64_MAX:
            raise LineError(f"Unable to parse unsigned integer value `{m.group()[:-1]}`")
        return "uinteger", value, m.end()
    if m := FLOAT.match(s, i):
        return "float", float(m.group()), m.end()
    if s.startswith('"', i):
        out, j = [], i + 1
        while j < len(s) and s[j] != '"':
            if s.startswith(('\\"', "\\\\"), j):
                out.append(s[j + 1])
                j += 2
            else:
                out.append(s[j])
                j += 1
        if j >= len(s):
            return None
        text = "".join(out)
        if len(text.encode()) > 65536:
            raise LineError("String is greater than 64KB")
        return "string", text, j + 1
    for word, value in BOOLEANS:
        if s.startswith(word, i):
            return "boolean", value, i + len(word)
    return None


def parse_line(s: str) -> tuple[str, dict, dict, int | None]:
    """Parse one line into (measurement, tags, fields, timestamp); fields map to (kind, value)."""
    measurement, i = read_name(s, 0, WHITESPACE + "\0,", ", \\")
    if not measurement:
        raise LineError("Invalid measurement was provided")
    tags: dict[str, str] = {}
    if s.startswith(",", i):
        tag_set_start = i = i + 1
        while True:
            key, j = read_name(s, i, WHITESPACE + "=", "\\,= ")
            if not key:
                raise LineError(f"Expected tag key, got {quote_context(s[i:])}")
            if not s.startswith("=", j):
                context = quote_context(s[tag_set_start:])
                raise LineError(f"Tag set malformed: could not find equals sign in {context}")
            value, i = read_name(s, j + 1, WHITESPACE + ",", "\\,= ")
            if not value:
                raise LineError(f"Expected tag value, got {quote_context(s[j + 1 :])}")
            if key in tags:
                raise LineError(f"Must not contain duplicate tags, but `{key}` was repeated")
            tags[key] = value
            if not s.startswith(",", i):
                break
            i += 1
    if not s.startswith(" ", i):
        got = f"`{s[i:]}`" if s[i:] else "end of input"
        raise LineError(f"Expected at least one space character, got {got}")
    i = len(s) - len(s[i:].lstrip(" "))
    fields: dict[str, tuple[str, object]] = {}
    while True:
        key, j = read_name(s, i, WHITESPACE + "=", "\\,= ")
        parsed = read_field_value(s, j + 1) if key and s.startswith("=", j) else None
        if parsed is None:
            if not fields:
                raise LineError("No fields were provided")
            # The real parser reports a bad second field from after its comma, later ones
            # from the comma itself.
            i = i if len(fields) == 1 else i - 1
            break
        if key in fields:
            raise LineError(f"invalid line protocol - multiple instances of '{key}' field found")
        fields[key], i = parsed[:2], parsed[2]
        if not s.startswith(",", i):
            break
        i += 1
    timestamp = None
    if m := TIMESTAMP.match(s, i):
        if not INT64_MIN <= int(m.group(1)) <= INT64_MAX:
            raise LineError(f"Unable to parse timestamp value `{m.group(1)}`")
        timestamp, i = int(m.group(1)), m.end()
    if i < len(s):
        trailing = quote_context(s[i:])
        raise LineError(f"Could not parse entire line. Found trailing content: {trailing}")
    return measurement, tags, fields, timestamp


def to_nanoseconds(timestamp: int | None, precision: str, now_ns: int) -> int:
    if timestamp is None:
        return now_ns
    scale = V3_PRECISIONS.get(precision) or V2_PRECISIONS.get(precision)
    if not scale:  # "auto": guess the unit from the magnitude, as the real server does
        scale = next(
            (s for limit, s in ((5e9, 10**9), (5e12, 10**6), (5e15, 10**3)) if timestamp < limit), 1
        )
    if not INT64_MIN <= timestamp * scale <= INT64_MAX:
        raise LineError("Timestamp is out of range")
    return timestamp * scale


# -- Storage --------------------------------------------------------------------------------


def column_type_name(kind: str) -> str:
    if kind in ("tag", "timestamp"):
        return f"iox::column_type::{kind}"
    return f"iox::column_type::field::{kind}"


class Store:
    """Rows per database and measurement; a column's type is fixed by its first write."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.schemas: dict[str, dict[str, dict[str, str]]] = {}
        self.rows: dict[str, dict[str, dict[tuple, dict]]] = {}

    def write(
        self, db: str, body: str, precision: str, accept_partial: bool, rejected_sensor: str | None
    ) -> list[dict]:
        """Store the valid lines and return one error entry per rejected line."""
        now_ns, errors, accepted, number = time.time_ns(), [], [], 0
        with self.lock:
            schema = {m: dict(cols) for m, cols in self.schemas.get(db, {}).items()}
            for raw in split_lines(body):
                line = raw.lstrip(WHITESPACE)
                if not line or line.startswith("#"):
                    continue  # blank lines and comments are not numbered
                number += 1
                try:
                    measurement, tags, fields, timestamp = parse_line(line)
                    check_types(schema.setdefault(measurement, {}), tags, fields)
                    if rejected_sensor is not None and tags.get("sensor_id") == rejected_sensor:
                        raise LineError(f"sensor_id '{rejected_sensor}' is refused by the stand-in")
                    ns = to_nanoseconds(timestamp, precision, now_ns)
                except LineError as error:
                    errors.append(
                        {"original_line": raw, "line_number": number, "error_message": str(error)}
                    )
                    if not accept_partial:
                        return errors
                    continue
                accepted.append((measurement, tags, fields, ns))
            if not number:
                raise LineError("empty write request")
            self.schemas[db] = schema
            tables = self.rows.setdefault(db, {})
            for measurement, tags, fields, ns in accepted:
                key = (tuple(sorted(tags.items())), ns)
                row = tables.setdefault(measurement, {}).setdefault(key, {"time": ns, **tags})
                row.update((name, value) for name, (_, value) in fields.items())
        return errors[:MAX_LINE_ERRORS]

    def table_rows(self, db: str, measurement: str) -> list[dict]:
        with self.lock:
            rows = self.rows.get(db, {}).get(measurement, {}).values()
            return sorted((dict(row) for row in rows), key=lambda row: row["time"])

    def arrow_tables(self, db: str) -> dict[str, pa.Table]:
        """Each measurement as a table shaped like the real server's: tags dictionary-encoded,
        `time` timestamp(ns), columns in name order."""
        with self.lock:
            if db not in self.schemas:
                raise DatabaseNotFound(f"Database '{db}' not found")
            stored = self.rows.get(db, {})
            snapshot = {
                m: (dict(cols), [dict(r) for r in stored.get(m, {}).values()])
                for m, cols in self.schemas[db].items()
            }
        tables = {}
        for measurement, (columns, rows) in snapshot.items():
            columns["time"] = "timestamp"
            arrays = {}
            for name in sorted(columns):
                kind, values = columns[name], [row.get(name) for row in rows]
                if kind == "timestamp":
                    arrays[name] = pa.array(values, pa.timestamp("ns"))
                elif kind == "tag":
                    arrays[name] = pa.array(values, pa.string()).cast(TAG_ARROW_TYPE)
                else:
                    arrays[name] = pa.array(values, FIELD_ARROW_TYPES[kind])
            tables[measurement] = pa.table(arrays)
        return tables


def check_types(columns: dict[str, str], tags: dict, fields: dict) -> None:
    """Fix the type of new columns; reject a line that writes a column as another type."""
    wanted = {name: "tag" for name in tags}
    wanted.update((name, kind) for name, (kind, _) in fields.items())
    for name, kind in wanted.items():
        expected = "timestamp" if name == "time" else columns.get(name, kind)
        if expected != kind:
            raise LineError(
                f"invalid column type for column '{name}', expected "
                f"{column_type_name(expected)}, got {column_type_name(kind)}"
            )
    columns.update(wanted)


def run_sql(tables: dict[str, pa.Table], sql: str, params: dict | None) -> pa.Table:
    """Run SQL on DataFusion with `$name` placeholders bound to `params`."""
    config = datafusion.SessionConfig().with_default_catalog_and_schema("public", "iox")
    ctx = datafusion.SessionContext(config)
    for name, table in tables.items():
        ctx.register_record_batches(name, [table.to_batches()])
    values = {name: pa.scalar(value) for name, value in (params or {}).items()}
    return ctx.sql(sql, param_values=values).to_arrow_table()


# -- HTTP API -------------------------------------------------------------------------------


def token_matches(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme in ("Bearer", "Token") and given == token


def make_http_handler(standin: "StandIn") -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def answer(self, status: int, body: object = b"", headers: dict | None = None) -> None:
            path, _, query = self.path.partition("?")
            standin.requests.append(
                {"method": self.command, "path": path, "query": query, "status": status}
            )
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            data = data.encode() if isinstance(data, str) else data
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if isinstance(body, (dict, list)):
                self.send_header("Content-Type", "application/json")
            if status != 204:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if status != 204:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self.handle_request()

        def do_POST(self) -> None:
            self.handle_request()

        def handle_request(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if standin.mode == "503":
                headers = {"Retry-After": "1"}
                return self.answer(503, {"error": "service unavailable"}, headers)
            if not token_matches(self.headers.get("Authorization"), standin.token):
                return self.answer(401)
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            if (self.command, url.path) == ("GET", "/health"):
                return self.answer(200, "OK")
            if url.path == "/ping":
                return self.answer(
                    200,
                    {"version": "3-standin", "revision": "standin"},
                    {"X-Influxdb-Version": "3-standin"},
                )
            if self.command == "POST" and url.path in ("/api/v3/write_lp", "/api/v2/write"):
                return self.write(url.path, query, body)
            self.answer(404, "not found")

        def write(self, path: str, query: dict, body: bytes) -> None:
            v3 = path == "/api/v3/write_lp"
            db = query.get("db" if v3 else "bucket")
            precision = query.get("precision", "auto" if v3 else "ns")
            flags = {
                name: query.get(name, "true" if name == "accept_partial" else "false")
                for name in ("accept_partial", "no_sync")
            }
            if not db:
                return self.answer(400, f"missing query parameter '{'db' if v3 else 'bucket'}'")
            if precision not in (V3_PRECISIONS if v3 else V2_PRECISIONS) or any(
                value not in ("true", "false") for value in flags.values()
            ):
                return self.answer(400, "serde error: invalid query parameter")
            encoding = self.headers.get("Content-Encoding", "identity")
            if encoding not in ("identity", "gzip"):
                return self.answer(400, f"unacceptable content-encoding: {encoding}")
            try:
                text = (gzip.decompress(body) if encoding == "gzip" else body).decode()
            except (OSError, UnicodeDecodeError) as error:
                return self.answer(400, f"body content is not valid: {error}")
            accept_partial = flags["accept_partial"] == "true" or not v3
            try:
                errors = standin.store.write(
                    db, text, precision, accept_partial, standin.rejected_sensor
                )
            except LineError as error:
                return self.answer(400, str(error))
            if not errors:
                return self.answer(204)
            if accept_partial:
                return self.answer(
                    400, {"error": "partial write of line protocol occurred", "data": errors}
                )
            self.answer(400, {"error": "parsing failed for write_lp endpoint", "data": errors[0]})

    return Handler


# -- Arrow Flight API -----------------------------------------------------------------------


class FlightAuth(flight.ServerMiddlewareFactory):
    def __init__(self, token: str) -> None:
        self.token = token

    def start_call(self, info: flight.CallInfo, headers: dict) -> None:
        if not any(token_matches(value, self.token) for value in headers.get("authorization", [])):
            raise flight.FlightUnauthenticatedError("the request was not authenticated")


class FlightService(flight.FlightServerBase):
    """Answers do_get tickets of the form the influxdb3-python client sends."""

    def __init__(self, standin: "StandIn") -> None:
        super().__init__(f"grpc+tcp://{LOOPBACK}:0", middleware={"auth": FlightAuth(standin.token)})
        self.standin = standin

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket):
        if self.standin.mode == "503":
            raise flight.FlightUnavailableError("service unavailable")
        try:
            request = json.loads(ticket.ticket)
        except ValueError as error:
            raise flight.FlightServerError(f"invalid ticket: {error}") from None
        return flight.RecordBatchStream(self.standin.run_query(request))


# -- Front doors: one listening port each, where the fault modes act ----------------------------


class FrontDoor:
    """A listening port that forwards each connection to the HTTP or the Flight server."""

    def __init__(self, standin: "StandIn", port: int, hybrid: bool) -> None:
        self.standin, self.port, self.hybrid = standin, port, hybrid
        self.held: set[socket.socket] = set()  # accepted in "hang" mode, never read
        self.forwarded: set[socket.socket] = set()  # both ends of each forwarded connection
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self.stopping.clear()
        self.thread = threading.Thread(target=self.accept_loop, args=(listener,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop listening (new connections are refused) and drop every open connection."""
        self.stopping.set()
        if self.thread:
            self.thread.join()
            self.thread = None
        self.drop_connections()

    def drop_connections(self) -> None:
        # A forwarded connection is only shut down here; its forwarding thread closes it.
        with self.lock:
            held, self.held = self.held, set()
            forwarded = set(self.forwarded)
        for conn in held | forwarded:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for conn in held:
            conn.close()

    def accept_loop(self, listener: socket.socket) -> None:
        with listener:
            while not self.stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                if self.standin.mode == "hang":
                    with self.lock:
                        self.held.add(conn)
                    continue
                with self.lock:
                    self.forwarded.add(conn)
                threading.Thread(target=self.forward, args=(conn,), daemon=True).start()

    def forward(self, conn: socket.socket) -> None:
        ends = [conn]
        try:
            conn.settimeout(SNIFF_TIMEOUT_SECONDS)
            first = conn.recv(65536)
            while first and len(first) < len(HTTP2_PREFACE_START):
                first += conn.recv(65536)
            if first:
                to_flight = not self.hybrid or first.startswith(HTTP2_PREFACE_START)
                port = self.standin.flight_server.port if to_flight else self.standin.backend_port
                backend = socket.create_connection((LOOPBACK, port))
                ends.append(backend)
                with self.lock:
                    self.forwarded.add(backend)
                conn.settimeout(None)
                backend.sendall(first)
                pump(conn, backend)
        except OSError:
            pass
        with self.lock:
            self.forwarded.difference_update(ends)
        for end in ends:
            end.close()


def pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        while True:
            for key, _ in selector.select():
                data = key.fileobj.recv(65536)
                if not data:
                    return
                key.data.sendall(data)


# -- The stand-in ---------------------------------------------------------------------------


class StandIn:
    """An in-memory InfluxDB 3 Core look-alike on 127.0.0.1, with switchable faults."""

    def __init__(
        self, token: str, http_port: int = 0, flight_port: int = 0, host: str = LOOPBACK
    ) -> None:
        if host != LOOPBACK:
            raise ValueError("the stand-in binds 127.0.0.1 only")
        self.token, self.mode, self.rejected_sensor = token, "normal", None
        self.requests: list[dict] = []  # every HTTP request answered: method, path, query, status
        self.store = Store()
        self.http_door = FrontDoor(self, http_port, hybrid=True)
        self.flight_door = FrontDoor(self, flight_port, hybrid=False)
        self.mode_lock = threading.Lock()

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_door.port}"

    @property
    def http_port(self) -> int:
        return self.http_door.port

    @property
    def flight_port(self) -> int:
        return self.flight_door.port

    def start(self) -> "StandIn":
        self.http_server = ThreadingHTTPServer((LOOPBACK, 0), make_http_handler(self))
        self.http_server.daemon_threads = True
        self.backend_port = self.http_server.server_address[1]
        serve = threading.Thread(target=self.http_server.serve_forever, args=(0.05,), daemon=True)
        serve.start()
        self.flight_server = FlightService(self)
        self.http_door.open()
        self.flight_door.open()
        return self

    def stop(self) -> None:
        self.http_door.close()
        self.flight_door.close()
        self.http_server.shutdown()
        self.http_server.server_close()
        self.flight_server.shutdown()

    def __enter__(self) -> "StandIn":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        with self.mode_lock:
            previous, self.mode = self.mode, mode
            doors = (self.http_door, self.flight_door)
            if mode == "refuse" and previous != "refuse":
                for door in doors:
                    door.close()
            elif previous == "refuse" and mode != "refuse":
                for door in doors:
                    door.open()
            elif mode == "hang" or previous == "hang":
                # A hung server answers nothing, kept-alive connections included; leaving
                # "hang" lets go of the connections it held.
                for door in doors:
                    door.drop_connections()

    def reject_sensor(self, sensor_id: str | None) -> None:
        self.rejected_sensor = sensor_id

    def rows(self, database: str, measurement: str) -> list[dict]:
        """Stored rows, oldest first: {"time": ns, tag: str, field: value}."""
        return self.store.table_rows(database, measurement)

    def query(self, sql: str, params: dict | None = None, *, database: str) -> pa.Table:
        return self.run_query(
            {"database": database, "sql_query": sql, "query_type": "sql", "params": params}
        )

    def run_query(self, request: dict) -> pa.Table:
        """Answer one Flight ticket: {"database", "sql_query", "query_type", "params"}."""
        try:
            if request.get("query_type", "sql") != "sql":
                raise ValueError("the stand-in answers SQL queries only")
            tables = self.store.arrow_tables(request.get("database") or "")
            return run_sql(tables, request["sql_query"], request.get("params"))
        except Exception as error:  # DataFusion reports planning and execution errors here
            raise flight.FlightServerError(str(error)) from None


# -- Command line: the stand-in as a subprocess, steered through a control port ---------------


def make_control_handler(standin: StandIn) -> type[BaseHTTPRequestHandler]:
    class Control(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def reply(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            if url.path == "/mode" and query.get("value") in MODES:
                standin.set_mode(query["value"])
                return self.reply(200, {"mode": standin.mode})
            if url.path == "/reject":
                standin.reject_sensor(query.get("sensor_id") or None)
                return self.reply(200, {"sensor_id": standin.rejected_sensor})
            self.reply(400, {"error": "use POST /mode?value=<mode> or /reject?sensor_id=<id>"})

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path == "/rows":
                rows = standin.rows(query.get("db", ""), query.get("measurement", ""))
                return self.reply(200, rows)
            self.reply(404, {"error": "not found"})

    return Control


def main() -> None:
    parser = argparse.ArgumentParser(description="InfluxDB 3 Core stand-in for tests")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--flight-port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    standin = StandIn(args.token, args.http_port, args.flight_port).start()
    control = ThreadingHTTPServer((LOOPBACK, args.control_port), make_control_handler(standin))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=control.shutdown).start())
    ports = {
        "http_port": standin.http_port,
        "flight_port": standin.flight_port,
        "control_port": control.server_address[1],
    }
    print(json.dumps(ports), flush=True)
    try:
        control.serve_forever()
    except KeyboardInterrupt:
        pass
    control.server_close()
    standin.stop()


if __name__ == "__main__":
    main()
