"""Browser tests of the built-in dashboard: a real server, a real headless Chromium."""

import json
import math
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import API_KEY, HERE

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed"
)
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIVE_UPDATE_SECONDS = 2
RECONNECT_SECONDS = 30
HTML_SINKS = re.compile(
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function"
)
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium binary at {CHROMIUM} (install the Debian package 'chromium')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def dashboard_server(make_server):
    """The dashboard uses one key for REST and WebSocket, so the server accepts it for both."""
    return make_server(API_KEY_WS=API_KEY)


class Recorder:
    """Every URL the page asks for, and every page error or policy violation."""

    def __init__(self, page) -> None:
        self.urls: list[str] = []
        self.requests: list = []
        self.errors: list[str] = []
        page.on("request", self.on_request)
        page.on("websocket", lambda socket: self.urls.append(socket.url))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self.on_console)

    def on_request(self, request) -> None:
        self.urls.append(request.url)
        self.requests.append(request)

    def on_console(self, message) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def foreign_urls(self, origin: str) -> list[str]:
        allowed = urlsplit(origin).netloc
        foreign = []
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme == "data":
                continue
            if parts.scheme == "blob":
                parts = urlsplit(url[len("blob:") :])
            if parts.scheme not in ("http", "ws") or parts.netloc != allowed:
                foreign.append(url)
        return foreign


@pytest.fixture
def page(browser, dashboard_server):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.recorder = Recorder(page)
    yield page
    context.close()
    assert page.recorder.foreign_urls(dashboard_server.url) == []
    assert page.recorder.errors == []


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_dashboard(page, server, key: str = API_KEY):
    response = page.goto(server.url + "/")
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Connect").click()
    return response


def connection(page):
    return page.locator("#connection")


def chart(page, field: str):
    return page.locator(f'#charts figure[data-field="{field}"]')


def card(page, sensor_id: str):
    return page.locator("#cards article").filter(has=page.get_by_role("button", name=sensor_id))


