//! Envoy `ext_authz` over gRPC (issue 12 item 1) through the real server with the example
//! configuration's routes and a tonic client: allow is `OK` with the identity headers for
//! the upstream, deny and escalate are `PERMISSION_DENIED` with the 403 the client gets (the
//! approval request's id and URL on an escalation), a bad token is `UNAUTHENTICATED` with a
//! 401, a request Envoy does not describe is never `OK`, and `grpc.health.v1` says SERVING.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestServer, dev_token, example_config, example_config_plus, spire_and_envoy};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const UNAUTHENTICATED: i32 = 16;

async fn start() -> (TestServer, Channel) {
    start_env(&[]).await
}

/// The example configuration (gRPC listener on a free port) with `env` overrides, and a
/// channel to its gRPC listener.
async fn start_env(env: &[(&str, &str)]) -> (TestServer, Channel) {
    let s = TestServer::start(&example_config(env)).await;
    let ch = channel(&s).await;
    (s, ch)
}

async fn channel(s: &TestServer) -> Channel {
    let addr = s
        .running
        .as_ref()
        .unwrap()
        .grpc_addr
        .expect("grpc listener");
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

fn agent() -> String {
    dev_token("agent-1", json!({"owner": "bob"}), Duration::from_secs(300))
}

/// The CheckRequest Envoy sends for `method path` with `token` and a JSON `body`.
fn ask(method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> CheckRequest {
    let mut headers = HashMap::from([
        (":method".to_owned(), method.to_owned()),
        (":path".to_owned(), path.to_owned()),
        (":authority".to_owned(), "api.example.com".to_owned()),
    ]);
    if let Some(t) = token {
        headers.insert("authorization".into(), format!("Bearer {t}"));
    }
    if body.is_some() {
        headers.insert("content-type".into(), "application/json".into());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    host: "api.example.com".to_owned(),
                    headers,
                    body: body.map(|b| b.to_string()).unwrap_or_default(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(channel: &Channel, req: CheckRequest) -> CheckResponse {
    AuthorizationClient::new(channel.clone())
        .check(req)
        .await
        .expect("the Check call itself succeeds")
        .into_inner()
}

fn code(r: &CheckResponse) -> i32 {
    r.status.as_ref().map_or(-1, |s| s.code)
}

fn ok(r: &CheckResponse) -> &OkHttpResponse {
    match &r.http_response {
        Some(HttpResponse::OkResponse(o)) => o,
        other => panic!("not an ok_response: {other:?}"),
    }
}

fn denied(r: &CheckResponse) -> (i32, HashMap<String, String>, Value) {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status,
            headers,
            body,
        })) => (
            status.as_ref().map_or(0, |s| s.code),
            headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect(),
            serde_json::from_str(body).expect("a JSON body"),
        ),
        other => panic!("not a denied_response: {other:?}"),
    }
}

#[tokio::test]
async fn allow_deny_and_escalate_in_ext_authz_terms() {
    let (s, ch) = start().await;
    let t = agent();
    let transfer = |amount: i64| {
        ask(
            "POST",
            "/accounts/acct-grpc/transfers?note=x",
            Some(&t),
            Some(json!({"amount": amount})),
        )
    };

    // Allow: OK, with the decision id and the principal for the upstream (overwriting).
    let r = check(&ch, transfer(50)).await;
    assert_eq!(code(&r), OK, "{r:?}");
    let headers: HashMap<_, _> = ok(&r)
        .headers
        .iter()
        .map(|h| {
            let hv = h.header.as_ref().unwrap();
            assert_eq!(h.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD: {h:?}");
            (hv.key.clone(), hv.value.clone())
        })
        .collect();
    assert_eq!(
        headers.get("x-mandate-principal").map(String::as_str),
        Some("Agent::\"agent-1\"")
    );
    assert!(headers.contains_key("x-mandate-decision-id"), "{headers:?}");
    assert!(!headers.contains_key("content-type"), "{headers:?}");

    // Deny: PERMISSION_DENIED, a 403 with the decision as JSON.
    let r = check(&ch, transfer(20_000)).await;
    assert_eq!(code(&r), PERMISSION_DENIED, "{r:?}");
    let (status, h, v) = denied(&r);
    assert_eq!(status, 403);
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(
        h.get("x-mandate-decision-id").map(String::as_str),
        v["decision_id"].as_str()
    );
    assert!(!h.contains_key("x-mandate-principal"));

    // Escalate: PERMISSION_DENIED, 403 with where to wait.
    let r = check(&ch, transfer(250)).await;
    assert_eq!(code(&r), PERMISSION_DENIED, "{r:?}");
    let (status, h, v) = denied(&r);
    assert_eq!(status, 403);
    assert_eq!(v["decision"], "escalate", "{v}");
    let id = v["approval_request"]["id"].as_str().unwrap();
    assert_eq!(h.get("x-mandate-approval-id").map(String::as_str), Some(id));
    assert_eq!(
        h.get("x-mandate-approval-url").cloned(),
        Some(format!("/v1/approvals/{id}"))
    );
    s.shutdown().await;
}

/// SECURITY P-05: no token, or one that does not verify, is UNAUTHENTICATED with a 401.
#[tokio::test]
async fn p05_missing_or_bad_tokens_are_unauthenticated() {
    let (s, ch) = start().await;
    for token in [None, Some("not-a-jwt")] {
        let r = check(&ch, ask("GET", "/crm/records/c-1", token, None)).await;
        assert_eq!(code(&r), UNAUTHENTICATED, "{token:?}: {r:?}");
        let (status, h, v) = denied(&r);
        assert_eq!(status, 401, "{v}");
        assert!(v["error"].is_string(), "{v}");
        assert!(h.contains_key("www-authenticate"), "{h:?}");
    }
    s.shutdown().await;
}

/// SECURITY P-01 (fail closed): a CheckRequest that does not describe the request (no
/// `attributes.request.http`, no method, no path) is never OK, and says what is missing.
#[tokio::test]
async fn p01_an_undescribed_request_is_never_ok() {
    let (s, ch) = start().await;
    let t = agent();
    let mut no_method = ask("GET", "/crm/records/c-1", Some(&t), None);
    no_method
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
        .method
        .clear();
    let mut no_path = ask("GET", "/crm/records/c-1", Some(&t), None);
    no_path
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
        .path
        .clear();
    let cases = [
        (CheckRequest::default(), "attributes.request.http"),
        (no_method, "attributes.request.http.method"),
        (no_path, "attributes.request.http.path"),
    ];
    for (req, field) in cases {
        let r = check(&ch, req).await;
        assert_eq!(code(&r), PERMISSION_DENIED, "{field}: {r:?}");
        let (status, _, v) = denied(&r);
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains(field), "{field}: {v}");
    }
    // And the same request, described, is allowed: the refusals above were about the gaps.
    let r = check(&ch, ask("GET", "/crm/records/c-1", Some(&t), None)).await;
    assert_eq!(code(&r), OK, "{r:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_health_is_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let (s, ch) = start().await;
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let r = HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "`{service}`");
    }
    s.shutdown().await;
}

