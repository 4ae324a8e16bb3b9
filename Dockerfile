# syntax=docker/dockerfile:1
# metronome-watcher container image. See docs/docker.md for how to run it.

# -- build: turn the source into a wheel -----------------------------------------------------------
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY watcher ./watcher
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -- runtime: the wheel and its dependencies, nothing else ------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    WATCHER_CONFIG=/config/watcher.toml

# The wheel is bind-mounted from the builder, so it never becomes a layer of this image. With the
# apprise extra, so that the image speaks to every channel the apprise sink opens, and the postgres
# one, so that it can run as one of several replicas on a PostgreSQL store.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && wheel="$(ls /wheels/*.whl)" \
    && pip install --no-cache-dir "${wheel}[apprise,postgres]" \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin watcher \
    && mkdir -p /data /config \
    && chown watcher:watcher /data

# The default config; mount your own over /config/watcher.toml (or a directory at /config).
COPY config/docker.toml /config/watcher.toml

USER watcher
WORKDIR /data
VOLUME /data
EXPOSE 8080

# python:3.11-slim has no curl: the probe is the package's own (reads the port from WATCHER_CONFIG).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "watcher.health"]

# Exec form: metronome-watcher is PID 1 and receives SIGTERM itself; it exits within 10 s.
ENTRYPOINT ["metronome-watcher"]
CMD ["run"]