def post_reading(server, sensor_id: str, **fields) -> dict:
    response = server.post("/api/v1/temperature_reading", json={"sensor_id": sensor_id, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def test_script_never_writes_html_and_loads_nothing_from_outside():
    source = (HERE / "dashboard.html").read_text()

    sinks = HTML_SINKS.findall(source)
    outside = [url for url in re.findall(r"https?://[^\s\"'`)]+", source) if url != SVG_NAMESPACE]

    assert sinks == []
    assert outside == []
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(?!data:)", source)


def test_page_is_served_with_a_strict_content_security_policy(page, dashboard_server):
    response = open_dashboard(page, dashboard_server)

    policy = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in policy
    expect(connection(page)).to_have_text(re.compile("Connected"))


def test_new_reading_appears_as_card_and_moves_the_chart_live(page, dashboard_server):
    open_dashboard(page, dashboard_server)
    expect(connection(page)).to_have_text(re.compile("Connected"))
    expect(page.get_by_text("No sensors yet")).to_be_visible()

    post_reading(dashboard_server, "greenhouse-1", temperature=21.5, humidity=40.0)
    expect(card(page, "greenhouse-1")).to_contain_text("21.5")
    expect(card(page, "greenhouse-1")).to_contain_text("Reporting")
    expect(chart(page, "temperature")).to_have_attribute("data-points", "1")
    post_reading(dashboard_server, "greenhouse-1", temperature=23.25, humidity=41.0)

    expect(chart(page, "temperature")).to_have_attribute(
        "data-points", "2", timeout=LIVE_UPDATE_SECONDS * 1000
    )
    expect(chart(page, "temperature")).to_contain_text("latest 23.25")
    expect(card(page, "greenhouse-1")).to_contain_text("23.25")


def test_history_fills_the_chart_with_every_stored_reading(page, dashboard_server, screenshot_dir):
    now = time.time()
    history = [
        {
            "sensor_id": sensor_id,
            "timestamp": now - 840 + 14 * i,
            "temperature": round(20 + offset + 3 * math.sin(i / 8), 2),
            "humidity": round(50 + 10 * math.cos(i / 11), 2),
        }
        for offset, sensor_id in enumerate(["attic", "cellar", "kitchen"])
        for i in range(60)
    ]
    history.append({"sensor_id": "shed", "timestamp": now - 7200, "temperature": 4.0})
    response = dashboard_server.post("/api/v1/readings", json=history)
    assert response.status_code == 201, response.text

    open_dashboard(page, dashboard_server)

    expect(chart(page, "temperature")).to_have_attribute("data-points", "60")
    expect(chart(page, "humidity")).to_have_attribute("data-points", "60")
    latest = history[59]
    expect(chart(page, "temperature")).to_contain_text(f"latest {latest['temperature']:g}")
    expect(card(page, "shed")).to_contain_text("Silent")
    page.screenshot(path=screenshot_dir / "dashboard-desktop.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=screenshot_dir / "dashboard-phone.png", full_page=True)
    print(f"screenshots saved in {screenshot_dir}")


def test_key_is_kept_in_local_storage_and_never_in_a_page_url(page, dashboard_server):
    open_dashboard(page, dashboard_server)
    expect(connection(page)).to_have_text(re.compile("Connected"))

    page.reload()

    expect(connection(page)).to_have_text(re.compile("Connected"))
    expect(page.get_by_label("API key", exact=True)).to_be_hidden()
    assert API_KEY not in page.url
    http_urls = [url for url in page.recorder.urls if url.startswith("http")]
    assert http_urls and not [url for url in http_urls if API_KEY in url]
    api_calls = [r for r in page.recorder.requests if "/api/" in r.url]
    assert api_calls and all(r.all_headers().get("x-api-key") == API_KEY for r in api_calls)


def test_wrong_key_is_reported_as_rejected(page, dashboard_server):
    open_dashboard(page, dashboard_server, key="not-the-key")

    expect(connection(page)).to_have_text("Key rejected")
    expect(page.get_by_role("alert")).to_contain_text("rejected")
    expect(page.get_by_label("API key", exact=True)).to_be_visible()


def test_silent_mark_follows_the_server(page, dashboard_server):
    two_hours_ago = time.time() - 2 * 3600
    post_reading(dashboard_server, "quiet", temperature=5.0, timestamp=two_hours_ago)
    post_reading(dashboard_server, "busy", temperature=6.0)
    sensors = dashboard_server.get("/api/v1/sensors").json()["sensors"]
    flags = {sensor["sensor_id"]: sensor["silent"] for sensor in sensors}

    assert flags == {"quiet": True, "busy": False}

    open_dashboard(page, dashboard_server)

    expect(card(page, "quiet")).to_contain_text("Silent")
    expect(card(page, "busy")).to_contain_text("Reporting")


def test_switching_sensor_and_range_reloads_the_chart(page, dashboard_server):
    half_an_hour_ago = time.time() - 30 * 60
    post_reading(dashboard_server, "alpha", temperature=10.0, timestamp=half_an_hour_ago)
    post_reading(dashboard_server, "alpha", temperature=11.0)
    post_reading(dashboard_server, "beta", pressure=1013.0)
    open_dashboard(page, dashboard_server)
    expect(chart(page, "temperature")).to_have_attribute("data-points", "1")

    page.get_by_label("1 h", exact=True).check()
    expect(chart(page, "temperature")).to_have_attribute("data-points", "2")

    with page.expect_request(lambda r: "every=1m" in r.url):
        page.get_by_label("24 h", exact=True).check()
    expect(chart(page, "temperature")).to_contain_text("1-minute means")
    expect(chart(page, "temperature")).to_have_attribute("data-points", "2")
    with page.expect_request(lambda r: "every=15m" in r.url):
        page.get_by_label("7 days", exact=True).check()
    expect(chart(page, "temperature")).to_contain_text("15-minute means")

    page.get_by_label("Sensor", exact=True).select_option("beta")
    expect(chart(page, "pressure")).to_have_attribute("data-points", "1")
    expect(chart(page, "temperature")).to_have_count(0)
    card(page, "alpha").click()
    expect(chart(page, "temperature")).to_have_attribute("data-points", "2")
    expect(page.get_by_role("button", name="alpha")).to_have_attribute("aria-pressed", "true")


def test_csv_download_holds_the_visible_range(page, dashboard_server):
    post_reading(dashboard_server, "field-7", temperature=17.5)
    open_dashboard(page, dashboard_server)
    expect(chart(page, "temperature")).to_have_attribute("data-points", "1")

    with page.expect_download() as raw:
        page.get_by_role("button", name="Download CSV").click()
    page.get_by_label("24 h", exact=True).check()
    with page.expect_download() as buckets:
        page.get_by_role("button", name="Download CSV").click()

    raw_text = Path(raw.value.path()).read_text()
    assert raw_text.startswith("id,sensor_id,timestamp,")
    assert "field-7" in raw_text and "17.5" in raw_text
    assert re.fullmatch(r"field-7_15m_[0-9T-]+\.csv", raw.value.suggested_filename)
    assert Path(buckets.value.path()).read_text().startswith("time,count,")
    assert buckets.value.suggested_filename.startswith("field-7_24h_1m-means_")


def test_page_reconnects_after_server_restart(page, dashboard_server):
    post_reading(dashboard_server, "restart-1", temperature=1.0)
    open_dashboard(page, dashboard_server)
    expect(chart(page, "temperature")).to_have_attribute("data-points", "1")

    dashboard_server.stop()
    expect(connection(page)).to_have_text(re.compile("Reconnecting"))
    requests_before_restart = len(page.recorder.urls)
    dashboard_server.start()

    expect(connection(page)).to_have_text(re.compile("Connected"), timeout=RECONNECT_SECONDS * 1000)
    post_reading(dashboard_server, "restart-1", temperature=2.5)
    expect(card(page, "restart-1")).to_contain_text("2.5")
    expect(chart(page, "temperature")).to_have_attribute("data-points", "2")
    refills = [u for u in page.recorder.urls[requests_before_restart:] if "/readings?" in u]
    assert refills


def test_html_like_sensor_id_and_field_are_shown_as_text(page, dashboard_server):
    sensor_id = '<img src="x" onerror="document.title=1">'
    field = "<b>hot</b>"
    reading = {"sensor_id": sensor_id, field: 3.0, "timestamp": "2026-01-01T00:00:00Z"}
    crafted = {
        "sensors": [
            {
                "sensor_id": sensor_id,
                "fields": [field],
                "silent": False,
                "latest": reading,
                "first_seen": reading["timestamp"],
                "last_seen": reading["timestamp"],
                "count": 1,
            }
        ],
        "silent_after": 600,
    }
    page.route(
        "**/api/v1/sensors",
        lambda route: route.fulfill(content_type="application/json", body=json.dumps(crafted)),
    )

    open_dashboard(page, dashboard_server)

    expect(page.get_by_role("button", name=sensor_id)).to_be_visible()
    expect(card(page, sensor_id).locator("dt")).to_have_text(field)
    expect(page.locator("#cards img, #cards b, #charts img")).to_have_count(0)
    assert page.locator("#sensor-select option").first.text_content() == sensor_id
