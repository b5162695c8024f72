// SensorFlow example: an ESP32 (Arduino core) on Wi-Fi posts a BME280 or DHT22 reading
// every INTERVAL_MS. Readings the server could not take (429, 5xx, no connection) wait in a
// ring buffer and go out later as one batch with device timestamps, once NTP has set the clock.

#include <WiFi.h>
#include <HTTPClient.h>
#include <time.h>
#include <sys/time.h>

// ---- Edit these ---------------------------------------------------------------------------
const char* WIFI_SSID = "your-wifi";
const char* WIFI_PASSWORD = "your-password";
const char* SERVER = "http://192.168.1.50:8000";  // the SensorFlow server, no trailing slash
const char* API_KEY = "your-api-key";
const char* SENSOR_ID = "esp32-01";
const uint32_t INTERVAL_MS = 60000;
const char* NTP_SERVER = "pool.ntp.org";
#define USE_BME280 1  // 0: a DHT22 on DHT_PIN instead
const int DHT_PIN = 4;
// --------------------------------------------------------------------------------------------

#if USE_BME280
#include <Adafruit_BME280.h>
Adafruit_BME280 bme;
bool bmeFound = false;
#else
#include <DHT.h>
DHT dht(DHT_PIN, DHT22);
#endif

struct Reading {
  uint32_t takenAt;  // millis() when measured; turned into epoch ms when sent
  float temperature;  // NAN: the sensor gave no value, the field is left out
  float humidity;
  float pressure;
};

const int BUFFER_SIZE = 60;  // about an hour at one reading a minute; the oldest go first
Reading ring[BUFFER_SIZE];
int ringStart = 0;
int ringCount = 0;

float within(float value, float low, float high) {
  return (value >= low && value <= high) ? value : NAN;  // NAN fails both tests
}

bool measure(Reading& r) {
  r.takenAt = millis();
#if USE_BME280
  if (!bmeFound) bmeFound = bme.begin(0x76) || bme.begin(0x77);
  r.temperature = bmeFound ? within(bme.readTemperature(), -40, 85) : NAN;
  r.humidity = bmeFound ? within(bme.readHumidity(), 0, 100) : NAN;
  r.pressure = bmeFound ? within(bme.readPressure() / 100.0f, 300, 1100) : NAN;
#else
  r.temperature = within(dht.readTemperature(), -40, 80);
  r.humidity = within(dht.readHumidity(), 0, 100);
  r.pressure = NAN;
#endif
  return !isnan(r.temperature) || !isnan(r.humidity) || !isnan(r.pressure);
}

bool clockSet() {
  return time(nullptr) > 1700000000;  // NTP has answered (the clock starts at 1970)
}

uint64_t epochMs(uint32_t takenAt) {
  struct timeval now;
  gettimeofday(&now, nullptr);
  uint64_t nowMs = (uint64_t)now.tv_sec * 1000 + now.tv_usec / 1000;
  return nowMs - (millis() - takenAt);
}

void appendField(String& json, const char* name, float value) {
  if (isnan(value)) return;  // never send NaN: the server refuses the whole reading
  json += ",\"";
  json += name;
  json += "\":";
  json += String(value, 2);
}

String readingJson(const Reading& r) {
  String json = "{\"sensor_id\":\"";
  json += SENSOR_ID;
  json += "\"";
  if (clockSet()) {
    json += ",\"timestamp\":";
    json += String(epochMs(r.takenAt));
  }
  appendField(json, "temperature", r.temperature);
  appendField(json, "humidity", r.humidity);
  appendField(json, "pressure", r.pressure);
  json += "}";
  return json;
}

String batchJson() {
  String json = "[";
  for (int i = 0; i < ringCount; i++) {
    if (i > 0) json += ",";
    json += readingJson(ring[(ringStart + i) % BUFFER_SIZE]);
  }
  json += "]";
  return json;
}

void keep(const Reading& r) {
  if (ringCount == BUFFER_SIZE) {
    ringStart = (ringStart + 1) % BUFFER_SIZE;
    ringCount--;
  }
  ring[(ringStart + ringCount) % BUFFER_SIZE] = r;
  ringCount++;
}

int post(const char* path, const String& body) {
  if (WiFi.status() != WL_CONNECTED) return HTTPC_ERROR_NOT_CONNECTED;
  HTTPClient http;
  http.begin(String(SERVER) + path);
  http.setReuse(false);  // one connection per request: Connection: close
  http.addHeader("X-API-Key", API_KEY);
  http.addHeader("Content-Type", "application/json");
  int status = http.POST(body);
  http.end();
  return status;
}

// 201 stored, 200 already stored: done. 429, 5xx or no connection: try again later.
// Any other answer means the server will never take this body: drop it and say why.
bool worthRetrying(int status) {
  return status < 0 || status == 429 || status >= 500;
}

void sendReadings() {
  bool batch = ringCount > 1;
  if (batch && !clockSet()) return;  // a batch needs device timestamps: wait for NTP
  int status = batch ? post("/api/v1/readings", batchJson())
                     : post("/api/v1/temperature_reading", readingJson(ring[ringStart]));
  if (worthRetrying(status)) {
    Serial.printf("HTTP %d: keeping %d reading(s) for later\n", status, ringCount);
    return;
  }
  if (status != 200 && status != 201) {
    Serial.printf("HTTP %d: server refused %d reading(s), dropped\n", status, ringCount);
  }
  ringStart = ringCount = 0;
}

void setup() {
  Serial.begin(115200);
#if !USE_BME280
  dht.begin();
#endif
  WiFi.mode(WIFI_STA);
  WiFi.begin(WIFI_SSID, WIFI_PASSWORD);  // reconnects by itself after a drop
  for (int i = 0; i < 40 && WiFi.status() != WL_CONNECTED; i++) delay(500);
  configTime(0, 0, NTP_SERVER);  // UTC; the clock is set in the background
}

void loop() {
  Reading r;
  if (measure(r)) {
    keep(r);
    sendReadings();
  } else {
    Serial.println("no valid value from the sensor; nothing sent");
  }
  delay(INTERVAL_MS);
}
