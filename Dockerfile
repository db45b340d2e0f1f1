# Every image docker-compose.yml runs, built from one base (BASE_IMAGE): no other registry image.
#   target app (the default): every tokenmill service; the command picks the role (api, worker,
#     beat, flower, simulate, db upgrade).
#   target redis: the broker and the cache (their settings are the compose file's commands).
#   target postgres: the ledger's database.
# BASE_IMAGE is Debian bookworm-like: the default is built from Debian's packages by
# scripts/compose-check (debootstrap, with python3, python3-venv, postgresql and redis-server
# already in it, so that building needs no network); a site with a registry or a mirror can pass
# python:3.11-slim or debian:bookworm-slim instead, and each stage installs what that base lacks.
# Python packages come from deploy/wheelhouse/ when it holds wheels (made on the host by
# scripts/compose-check, for a build that cannot reach the package index), else from the index.
ARG BASE_IMAGE=tokenmill-base:bookworm

# The servers first: the classic builder (docker-compose v1) runs every stage before its
# target, and these need none of the Python ones.
FROM ${BASE_IMAGE} AS redis
RUN if ! command -v redis-server >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends redis-server \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["redis-server"]

FROM ${BASE_IMAGE} AS postgres
# Debian's postgresql creates a "main" cluster on install; this image keeps its data in PGDATA.
RUN if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
      mkdir -p /etc/postgresql-common/createcluster.d \
      && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/tokenmill.conf \
      && apt-get update && apt-get install -y --no-install-recommends postgresql \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && ln -sf "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"/* /usr/local/bin/ \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data
COPY deploy/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
# Fast shutdown: SIGTERM would wait for every client to disconnect first.
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint"]

FROM ${BASE_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/tokenmill/bin:$PATH
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/tokenmill

# The runtime dependencies alone, so that editing the rest of pyproject.toml (the dev extra, a
# tool's settings) does not reinstall them.
FROM python AS requirements
COPY pyproject.toml /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /requirements.txt

# Dependencies first, in a layer of their own: a change to the code does not reinstall them.
FROM python AS build
COPY deploy/wheelhouse/ /wheels/
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; fi \
    && pip install "$@" --upgrade pip \
    && pip install "$@" -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY cli /src/cli
COPY config /src/config
COPY models /src/models
COPY store /src/store
COPY workers /src/workers
COPY agents /src/agents
COPY api /src/api
COPY migrations /src/migrations
COPY simulator /src/simulator
COPY telemetry /src/telemetry
RUN if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; fi \
    && pip wheel "$@" --no-deps --wheel-dir /dist /src

# The last stage is the default target (`docker build .`).
FROM python AS app
# The venv's dependencies come whole from the build stage (the wheelhouse stays there); the
# project is one small wheel on top.
COPY --from=build /opt/tokenmill /opt/tokenmill
COPY --from=build /dist/ /dist/
RUN pip install --no-index --no-deps /dist/*.whl && rm -rf /dist \
    && useradd --system --home-dir /data --shell /usr/sbin/nologin tokenmill \
    && mkdir -p /data/files && chown -R tokenmill:tokenmill /data
# /data/files exists in the image, owned by tokenmill: a named volume mounted there starts as a
# copy of it (same owner), so the API, which runs as tokenmill, can write tenants' files.
USER tokenmill
WORKDIR /data
# No secret is baked in: keys, the database password and Flower's credentials come from the
# environment, each only to the services that use it (docker-compose.yml).
ENV TOKENMILL_FILES_DIR=/data/files
ENTRYPOINT ["tokenmill"]
CMD ["--help"]
