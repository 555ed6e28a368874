# One image for every roombus service: `docker run IMAGE roombus gateway|history|presence|bridge`.
#
# Stage 1 builds a venv with the pinned dependencies (layer cached until pyproject.toml changes),
# then installs the project itself. Stage 2 is a fresh python:3.11-slim with only that venv:
# no pip cache, no build tree, no compiler, and a non-root user.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/roombus \
 && /opt/roombus/bin/pip install --upgrade pip==25.3

WORKDIR /src

# Dependencies only (the exact pins from pyproject.toml), so a code change reuses this layer.
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/roombus/bin/pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY . .
RUN /opt/roombus/bin/pip install --no-deps . \
 && /opt/roombus/bin/pip uninstall --yes pip


FROM python:3.11-slim

RUN useradd --system --user-group --uid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin roombus

COPY --from=build /opt/roombus /opt/roombus

# HOST=0.0.0.0: inside a container the HTTP/WebSocket server must listen on every interface.
ENV PATH=/opt/roombus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080

USER roombus
WORKDIR /tmp
EXPOSE 8080

# /readyz answers 200 once the service is connected to NATS and serving; 503 while NATS is
# down or while it shuts down. Every service serves it on $PORT.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '8080'), timeout=2)"]

CMD ["roombus", "gateway"]