/// The enforcement point's credential (its SHA-256 is configured) and the configuration
/// reading identity from `jwt_authn` metadata, then the mTLS peer (SPIFFE issuer `spire`,
/// trust domain `example.org`), then the request's own token.
const PEP_SECRET: &str = "envoy-ext-authz-credential";

async fn start_asserting() -> (TestServer, Channel) {
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(PEP_SECRET.as_bytes()));
    let env = [
        (
            "MANDATE_EXT_AUTHZ__IDENTITY",
            r#"["jwt_authn", "peer", "authorization"]"#,
        ),
        ("MANDATE_EXT_AUTHZ__PEER_ISSUER", "spire"),
    ];
    let s = TestServer::start(&example_config_plus(&spire_and_envoy(&digest), &env)).await;
    let ch = channel(&s).await;
    (s, ch)
}

/// `req` sent with gRPC call metadata `authorization: Bearer <credential>` (Envoy's
/// `grpc_service.initial_metadata`), or none.
async fn check_as(channel: &Channel, credential: Option<&str>, req: CheckRequest) -> CheckResponse {
    let mut call = tonic::Request::new(req);
    if let Some(c) = credential {
        call.metadata_mut()
            .insert("authorization", format!("Bearer {c}").parse().unwrap());
    }
    AuthorizationClient::new(channel.clone())
        .check(call)
        .await
        .expect("the Check call itself succeeds")
        .into_inner()
}

