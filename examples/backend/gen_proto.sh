#!/usr/bin/env bash
# Regenerate the Python code for examples/backend/api/v1/api.proto (needs grpcio-tools).
# Run from anywhere; set PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
"${PYTHON:-python3}" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  examples/backend/api/v1/api.proto
echo "generated examples/backend/api/v1/api_pb2{,_grpc}.py and api_pb2.pyi"
