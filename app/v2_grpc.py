"""The Open Inference Protocol over gRPC: the published GRPCInferenceService
(app/protocol/open_inference_grpc.proto) on `grpc_port`, answering through the same
`OpenInference` as the REST side (app/v2.py).

Imported only when the port is set: its messages register the protocol's names
(`inference.*`) in protobuf's global pool, where a client library of the same protocol
(tritonclient) would register them too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from .auth import Guard
from .errors import CvserveError, Unauthorized
from .protocol import open_inference_grpc_pb2 as pb
from .protocol import open_inference_grpc_pb2_grpc as rpc
from .settings import Settings
from .v2 import VERSION, OpenInference, Tensor, V2Error, pack

log = logging.getLogger("cvserve.grpc")

GRPC_REQUESTS = Counter("cvserve_grpc_requests", "gRPC calls by method and status code",
                        ["method", "code"])
GRPC_SECONDS = Histogram("cvserve_grpc_request_duration_seconds", "gRPC latency by method",
                         ["method"],
                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}
# InferTensorContents' field for each datatype (FP16 has none: raw contents only).
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parameter(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


class Servicer(rpc.GRPCInferenceServiceServicer):
    def __init__(self, core: OpenInference, settings: Settings) -> None:
        self.core = core
        self.settings = settings

    async def _call(self, method: str, context: grpc.aio.ServicerContext, work: Any) -> Any:
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await work
        except V2Error as err:
            code = CODES.get(err.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, err.message)
        finally:
            GRPC_REQUESTS.labels(method, code.name).inc()
            GRPC_SECONDS.labels(method).observe(time.perf_counter() - t0)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.core.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any
                         ) -> pb.ModelReadyResponse:
        try:
            await self.core.model(request.name, request.version)
        except V2Error:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.core.server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any
                            ) -> pb.ModelMetadataResponse:
        async def work() -> pb.ModelMetadataResponse:
            meta = await self.core.metadata(request.name, request.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]])

        return await self._call("ModelMetadata", context, work())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any
                         ) -> pb.ModelInferResponse:
        async def work() -> pb.ModelInferResponse:
            inputs = self._inputs(request)
            params = {k: parameter(v) for k, v in request.parameters.items()}
            asked = [o.name for o in request.outputs] or None
            outputs = await self.core.infer(request.model_name, request.model_version,
                                            inputs, asked, params, "grpc")
            # Raw contents for every output: what Triton answers, and all clients read.
            response = pb.ModelInferResponse(model_name=request.model_name,
                                             model_version=VERSION, id=request.id)
            for t in outputs:
                response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
                response.raw_output_contents.append(t.data)
            return response

        return await self._call("ModelInfer", context, work())

    @staticmethod
    def _inputs(request: pb.ModelInferRequest) -> list[Tensor]:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise V2Error(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} "
                               "inputs")
        tensors = []
        for i, t in enumerate(request.inputs):
            shape = list(t.shape)
            if raw:
                data = raw[i]
            else:
                if t.datatype not in CONTENTS:
                    raise V2Error(400, f"input {t.name}: datatype {t.datatype} needs "
                                       "raw_input_contents")
                values = list(getattr(t.contents, CONTENTS[t.datatype]))
                data = pack(t.datatype, values)
            tensors.append(Tensor(t.name, t.datatype, shape, data))
        return tensors


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """API keys and rate limits (app/auth.py) on gRPC: the `authorization` metadata entry.
    ServerLive and ServerReady count as health checks."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(self, continuation: Any,
                                details: grpc.HandlerCallDetails) -> Any:
        method = details.method.rsplit("/", 1)[-1]
        path = "/v2/health/ready" if method in ("ServerLive", "ServerReady") else "/v2/grpc"
        metadata = dict(details.invocation_metadata or ())
        try:
            await self.guard.check(path, metadata.get("authorization"))
        except CvserveError as err:
            code = (grpc.StatusCode.UNAUTHENTICATED if isinstance(err, Unauthorized)
                    else grpc.StatusCode.RESOURCE_EXHAUSTED)
            message = err.message
            GRPC_REQUESTS.labels(method, code.name).inc()

            async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
                await context.abort(code, message)

            return grpc.unary_unary_rpc_method_handler(deny)
        return await continuation(details)


async def start(core: OpenInference, settings: Settings,
                guard: Guard | None = None) -> grpc.aio.Server:
    """Serve on settings.host:grpc_port. Several api processes may bind the same port
    (SO_REUSEPORT, gRPC's default on Linux): the kernel spreads connections over them."""
    limit = settings.upload_bytes + 1024 * 1024
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 1)],
                             interceptors=[KeyInterceptor(guard)] if guard and guard.enabled
                             else [])
    rpc.add_GRPCInferenceServiceServicer_to_server(Servicer(core, settings), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"could not listen for gRPC on {address}")
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server
