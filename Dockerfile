# One image for every roombus service: `docker run IMAGE roombus gateway|history|presence|bridge`.
#
# The build stage makes a venv with the pinned dependencies (a layer cached until the pins
# change), then installs the project itself. The final stage is a fresh python:3.11-slim with
# only that venv: no pip, no pip cache, no build tree, no compiler; a non-root user.

# The pinned dependencies as a requirements file: its content, not pyproject.toml's, decides
# whether the (slow) dependency layer below is rebuilt.
FROM python:3.11-slim AS requirements
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /requirements.txt


FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/roombus \
 && /opt/roombus/bin/pip install --upgrade pip==25.3

COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN /opt/roombus/bin/pip install -r /tmp/requirements.txt

WORKDIR /src
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
