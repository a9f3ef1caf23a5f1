# One small image: the collector on its embedded default, data in a volume.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data \
    PORT=3005

WORKDIR /app
COPY pyproject.toml README.md ./
COPY collector.py config.py eventmodel.py filters.py http_defense.py maintenance.py openapi.py pathways.py privacy.py readmodel.py stats.py store.py ./
COPY static ./static
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --home-dir /app collector \
    && mkdir -p /data && chown collector /data

USER collector
VOLUME ["/data"]
EXPOSE 3005
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3005'), timeout=4)"]
CMD ["python", "collector.py"]