/// A `google.protobuf.Value` of a JSON value, numbers as doubles (as Envoy's `jwt_authn`
/// writes every claim).
fn proto_value(v: &Value) -> envoy_types::pb::google::protobuf::Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value as P};
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(proto_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), proto_value(v))).collect(),
        }),
    };
    P { kind: Some(kind) }
}

/// `req` with `payload` where Envoy's `jwt_authn` puts it
/// (`payload_in_metadata: jwt_payload`).
fn with_jwt_authn(mut req: CheckRequest, payload: Value) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::Struct;
    let ns = Struct {
        fields: HashMap::from([("jwt_payload".to_owned(), proto_value(&payload))]),
    };
    req.attributes.as_mut().unwrap().metadata_context = Some(Metadata {
        filter_metadata: HashMap::from([("envoy.filters.http.jwt_authn".to_owned(), ns)]),
        ..Default::default()
    });
    req
}

fn with_peer(mut req: CheckRequest, spiffe_id: &str) -> CheckRequest {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
    req.attributes.as_mut().unwrap().source = Some(Peer {
        principal: spiffe_id.to_owned(),
        ..Default::default()
    });
    req
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims Envoy's `jwt_authn` verified for `sub` (the dev issuer's), `exp` from now.
fn payload(sub: &str, exp_in: i64) -> Value {
    json!({"iss": "https://dev.mandate.invalid", "aud": "mandate", "sub": sub,
           "iat": now() - 10, "exp": now() + exp_in, "owner": "bob"})
}

fn principal_header(r: &CheckResponse) -> Option<String> {
    ok(r)
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "x-mandate-principal")
        .map(|h| h.value.clone())
}

