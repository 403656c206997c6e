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

use common::{TestServer, dev_token, example_config};
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
    let s = TestServer::start(&example_config(&[(
        "MANDATE_EXT_AUTHZ__GRPC_LISTEN",
        "127.0.0.1:0",
    )]))
    .await;
    let addr = s
        .running
        .as_ref()
        .unwrap()
        .grpc_addr
        .expect("grpc listener");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    (s, channel)
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
