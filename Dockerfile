# One image for every tokenmill service; the command picks the role (api, worker, beat, flower, db upgrade).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY config ./config
COPY models ./models
COPY store ./store
COPY workers ./workers
COPY agents ./agents
COPY api ./api
COPY migrations ./migrations
COPY simulator ./simulator
RUN pip install . && useradd --system --home /app tokenmill && mkdir -p /data && chown tokenmill /data
USER tokenmill
# No secret is baked in: keys, DSNs and the Flower password come from the environment (see .env.example).
ENV TOKENMILL_FILES_DIR=/data/files
ENTRYPOINT ["tokenmill"]
CMD ["--help"]
