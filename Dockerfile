# TaskAndGo node image.
#
#   docker build -t taskandgo:0.1.0 .
#
# Offline (no registry, no PyPI): build the wheels on the host and give a
# local base image that has python3 (>= 3.11) with venv and pip:
#
#   pip wheel -w wheelhouse .
#   podman build --format docker --pull=never --network none \
#     --build-arg BASE=localhost/debian-python -t taskandgo:0.1.0 .
#
# (podman/buildah keep HEALTHCHECK only with --format docker; Kubernetes
# ignores it either way and uses the chart's gRPC probes.)
#
# If ./wheelhouse holds a taskandgo wheel, the build installs from it alone
# (--no-index); otherwise it builds every wheel from source and PyPI.
#
# bubblewrap (bwrap) sandboxes the tasks (docs/security.md, "Task sandbox"). The
# build installs it with apt-get when the base image lacks it, so an offline base
# must already hold it (apt-get install bubblewrap). --build-arg BWRAP=optional
# builds without it; nodes then run tasks unsandboxed and say so at start.
# The image only writes to /data (the Raft journal; mount a volume) and /tmp,
# so it runs with a read-only root filesystem.

ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY . .
SHELL ["/bin/sh", "-eu", "-c"]
# One venv at /opt/taskandgo holding the project and its dependencies; the
# final stage copies it whole (same base, so its python symlinks still hold).
RUN mkdir -p /wheels; \
    if ls wheelhouse/taskandgo-*.whl >/dev/null 2>&1; then \
        cp wheelhouse/*.whl /wheels/; \
    else \
        python3 -m pip wheel --wheel-dir /wheels .; \
    fi; \
    python3 -m venv /opt/taskandgo; \
    /opt/taskandgo/bin/python -m pip install --no-index --find-links /wheels /wheels/taskandgo-*.whl; \
    /opt/taskandgo/bin/taskandgo --help >/dev/null

FROM ${BASE}
ARG BWRAP=required
SHELL ["/bin/sh", "-eu", "-c"]
# Unpinned: the base image decides the Debian release, and so the version.
# hadolint ignore=DL3008
RUN if ! command -v bwrap >/dev/null; then \
        if apt-get update && apt-get install -y --no-install-recommends bubblewrap; then \
            rm -rf /var/lib/apt/lists/*; \
        elif [ "$BWRAP" = optional ]; then \
            echo "bubblewrap not installed: tasks will run unsandboxed"; \
        else \
            echo "cannot install bubblewrap (offline? use a base that has it, or" \
                 "--build-arg BWRAP=optional)" >&2; exit 1; \
        fi; \
    fi
LABEL org.opencontainers.image.title="taskandgo" \
      org.opencontainers.image.description="Raft-replicated peer-to-peer task scheduler" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/taskandgo /opt/taskandgo
# No login user is needed: a numeric uid lets Kubernetes check runAsNonRoot.
RUN mkdir -p /data && chown 10001:10001 /data && chmod 0750 /data
ENV PATH=/opt/taskandgo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TASKANDGO_BIND=0.0.0.0 \
    TASKANDGO_DATA_DIR=/data
USER 10001:10001
WORKDIR /data
# gRPC API, Raft (voters only), HTTP dashboard/metrics/health.
EXPOSE 7000 7100 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TASKANDGO_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["taskandgo"]
CMD ["node"]
