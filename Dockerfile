# syntax=docker/dockerfile:1
# authproxy: gRPC auth sidecar and Envoy ext_authz server. Needs BuildKit (Docker 23+).
#   docker build -t authproxy .
#   docker build --target example-backend -t example/api-backend .   # the example api.v1 backend
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#       -v "$PWD/policy.yaml:/etc/authproxy/policy/policy.yaml:ro" \
#       -v "$PWD/keys/jwks.json:/etc/authproxy/keys/jwks.json:ro" \
#       -e REFRESH_SECRET -e AUTHPROXY_HMAC_SECRET_ENV=refresh-hmac=REFRESH_SECRET \
#       -e AUTHPROXY_UPSTREAM=backend:50051 authproxy       # sidecar on 8080, admin on 9901
#   docker run ... -p 9191:9191 -e AUTHPROXY_EXT_AUTHZ_GRPC=0.0.0.0:9191 authproxy  # Envoy ext_authz
# policy.yaml takes refresh tokens only from the HMAC key refresh-hmac: REFRESH_SECRET (32+
# bytes) is passed from the shell (README.md, "Running it" and "Docker").
# No policy and no keys are baked in: mount them (deploy/k8s/ mounts the policy from a
# ConfigMap directory, so edits are hot-reloaded, and the JWKS from a Secret). The admin
# listener on 0.0.0.0:9901 serves /healthz, /readyz, /metrics and /policy; its revocation
# API answers 403 until AUTHPROXY_ADMIN_TOKEN_ENV names a variable holding its bearer secret.
ARG PYTHON_IMAGE=python:3.12-slim

# Wheels of authproxy and of every dependency (the example backend's extra too), so the
# image stages below install offline and carry no build tools, sources or pip cache.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[example]"

# What both images share: the interpreter settings and an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 authproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin authproxy

# The example api.v1 backend (examples/backend), for deploy/k8s/: `--target example-backend`.
FROM runtime AS example-backend
# DL3013 (pin versions): --no-index installs the wheels built above, nothing from an index;
# the name is needed to ask for the `example` extra.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "authproxy[example]"
# The example is not part of the authproxy package: its source runs from /opt/example.
WORKDIR /opt/example
COPY examples ./examples
USER 10001:10001
ENTRYPOINT ["python", "-m", "examples.backend"]
CMD ["--help"]

# The proxy (the default target).
FROM runtime AS authproxy
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/authproxy-*.whl
ENV AUTHPROXY_POLICY=/etc/authproxy/policy/policy.yaml \
    AUTHPROXY_JWKS=/etc/authproxy/keys/jwks.json \
    AUTHPROXY_ADMIN=0.0.0.0:9901
USER 10001:10001
# 8080: sidecar (default --listen); 9901: admin listener; 9191 / 9192: ext_authz gRPC / HTTP,
# by convention.
EXPOSE 8080 9901 9191 9192
# Liveness of the process, on the admin port AUTHPROXY_ADMIN names (the slim image has no
# curl), bypassing any HTTP_PROXY the container was given.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; port = os.environ.get('AUTHPROXY_ADMIN', '9901').rpartition(':')[2]; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:' + port + '/healthz', timeout=3)"]
ENTRYPOINT ["authproxy"]
CMD ["serve"]
