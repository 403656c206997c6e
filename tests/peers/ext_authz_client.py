#!/usr/bin/env python3
"""An Envoy ext_authz gRPC client built from Envoy's own protos (xds-protos) and grpcio, the
way Envoy's ext_authz filter calls an authorization server: one CheckRequest per case, and one
JSON line per answer on stdout for tests/ext_authz_python.rs to judge.

    ext_authz_client.py ADDR AGENT_TOKEN PEP_CREDENTIAL

Cases: allow, deny and escalate (a transfer of 50, 20,000 and 250), a bad token, no token,
the jwt_authn payload from the enforcement point and from an unauthenticated caller, the
mTLS peer principal, a CheckRequest without attributes, and grpc.health.v1.
"""
import json
import sys
import time

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

PATH = "/accounts/acct-py/transfers"


def request(token=None, amount=50, payload=None, peer=None):
    """The CheckRequest Envoy sends for POST PATH with a JSON body (with_request_body)."""
    headers = {
        ":method": "POST",
        ":path": PATH,
        ":authority": "api.example.com",
        "content-type": "application/json",
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http = ac.AttributeContext.HttpRequest(
        id="py-1",
        method="POST",
        path=PATH,
        host="api.example.com",
        scheme="http",
        protocol="HTTP/1.1",
        headers=headers,
        body=json.dumps({"amount": amount}),
    )
    attributes = ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    if payload is not None:
        # What jwt_authn's `payload_in_metadata: jwt_payload` leaves for ext_authz's
        # `metadata_context_namespaces`: every number a double.
        s = struct_pb2.Struct()
        s.update({"jwt_payload": payload})
        attributes.metadata_context.CopyFrom(
            base_pb2.Metadata(filter_metadata={"envoy.filters.http.jwt_authn": s})
        )
    if peer is not None:
        attributes.source.principal = peer
    return external_auth_pb2.CheckRequest(attributes=attributes)


def answer(case, response):
    out = {"case": case, "code": response.status.code}
    which = response.WhichOneof("http_response")
    if which == "ok_response":
        ok = response.ok_response
        out["http_status"] = 200
        out["headers"] = {h.header.key: h.header.value for h in ok.headers}
        out["headers_to_remove"] = list(ok.headers_to_remove)
    elif which == "denied_response":
        denied = response.denied_response
        out["http_status"] = denied.status.code
        out["headers"] = {h.header.key: h.header.value for h in denied.headers}
        out["body"] = json.loads(denied.body) if denied.body else None
    else:
        out["http_status"] = None
    print(json.dumps(out), flush=True)


def main():
    addr, token, pep = sys.argv[1:4]
    now = int(time.time())
    payload = {
        "iss": "https://dev.mandate.invalid",
        "aud": "mandate",
        "sub": "agent-py",
        "iat": now - 5,
        "exp": now + 300,
        "owner": "bob",
    }
    with grpc.insecure_channel(addr) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        as_pep = [("authorization", f"Bearer {pep}")]

        def check(case, req, metadata=None):
            answer(case, stub.Check(req, metadata=metadata, timeout=10))

        check("allow", request(token, 50))
        check("deny", request(token, 20_000))
        check("escalate", request(token, 250))
        check("bad_token", request("not.a.jwt", 50))
        check("no_token", request(None, 50))
        check("jwt_authn", request(None, 50, payload=payload), as_pep)
        check("jwt_authn_untrusted", request(None, 50, payload=payload))
        check(
            "peer",
            request(None, 50, peer="spiffe://example.org/ns/agents/sa/py-peer"),
            as_pep,
        )
        check("no_attributes", external_auth_pb2.CheckRequest())
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
            timeout=10,
        )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
        print(json.dumps({"case": "health", "status": status}), flush=True)


if __name__ == "__main__":
    main()
