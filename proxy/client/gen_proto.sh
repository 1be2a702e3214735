#!/usr/bin/env bash
# Regenerate proxy/client/auth_api_pb2.py (and .pyi) from auth_api.proto (needs grpcio-tools).
# The file is registered as authproxy/client/auth_api.proto, its import path.
# Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/authproxy/client"
cp auth_api.proto "$work/authproxy/client/"
"${PYTHON:-python3}" -m grpc_tools.protoc -I "$work" --python_out="$work" --pyi_out="$work" \
    "$work/authproxy/client/auth_api.proto"
cp "$work/authproxy/client/auth_api_pb2.py" "$work/authproxy/client/auth_api_pb2.pyi" .
echo "generated proxy/client/auth_api_pb2.py and auth_api_pb2.pyi"
