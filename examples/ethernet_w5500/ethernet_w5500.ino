// SensorFlow example: an Arduino Uno or Mega with a W5500 (or W5100) Ethernet module and a
// DHT22 posts a reading every INTERVAL_MS. The request is written by hand on a raw
// EthernetClient and only the status line of the answer is read, to spare the Uno's 2 KB of RAM.
// Readings the server could not take wait in a small buffer and go out later as one batch.

#include <SPI.h>
#include <Ethernet.h>
#include <EthernetUdp.h>
#include <DHT.h>

// ---- Edit these ---------------------------------------------------------------------------
byte MAC[] = {0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0x01};  // any address unique on your network
IPAddress SERVER_IP(192, 168, 1, 50);               // the SensorFlow server
const uint16_t SERVER_PORT = 8000;
#define API_KEY "your-api-key"
#define SENSOR_ID "uno-01"
const unsigned long INTERVAL_MS = 60000;
const char NTP_SERVER[] = "pool.ntp.org";
const int DHT_PIN = 2;
// --------------------------------------------------------------------------------------------

DHT dht(DHT_PIN, DHT22);

struct Reading {
  unsigned long takenAt;  // millis() when measured
  float temperature;      // NAN: no value, the field is left out
  float humidity;
};

const byte BUFFER_SIZE = 6;  // 72 bytes of RAM; the oldest reading goes first
Reading ring[BUFFER_SIZE];
byte ringStart = 0;
byte ringCount = 0;

// Wall clock from one NTP answer: epoch seconds at the millis() it arrived.
unsigned long clockEpoch = 0;
unsigned long clockAt = 0;

void syncClock() {
  EthernetUDP udp;
  byte packet[48] = {0xE3};  // NTP version 4, client request; the rest stays zero
  udp.begin(8123);
  udp.beginPacket(NTP_SERVER, 123);
  udp.write(packet, sizeof packet);
  udp.endPacket();
  for (unsigned long start = millis(); millis() - start < 2000;) {
    if (udp.parsePacket() >= 48) {
      udp.read(packet, sizeof packet);
      unsigned long since1900 = (unsigned long)packet[40] << 24 | (unsigned long)packet[41] << 16 |
                                (unsigned long)packet[42] << 8 | packet[43];
      clockEpoch = since1900 - 2208988800UL;  // seconds from 1900 to 1970
      clockAt = millis();
      break;
    }
  }
  udp.stop();
}

// Whole epoch seconds: they fit an unsigned long, and the server also takes seconds.
unsigned long epochSeconds(unsigned long takenAt) {
  return clockEpoch + (long)(takenAt - clockAt) / 1000;  // negative for older readings
}

bool measure(Reading& r) {
  r.takenAt = millis();
  r.temperature = dht.readTemperature();  // NAN when the read fails
  r.humidity = dht.readHumidity();
  if (!(r.temperature >= -40 && r.temperature <= 80)) r.temperature = NAN;
  if (!(r.humidity >= 0 && r.humidity <= 100)) r.humidity = NAN;
  return !isnan(r.temperature) || !isnan(r.humidity);
}

void printReading(Print& out, const Reading& r) {
  out.print(F("{\"sensor_id\":\"" SENSOR_ID "\""));
  if (clockEpoch) {
    out.print(F(",\"timestamp\":"));
    out.print(epochSeconds(r.takenAt));
  }
  if (!isnan(r.temperature)) {  // a failed read is left out, never sent as NaN
    out.print(F(",\"temperature\":"));
    out.print(r.temperature, 2);
  }
  if (!isnan(r.humidity)) {
    out.print(F(",\"humidity\":"));
    out.print(r.humidity, 2);
  }
  out.print('}');
}

void printBody(Print& out) {
  if (ringCount == 1) {
    printReading(out, ring[ringStart]);
    return;
  }
  out.print('[');
  for (byte i = 0; i < ringCount; i++) {
    if (i > 0) out.print(',');
    printReading(out, ring[(ringStart + i) % BUFFER_SIZE]);
  }
  out.print(']');
}

// Content-Length comes before the body: count the body by printing it once to nowhere.
class ByteCounter : public Print {
 public:
  unsigned long count = 0;
  size_t write(uint8_t) override {
    count++;
    return 1;
  }
};

int post() {
  EthernetClient client;
  if (!client.connect(SERVER_IP, SERVER_PORT)) return -1;
  ByteCounter length;
  printBody(length);

  client.print(ringCount == 1 ? F("POST /api/v1/temperature_reading HTTP/1.1\r\nHost: ")
                              : F("POST /api/v1/readings HTTP/1.1\r\nHost: "));
  client.print(SERVER_IP);
  client.print(F("\r\ncontent-type: application/json\r\nx-api-key: " API_KEY
                 "\r\ncontent-length: "));
  client.print(length.count);
  client.print(F("\r\nconnection: close\r\n\r\n"));
  printBody(client);

  client.setTimeout(5000);
  int status = client.find((char*)" ") ? client.parseInt() : -1;  // "HTTP/1.1 201 Created"
  client.stop();
  return status;
}

void keep(const Reading& r) {
  if (ringCount == BUFFER_SIZE) {
    ringStart = (ringStart + 1) % BUFFER_SIZE;
    ringCount--;
  }
  ring[(ringStart + ringCount) % BUFFER_SIZE] = r;
  ringCount++;
}

void sendReadings() {
  if (ringCount > 1 && !clockEpoch) return;  // a batch needs timestamps: wait for NTP
  int status = post();
  // 201 stored, 200 already stored. No answer, 429 or 5xx: keep for the next try.
  if (status <= 0 || status == 429 || status >= 500) {
    Serial.print(F("no luck, keeping readings: "));
    Serial.println(status);
    return;
  }
  if (status != 200 && status != 201) {
    Serial.print(F("refused, readings dropped: "));
    Serial.println(status);
  }
  ringStart = ringCount = 0;
}

void setup() {
  Serial.begin(9600);
  dht.begin();
  Ethernet.init(10);  // the module's chip select pin
  while (!Ethernet.begin(MAC)) {  // DHCP
    Serial.println(F("no DHCP answer, retrying"));
    delay(5000);
  }
}

void loop() {
  Ethernet.maintain();  // renews the DHCP lease
  if (!clockEpoch || millis() - clockAt > 86400000UL) syncClock();  // the Uno's clock drifts
  Reading r;
  if (measure(r)) {
    keep(r);
    sendReadings();
  } else {
    Serial.println(F("no valid value from the DHT22; nothing sent"));
  }
  delay(INTERVAL_MS);
}
