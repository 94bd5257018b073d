# Jobdock's service image. The base image is a build argument, since some machines reach
# no registry: build one locally and pass it with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

WORKDIR /srv/jobdock
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-cache-dir -e . \
    && mkdir -p /data

ENV JOBDOCK_HOST=0.0.0.0 \
    JOBDOCK_PORT=8000 \
    JOBDOCK_DATABASE_URL=sqlite+aiosqlite:////data/jobdock.db
VOLUME /data
EXPOSE 8000
CMD ["jobdock", "serve"]
