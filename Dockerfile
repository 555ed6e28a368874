# One image for every roombus service: `docker run IMAGE roombus gateway|history|presence|bridge`.
#
# The build stage makes a venv with the locked dependencies (a layer cached until the lock
# changes), then installs the project itself. The final stage is a fresh python:3.11-slim with
# only that venv: no pip, no setuptools, no pip cache, no build tree, no compiler; a non-root
# user.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/roombus \
 && /opt/roombus/bin/pip install --upgrade pip==25.3

# requirements.lock (`make lock`): every package of the tree pinned with its hashes, the bridge
# and rs256 extras included (the compose stack runs the bridge). Its content alone decides
# whether this (slow) layer is rebuilt; a package whose hash differs is refused.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/roombus/bin/pip install --require-hashes -r /tmp/requirements.lock

WORKDIR /src
COPY . .
RUN /opt/roombus/bin/pip install --no-deps --no-build-isolation . ./clients/python \
 && /opt/roombus/bin/pip uninstall --yes setuptools pip


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
