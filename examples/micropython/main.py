# SensorFlow example: MicroPython on an ESP32 or a Raspberry Pi Pico W with a DHT22 posts a
# reading every INTERVAL_S seconds. Readings the server could not take (429, 5xx, no
# connection) wait in a buffer and go out later as one batch with device timestamps.
import time

import dht
import machine
import network
import ntptime
import urequests

# ---- Edit these ----------------------------------------------------------------------------
WIFI_SSID = "your-wifi"
WIFI_PASSWORD = "your-password"
SERVER = "http://192.168.1.50:8000"  # the SensorFlow server, no trailing slash
API_KEY = "your-api-key"
SENSOR_ID = "pico-01"
INTERVAL_S = 60
DHT_PIN = 15
# ---------------------------------------------------------------------------------------------

BUFFER_SIZE = 60  # about an hour at one reading a minute; the oldest go first
HEADERS = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
# time.time() counts from 2000-01-01 on some ports and from 1970-01-01 on others.
EPOCH_OFFSET = 0 if time.gmtime(0)[0] == 1970 else 946684800

sensor = dht.DHT22(machine.Pin(DHT_PIN))
wlan = network.WLAN(network.STA_IF)


def connect_wifi():
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(WIFI_SSID, WIFI_PASSWORD)
        for _ in range(20):
            if wlan.isconnected():
                break
            time.sleep(1)
    return wlan.isconnected()


def clock_set():
    return time.time() + EPOCH_OFFSET > 1700000000  # NTP has answered


def sync_clock():
    try:
        ntptime.settime()  # UTC
    except OSError:
        pass


def measure():
    """(ticks when taken, {field: value}) with only the fields the sensor delivered."""
    values = {}
    try:
        sensor.measure()
        if -40 <= sensor.temperature() <= 80:
            values["temperature"] = sensor.temperature()
        if 0 <= sensor.humidity() <= 100:
            values["humidity"] = sensor.humidity()
    except OSError:
        pass  # no answer from the sensor: nothing to send, and never NaN
    return time.ticks_ms(), values


def epoch_ms(taken):
    return (time.time() + EPOCH_OFFSET) * 1000 - time.ticks_diff(time.ticks_ms(), taken)


def reading_json(reading):
    # Built by hand: a fixed field order and two decimals, whatever the port's float repr.
    taken, values = reading
    parts = [f'"sensor_id":"{SENSOR_ID}"']
    if clock_set():
        parts.append(f'"timestamp":{epoch_ms(taken)}')
    for name in ("temperature", "humidity"):
        if name in values:
            parts.append(f'"{name}":{values[name]:.2f}')
    return "{" + ",".join(parts) + "}"


def post(path, body):
    if not connect_wifi():
        return -1
    try:
        response = urequests.post(SERVER + path, data=body, headers=HEADERS)
    except OSError as error:
        print("no connection:", error)
        return -1
    status = response.status_code  # urequests has read the status line and headers only
    response.close()
    return status


def send_readings(buffer):
    """Send what the buffer holds; return the readings still to send."""
    if len(buffer) == 1:
        status = post("/api/v1/temperature_reading", reading_json(buffer[0]))
    elif clock_set():
        status = post("/api/v1/readings", "[" + ",".join(map(reading_json, buffer)) + "]")
    else:
        return buffer  # a batch needs device timestamps: wait for NTP
    if status < 0 or status == 429 or status >= 500:
        print(f"HTTP {status}: keeping {len(buffer)} reading(s) for later")
        return buffer
    if status not in (200, 201):
        print(f"HTTP {status}: server refused {len(buffer)} reading(s), dropped")
    return []


def main():
    connect_wifi()
    buffer = []
    while True:
        if not clock_set() and wlan.isconnected():
            sync_clock()
        reading = measure()
        if reading[1]:
            buffer = (buffer + [reading])[-BUFFER_SIZE:]
            buffer = send_readings(buffer)
        else:
            print("no valid value from the DHT22; nothing sent")
        time.sleep(INTERVAL_S)


main()
