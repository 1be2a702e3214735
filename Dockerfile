# authproxy: gRPC auth sidecar and Envoy ext_authz server.
#   docker build -t authproxy .
#   docker run -p 8080:8080 -v $PWD/keys/jwks.json:/etc/authproxy/jwks.json:ro \
#       -e AUTHPROXY_UPSTREAM=backend:50051 authproxy                    # sidecar on 8080
#   docker run -p 9191:9191 -v $PWD/keys/jwks.json:/etc/authproxy/jwks.json:ro \
#       -e AUTHPROXY_EXT_AUTHZ_GRPC=0.0.0.0:9191 authproxy                # Envoy ext_authz
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY examples ./examples
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home authproxy
COPY policy.yaml /etc/authproxy/policy.yaml

ENV AUTHPROXY_POLICY=/etc/authproxy/policy.yaml \
    AUTHPROXY_JWKS=/etc/authproxy/jwks.json \
    PYTHONUNBUFFERED=1
USER 10001
# 8080: sidecar (default --listen); 9191 / 9192: ext_authz gRPC / HTTP, by convention.
EXPOSE 8080 9191 9192
ENTRYPOINT ["authproxy"]
CMD ["serve"]