/// Issue 12 item 1: identity from `jwt_authn` metadata and from the mTLS peer, in the
/// configured order, and only from a caller that proves it is an enforcement point (an
/// identity from an unauthenticated message is no identity; cf. SECURITY A-25).
#[tokio::test]
async fn jwt_authn_metadata_and_the_peer_principal_in_the_configured_order() {
    let (s, ch) = start_asserting().await;
    let transfer = |token: Option<&str>| {
        ask(
            "POST",
            "/accounts/acct-1/transfers",
            token,
            Some(json!({"amount": 50})),
        )
    };

    // jwt_authn first: its subject decides, even beside another agent's token.
    let t1 = agent();
    let req = with_jwt_authn(transfer(Some(&t1)), payload("agent-2", 300));
    let r = check_as(&ch, Some(PEP_SECRET), req.clone()).await;
    assert_eq!(code(&r), OK, "{r:?}");
    assert_eq!(principal_header(&r).as_deref(), Some("Agent::\"agent-2\""));

    // From a caller that is not the enforcement point: no credential, the wrong one, or
    // an agent's own token as the call's credential. Never OK, a 401 saying why.
    for credential in [None, Some("guess"), Some(t1.as_str())] {
        let r = check_as(&ch, credential, req.clone()).await;
        assert_eq!(code(&r), UNAUTHENTICATED, "{credential:?}: {r:?}");
        let (status, _, v) = denied(&r);
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["error"], "assertion_untrusted", "{v}");
    }

    // The claims pass every check after the signature: expired, or another audience, is
    // a 401 naming the claim, and no fall-through to the request's own (valid) token.
    let r = check_as(
        &ch,
        Some(PEP_SECRET),
        with_jwt_authn(transfer(Some(&t1)), payload("agent-2", -120)),
    )
    .await;
    assert_eq!(code(&r), UNAUTHENTICATED, "{r:?}");
    assert_eq!(denied(&r).2["error"], "token_expired");
    let mut other_aud = payload("agent-2", 300);
    other_aud["aud"] = json!("someone-else");
    let r = check_as(
        &ch,
        Some(PEP_SECRET),
        with_jwt_authn(transfer(None), other_aud),
    )
    .await;
    assert_eq!(denied(&r).2["error"], "aud_mismatch", "{r:?}");
    // A payload that is not a claim set names where it was read.
    let r = check_as(
        &ch,
        Some(PEP_SECRET),
        with_jwt_authn(transfer(None), json!("x")),
    )
    .await;
    assert_eq!(code(&r), PERMISSION_DENIED, "{r:?}");
    let (status, _, v) = denied(&r);
    assert_eq!(status, 400);
    assert!(v.to_string().contains("jwt_payload"), "{v}");

    // No metadata: the peer's SPIFFE ID, in the trust domain of issuer `spire`.
    let peer = "spiffe://example.org/ns/agents/sa/peer-bot";
    let r = check_as(&ch, Some(PEP_SECRET), with_peer(transfer(None), peer)).await;
    assert_eq!(code(&r), OK, "{r:?}");
    assert_eq!(principal_header(&r), Some(format!("Agent::\"{peer}\"")));
    let r = check_as(
        &ch,
        Some(PEP_SECRET),
        with_peer(transfer(None), "spiffe://evil.org/ns/agents/sa/peer-bot"),
    )
    .await;
    assert_eq!(code(&r), UNAUTHENTICATED, "{r:?}");
    assert_eq!(denied(&r).2["error"], "sub_invalid");
    let r = check_as(&ch, None, with_peer(transfer(None), peer)).await;
    assert_eq!(denied(&r).2["error"], "assertion_untrusted", "{r:?}");

    // Neither: the request's own token, verified here, from any caller.
    let r = check_as(&ch, None, transfer(Some(&t1))).await;
    assert_eq!(code(&r), OK, "{r:?}");
    assert_eq!(principal_header(&r).as_deref(), Some("Agent::\"agent-1\""));
    // Nothing at all: token_missing.
    let r = check_as(&ch, Some(PEP_SECRET), transfer(None)).await;
    assert_eq!(denied(&r).2["error"], "token_missing", "{r:?}");
    s.shutdown().await;
}

/// `forward_auth.strip_authorization`: on an allow the proxy is told to remove the agent's
/// token before the request goes upstream, in gRPC (`headers_to_remove`) and in Envoy's
/// HTTP mode (`x-envoy-auth-headers-to-remove`); never on a refusal.
#[tokio::test]
async fn the_agents_token_is_stripped_before_the_upstream_when_configured() {
    let (s, ch) = start_env(&[("MANDATE_FORWARD_AUTH__STRIP_AUTHORIZATION", "true")]).await;
    let t = agent();
    let req = |amount: i64| {
        ask(
            "POST",
            "/accounts/acct-1/transfers",
            Some(&t),
            Some(json!({"amount": amount})),
        )
    };
    let r = check(&ch, req(50)).await;
    assert_eq!(code(&r), OK, "{r:?}");
    assert_eq!(ok(&r).headers_to_remove, ["authorization"]);
    assert!(
        ok(&r)
            .headers
            .iter()
            .all(|h| h.header.as_ref().unwrap().key != "x-envoy-auth-headers-to-remove"),
        "{r:?}"
    );
    let r = check(&ch, req(20_000)).await;
    let (_, h, _) = denied(&r);
    assert!(!h.contains_key("x-envoy-auth-headers-to-remove"), "{h:?}");

    let http = |amount: i64| {
        s.client
            .post(s.url("/authz/envoy/accounts/acct-1/transfers"))
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(json!({"amount": amount}).to_string())
            .send()
    };
    let r = http(50).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-envoy-auth-headers-to-remove")
            .map(|v| v.to_str().unwrap()),
        Some("authorization")
    );
    let r = http(20_000).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("x-envoy-auth-headers-to-remove").is_none());
    s.shutdown().await;
}

