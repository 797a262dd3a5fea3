#!/usr/bin/env bash
# Regenerate the Python modules from the protocol's .proto (grpcio-tools; run from here):
# the generated service module imports the messages module by its top-level name, which
# is made relative so that it works inside the cvserve.app.protocol package.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. open_inference_grpc.proto
sed -i 's/^import open_inference_grpc_pb2 as/from . import open_inference_grpc_pb2 as/' \
  open_inference_grpc_pb2_grpc.py
