# Jobdock's service image: `jobdock serve` (API + embedded workers) as a non-root user.
#
# The base image is a build argument, since some machines reach no registry. Both stages
# use it, so the venv's python (/opt/jobdock/bin/python3 -> the base's python3) exists in
# the final one. It needs python3 (3.11+) with the venv module.
#
#   With a registry:     docker build -t jobdock .
#   Without a registry:  docker build -t jobdock \
#                          --build-arg BASE_IMAGE="$(scripts/build-base-image.sh)" .
#
# Dependencies come from .cache/wheelhouse when the build context has wheels there (an
# offline build: make them on the host, see README "Running in Docker"), otherwise pip
# fetches them from PyPI, which needs network in the build (`docker build --network host`
# on an engine started with --bridge=none).
#
# Run it with the host's Docker socket, in the socket's group:
#   docker run -d -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" -v jobdock-data:/data \
#     -p 127.0.0.1:8000:8000 jobdock
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# pyproject.toml makes sure COPY has a source when the context holds no wheelhouse.
COPY pyproject.toml .cache/wheelhous[e] /wheels/
# The dependencies first (their own layer, rebuilt only when they change).
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; \
    else set --; fi; \
    python3 -m venv /opt/jobdock; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/wheels/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    /opt/jobdock/bin/pip install -q "$@" -r /tmp/requirements.txt
WORKDIR /srv/jobdock
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
# Editable, so the code stays in /srv/jobdock beside migrations/ (app/db.py finds the
# migrations there). Its build backend (setuptools) comes from the wheelhouse or PyPI.
# pip and setuptools leave the venv afterwards (`python -m ensurepip` brings pip back).
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; \
    else set --; fi; \
    /opt/jobdock/bin/pip install -q "$@" --no-deps -e . ; \
    /opt/jobdock/bin/jobdock --help >/dev/null; \
    /opt/jobdock/bin/python -m compileall -q /srv/jobdock/app /srv/jobdock/migrations; \
    /opt/jobdock/bin/python -m pip uninstall -q -y pip setuptools wheel

FROM ${BASE_IMAGE}
ARG JOBDOCK_UID=10001
# A system user of its own; it reaches the Docker socket through the socket's group,
# added at run time (`--group-add`), since that gid differs from host to host.
RUN useradd --system --uid "${JOBDOCK_UID}" --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin jobdock \
    && mkdir -p /data \
    && chown jobdock:jobdock /data
COPY --from=build /opt/jobdock /opt/jobdock
COPY --from=build /srv/jobdock /srv/jobdock

ENV PATH=/opt/jobdock/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    JOBDOCK_HOST=0.0.0.0 \
    JOBDOCK_PORT=8000 \
    JOBDOCK_DATABASE_URL=sqlite+aiosqlite:////data/jobdock.db
WORKDIR /data
USER ${JOBDOCK_UID}:${JOBDOCK_UID}
VOLUME /data
EXPOSE 8000
# Liveness of the HTTP server, with the image's own python (no curl in the image).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('JOBDOCK_PORT', '8000'), timeout=4)"]
CMD ["jobdock", "serve"]
