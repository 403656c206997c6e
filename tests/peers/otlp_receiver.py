"""An OTLP/gRPC receiver made of the OpenTelemetry protos (opentelemetry-proto) and grpcio:
it listens on 127.0.0.1 (port 0), prints `listening PORT` on stdout, then appends what each
export carries to the file named by argv[1], one JSON line per data point:

  {"signal": "metrics", "resource": {...}, "name", "unit", "kind", "attributes", "value"}
  {"signal": "traces", "resource": {...}, "name", "kind", "trace_id", "span_id",
   "parent_span_id", "start_ns", "end_ns", "attributes"}
  {"signal": "logs", "resource": {...}, "event_name", "severity", "body", "trace_id",
   "attributes"}

where value is a sum's or gauge's value, or a histogram's {"count", "sum", "bounds", "counts"};
ids are lowercase hex.
It runs until it is killed."""
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.logs.v1 import (
    logs_service_pb2,
    logs_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

LOCK = threading.Lock()


def any_value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def write(path, lines):
    with LOCK, open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, path):
        self.path = path

    def Export(self, request, context):
        lines = []
        for rm in request.resource_metrics:
            resource = attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    data = getattr(m, kind)
                    for p in data.data_points:
                        if kind == "histogram":
                            value = {
                                "count": p.count,
                                "sum": p.sum,
                                "bounds": list(p.explicit_bounds),
                                "counts": list(p.bucket_counts),
                            }
                        else:
                            value = any_value_number(p)
                        lines.append({
                            "signal": "metrics",
                            "resource": resource,
                            "scope": sm.scope.name,
                            "name": m.name,
                            "unit": m.unit,
                            "kind": kind,
                            "attributes": attrs(p.attributes),
                            "value": value,
                        })
        write(self.path, lines)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.path = path

    def Export(self, request, context):
        lines = []
        for rs in request.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    lines.append({
                        "signal": "traces",
                        "resource": resource,
                        "scope": ss.scope.name,
                        "name": sp.name,
                        "kind": sp.kind,
                        "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(),
                        "parent_span_id": sp.parent_span_id.hex(),
                        "start_ns": sp.start_time_unix_nano,
                        "end_ns": sp.end_time_unix_nano,
                        "attributes": attrs(sp.attributes),
                    })
        write(self.path, lines)
        return trace_service_pb2.ExportTraceServiceResponse()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, path):
        self.path = path

    def Export(self, request, context):
        lines = []
        for rl in request.resource_logs:
            resource = attrs(rl.resource.attributes)
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    lines.append({
                        "signal": "logs",
                        "resource": resource,
                        "scope": sl.scope.name,
                        "event_name": r.event_name,
                        "severity": r.severity_number,
                        "body": any_value(r.body),
                        "trace_id": r.trace_id.hex(),
                        "attributes": attrs(r.attributes),
                    })
        write(self.path, lines)
        return logs_service_pb2.ExportLogsServiceResponse()


def any_value_number(p):
    return p.as_int if p.WhichOneof("value") == "as_int" else p.as_double


def main():
    path = sys.argv[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(path), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(path), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(path), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
