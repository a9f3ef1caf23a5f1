# One small image: the installed collector on its embedded default, data in a volume, non-root.
# The Python version is the one CI tests with (tests/test_docker.py keeps them equal).
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    PORT=3005

# A named volume mounted on /data starts as a copy of this directory: owned by the collector, 0700.
RUN groupadd --system --gid 10001 collector \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent collector \
    && mkdir /data && chown 10001:10001 /data && chmod 0700 /data

WORKDIR /app
# The dependencies first, pinned, with the speed extra (uvloop): a change to the code reuses this layer.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY pyproject.toml README.md ./
COPY collector.py config.py dimensions.py eventmodel.py filters.py http_defense.py logrepeats.py maintenance.py openapi.py pathways.py privacy.py readmodel.py stats.py store.py ./
COPY static ./static
RUN pip install --no-cache-dir --no-deps .

# Numeric, so the host and Kubernetes' runAsNonRoot can tell it is not root.
USER 10001:10001
VOLUME ["/data"]
EXPOSE 3005
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3005'), timeout=4)"]
CMD ["flow-analytics-collector"]
