# authproxy: gRPC auth sidecar.
#   docker build -t authproxy .
#   docker run -p 8080:8080 -v $PWD/keys/jwks.json:/etc/authproxy/jwks.json:ro \
#       -e AUTHPROXY_UPSTREAM=backend:50051 authproxy
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
    AUTHPROXY_LISTEN=0.0.0.0:8080 \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080
ENTRYPOINT ["authproxy"]
CMD ["serve"]