/// `grpc.health.v1` follows readiness: with an audit log that cannot be written (AU-02),
/// the first check is a deny (P-01: never OK), and the health turns NOT_SERVING, as
/// `/readyz` turns 503.
#[tokio::test]
async fn grpc_health_follows_readiness() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let (s, ch) = start_env(&[("MANDATE_AUDIT__PATH", "/dev/full")]).await;
    let status = || async {
        HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: "envoy.service.auth.v3.Authorization".into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status
    };
    assert_eq!(status().await, ServingStatus::Serving as i32);
    let t = agent();
    let r = check(
        &ch,
        ask(
            "POST",
            "/accounts/acct-1/transfers",
            Some(&t),
            Some(json!({"amount": 50})),
        ),
    )
    .await;
    assert_eq!(code(&r), PERMISSION_DENIED, "{r:?}");
    assert_eq!(denied(&r).2["reasons"][0]["code"], "audit_unavailable");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status().await != ServingStatus::NotServing as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "health still SERVING with the audit log failing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.shutdown().await;
}

/// SECURITY H-01 on the gRPC listener: a connection that never sends a request is closed
/// after `server.header_read_timeout`, as on the HTTP one.
#[tokio::test]
async fn h01_a_silent_grpc_connection_is_closed() {
    use tokio::io::AsyncReadExt as _;
    let s = TestServer::start(&example_config(&[(
        "MANDATE_SERVER__HEADER_READ_TIMEOUT",
        "300ms",
    )]))
    .await;
    let addr = s.running.as_ref().unwrap().grpc_addr.unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    // The server's HTTP/2 preface (SETTINGS) may come first; then the close.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection stayed open 10 s");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    s.shutdown().await;
}

/// Issue 15 item 2: over gRPC, the check joins the agent's trace as Envoy forwards it (the
/// original request's `traceparent`), else Envoy's own call's; the audit record names it.
#[tokio::test]
async fn the_agents_traceparent_reaches_the_audit_record() {
    // Spans go nowhere (nothing listens on port 9): joining a trace needs no collector.
    let config = example_config(&[
        ("MANDATE_TELEMETRY__OTLP_ENDPOINT", "http://127.0.0.1:9"),
        ("MANDATE_TELEMETRY__TRACE_SAMPLE_RATIO", "0.0"),
    ]);
    let audit = config.audit.path.clone();
    let s = TestServer::start(&config).await;
    let ch = channel(&s).await;
    let t = agent();
    let from_request = "4bf92f3577b34da6a3ce929d0e0e4736";
    let from_envoy = "0af7651916cd43dd8448eb211c80319c";
    let body = Some(json!({"amount": 50}));
    let mut req = ask("POST", "/accounts/acct-1/transfers", Some(&t), body.clone());
    let headers = &mut req.attributes.as_mut().unwrap().request.as_mut().unwrap();
    headers.http.as_mut().unwrap().headers.insert(
        "traceparent".into(),
        format!("00-{from_request}-00f067aa0ba902b7-00"),
    );
    let r = check(&ch, req).await;
    assert_eq!(code(&r), OK, "{r:?}");
    let mut call = tonic::Request::new(ask("POST", "/accounts/acct-1/transfers", Some(&t), body));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{from_envoy}-00f067aa0ba902b7-00")
            .parse()
            .unwrap(),
    );
    let r = AuthorizationClient::new(ch.clone())
        .check(call)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), OK, "{r:?}");
    let traces: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "decision")
        .map(|r| r.get("trace_id").cloned().unwrap_or(Value::Null))
        .collect();
    assert_eq!(traces, [json!(from_request), json!(from_envoy)]);
    s.shutdown().await;
}
