# SensorFlow Server image: `python app.py` on port 8000 as an unprivileged user.
# The SQLite store (and its generated API key file, if any) lives in /data: mount a volume there.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    SQLITE_PATH=/data/sensorflow.db

WORKDIR /app

# Dependencies first, so an edit to app.py does not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN groupadd --system --gid 10001 sensorflow \
    && useradd --system --uid 10001 --gid sensorflow --home-dir /app \
        --shell /usr/sbin/nologin sensorflow \
    && mkdir /data \
    && chown sensorflow:sensorflow /data

COPY app.py dashboard.html docs.html ./

USER sensorflow
VOLUME ["/data"]
EXPOSE 8000

# Slim images ship no curl or wget, so the check uses Python's standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import json, os, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/api/v1/ping' % os.environ.get('PORT', '8000'), timeout=4); assert json.load(r)['status'] == 'ok'"]

CMD ["python", "app.py"]
