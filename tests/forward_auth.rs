//! Forward auth (issue 12 items 2 and 3) through the real server with the example
//! configuration's routes: the Envoy HTTP-mode, nginx `auth_request` and Traefik
//! ForwardAuth endpoints allow (200 with identity headers), deny (403), escalate (403 with
//! the approval request) and refuse bad tokens (401) and requests that cannot be routed
//! without doubt (400); an approved escalation is then allowed; and each endpoint reads only
//! its own proxy's headers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::time::Duration;

use common::{TestServer, config_from, dev_token, example_config, repo};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Envoy,
    Nginx,
    Traefik,
}

const PROXIES: [Proxy; 3] = [Proxy::Envoy, Proxy::Nginx, Proxy::Traefik];

/// One forward-auth call, as `proxy` makes it for the original `method uri`.
struct Ask<'a> {
    proxy: Proxy,
    method: &'a str,
    uri: &'a str,
    token: Option<String>,
    body: Option<String>,
    headers: Vec<(&'a str, String)>,
}

impl<'a> Ask<'a> {
    fn new(proxy: Proxy, method: &'a str, uri: &'a str) -> Self {
        Self {
            proxy,
            method,
            uri,
            token: Some(agent()),
            body: None,
            headers: Vec::new(),
        }
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Some(body.to_string());
        self
    }

    fn header(mut self, name: &'a str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Without the proxy header `name` (it is set by default).
    fn without(mut self, name: &str) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    async fn send(self, s: &TestServer) -> (u16, HeaderMap, Value) {
        let mut headers = self.proxy_headers();
        headers.extend(self.headers.iter().map(|(n, v)| (n.to_string(), v.clone())));
        self.send_raw(s, headers).await
    }

    fn proxy_headers(&self) -> Vec<(String, String)> {
        let h = |n: &str, v: &str| (n.to_owned(), v.to_owned());
        match self.proxy {
            Proxy::Envoy => Vec::new(),
            Proxy::Nginx => vec![
                h("x-original-method", self.method),
                h("x-original-uri", self.uri),
                h("x-original-host", "api.example.com"),
            ],
            Proxy::Traefik => vec![
                h("x-forwarded-method", self.method),
                h("x-forwarded-uri", self.uri),
                h("x-forwarded-host", "api.example.com"),
            ],
        }
    }

    async fn send_raw(
        &self,
        s: &TestServer,
        headers: Vec<(String, String)>,
    ) -> (u16, HeaderMap, Value) {
        let (method, url) = match self.proxy {
            Proxy::Envoy => (self.method, s.url(&format!("/authz/envoy{}", self.uri))),
            Proxy::Nginx => ("GET", s.url("/authz/nginx")),
            Proxy::Traefik => ("GET", s.url("/authz/traefik")),
        };
        let mut req = s.client.request(method.parse().unwrap(), url);
        for (n, v) in headers {
            req = req.header(n, v);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = &self.body {
            req = req
                .header("content-type", "application/json")
                .body(b.clone());
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// The original headers an Ask sets, for tests that send others.
impl Ask<'_> {
    fn with_only(self, headers: &[(&str, &str)]) -> (Self, Vec<(String, String)>) {
        let hs = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        (self, hs)
    }
}

fn agent() -> String {
    dev_token("agent-1", json!({"owner": "bob"}), Duration::from_secs(300))
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).map(|v| v.to_str().expect("ascii header"))
}

fn transfers(account: &str) -> String {
    format!("/accounts/{account}/transfers")
}

#[tokio::test]
async fn each_proxy_allows_denies_and_escalates_with_its_headers() {
    let s = TestServer::start(&example_config(&[])).await;
    for proxy in PROXIES {
        let account = format!("acct-{proxy:?}");
        let uri = transfers(&account);
        let ask = |amount: i64| Ask::new(proxy, "POST", &uri).json(json!({"amount": amount}));

        let (st, h, v) = ask(50).send(&s).await;
        assert_eq!(st, 200, "{proxy:?}: {v}");
        assert_eq!(v["decision"], "allow", "{proxy:?}: {v}");
        assert_eq!(
            header(&h, "x-mandate-principal"),
            Some("Agent::\"agent-1\"")
        );
        assert_eq!(
            header(&h, "x-mandate-decision-id"),
            v["decision_id"].as_str()
        );

        let (st, h, v) = ask(20_000).send(&s).await;
        assert_eq!(st, 403, "{proxy:?}: {v}");
        assert_eq!(
            (v["decision"].as_str(), v["reasons"][0]["code"].as_str()),
            (Some("deny"), Some("forbidden")),
            "{proxy:?}: {v}"
        );
        assert_eq!(
            header(&h, "x-mandate-decision-id"),
            v["decision_id"].as_str()
        );
        assert_eq!(header(&h, "x-mandate-principal"), None);

        let (st, h, v) = ask(250).send(&s).await;
        assert_eq!(st, 403, "{proxy:?}: {v}");
        assert_eq!(v["decision"], "escalate", "{proxy:?}: {v}");
        let id = v["approval_request"]["id"].as_str().unwrap();
        assert_eq!(header(&h, "x-mandate-approval-id"), Some(id));
        let url = format!("/v1/approvals/{id}");
        assert_eq!(header(&h, "x-mandate-approval-url"), Some(url.as_str()));
        assert_eq!(header(&h, "x-mandate-principal"), None);
        // The approval request is the one /v1/check would have opened: the same account and
        // amount, as the route read them.
        let (st, shown) = get(&s, &url, &agent()).await;
        assert_eq!(st, 200, "{shown}");
        assert_eq!(shown["resource"]["id"], account.as_str());
        assert_eq!(shown["context"], json!({"amount": 250}));
    }
    s.shutdown().await;
}

async fn get(s: &TestServer, path: &str, token: &str) -> (u16, Value) {
    let resp = s
        .client
        .get(s.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).expect("json"))
}

/// SECURITY P-05: no token is never an anonymous allow; a token that does not verify is a
/// 401 saying why, with the challenge a client understands.
#[tokio::test]
async fn p05_missing_or_bad_tokens_are_401_with_a_bearer_challenge() {
    let s = TestServer::start(&example_config(&[])).await;
    let expired = dev_token_aged();
    for proxy in PROXIES {
        let ask =
            || Ask::new(proxy, "POST", "/accounts/acct-1/transfers").json(json!({"amount": 50}));
        let (st, h, v) = ask().token(None).send(&s).await;
        assert_eq!(
            (st, v["error"].as_str()),
            (401, Some("token_missing")),
            "{proxy:?}"
        );
        assert_eq!(header(&h, "www-authenticate"), Some("Bearer"));
        let (st, h, v) = ask().token(Some(expired.clone())).send(&s).await;
        assert_eq!(
            (st, v["error"].as_str()),
            (401, Some("token_expired")),
            "{proxy:?}"
        );
        assert_eq!(
            header(&h, "www-authenticate"),
            Some("Bearer error=\"invalid_token\", error_description=\"token_expired\"")
        );
        assert_eq!(header(&h, "x-mandate-decision-id"), None);
    }
    s.shutdown().await;
}

fn dev_token_aged() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    common::dev_token_at("agent-1", json!({}), Duration::from_secs(60), now - 300)
}

/// SECURITY J-39: a proxy that forwards two credentials is refused, not read either way.
#[tokio::test]
async fn j39_two_bearer_tokens_are_ambiguous() {
    let s = TestServer::start(&example_config(&[])).await;
    let ask = Ask::new(Proxy::Nginx, "GET", "/crm/records/c-1");
    let mut headers = ask.proxy_headers();
    headers.push(("authorization".into(), format!("Bearer {}", agent())));
    let (st, _, v) = ask.send_raw(&s, headers).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("token_ambiguous")),
        "{v}"
    );
    s.shutdown().await;
}

/// SECURITY P-01: a proxy that does not say what it asks about gets no allow (a 400 naming
/// the header, which every proxy turns into a refusal), never a guess.
#[tokio::test]
async fn p01_a_missing_proxy_header_is_a_400_naming_it() {
    let s = TestServer::start(&example_config(&[])).await;
    for (proxy, name) in [
        (Proxy::Nginx, "x-original-method"),
        (Proxy::Nginx, "x-original-uri"),
        (Proxy::Traefik, "x-forwarded-method"),
        (Proxy::Traefik, "x-forwarded-uri"),
        (Proxy::Traefik, "x-forwarded-host"),
    ] {
        let ask = Ask::new(proxy, "GET", "/crm/records/c-1");
        let mut headers = ask.proxy_headers();
        headers.retain(|(n, _)| n != name);
        let (st, _, v) = ask.send_raw(&s, headers).await;
        assert_eq!(st, 400, "{proxy:?} without {name}: {v}");
        assert_eq!(v["field"], format!("header {name}"), "{v}");
    }
    // Envoy's original path follows the prefix; the prefix alone names none.
    let (st, _, v) = Ask::new(Proxy::Envoy, "GET", "").send(&s).await;
    assert_eq!((st, v["field"].as_str()), (400, Some("path")), "{v}");
    // nginx without X-Original-Host takes Host (here, Mandate's own address): routes
    // without a host still match.
    let (st, _, v) = Ask::new(Proxy::Nginx, "GET", "/crm/records/c-1")
        .without("x-original-host")
        .send(&s)
        .await;
    assert_eq!((st, v["decision"].as_str()), (200, Some("allow")), "{v}");
    s.shutdown().await;
}

/// Each endpoint trusts its own proxy's headers only: an agent can send any header through
/// a proxy that does not overwrite it, so another proxy's family is never read.
#[tokio::test]
async fn headers_of_another_proxy_are_never_read() {
    let s = TestServer::start(&example_config(&[])).await;
    let allowed = "/crm/records/c-1";
    let forged_traefik = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", allowed),
        ("x-forwarded-host", "api.example.com"),
    ];
    let forged_nginx = [
        ("x-original-method", "GET"),
        ("x-original-uri", allowed),
        ("x-original-host", "api.example.com"),
    ];
    // nginx asks about a shell; Traefik's headers name an allowed read: the shell is denied.
    let mut ask = Ask::new(Proxy::Nginx, "POST", "/shell/bash");
    for (n, v) in forged_traefik {
        ask = ask.header(n, v);
    }
    let (st, _, v) = ask.send(&s).await;
    assert_eq!(
        (st, v["reasons"][0]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    // Only Traefik's headers at the nginx endpoint: nothing to decide on.
    let (ask, headers) = Ask::new(Proxy::Nginx, "GET", allowed).with_only(&forged_traefik);
    let (st, _, v) = ask.send_raw(&s, headers).await;
    assert_eq!(
        (st, v["field"].as_str()),
        (400, Some("header x-original-method")),
        "{v}"
    );
    // And nginx's at Traefik's.
    let (ask, headers) = Ask::new(Proxy::Traefik, "GET", allowed).with_only(&forged_nginx);
    let (st, _, v) = ask.send_raw(&s, headers).await;
    assert_eq!(
        (st, v["field"].as_str()),
        (400, Some("header x-forwarded-method")),
        "{v}"
    );
    // Envoy's original request is the request itself: both families are ignored.
    let mut ask = Ask::new(Proxy::Envoy, "POST", "/shell/bash");
    for (n, v) in forged_traefik.iter().chain(&forged_nginx) {
        ask = ask.header(n, v);
    }
    let (st, _, v) = ask.send(&s).await;
    assert_eq!(
        (st, v["reasons"][0]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    s.shutdown().await;
}

/// SECURITY J-22 for forwarded bodies: a key given twice is refused with its path, since
/// the upstream may read the other value than the one decided on.
#[tokio::test]
async fn j22_duplicate_keys_in_a_forwarded_body_are_refused() {
    let s = TestServer::start(&example_config(&[])).await;
    for proxy in PROXIES {
        let mut ask = Ask::new(proxy, "POST", "/accounts/acct-1/transfers");
        ask.body = Some(r#"{"amount": 50, "amount": 20000}"#.into());
        let (st, h, v) = ask.send(&s).await;
        assert_eq!(
            (st, v["field"].as_str()),
            (400, Some("amount")),
            "{proxy:?}: {v}"
        );
        assert_eq!(header(&h, "x-mandate-decision-id"), None);
    }
    s.shutdown().await;
}

/// Paths, headers and query parameters that the upstream could read otherwise are refused;
/// an encoded path is matched as decoded, so it cannot slip past its rule.
#[tokio::test]
async fn ambiguous_requests_are_refused_and_encoded_paths_match_their_rule() {
    let s = TestServer::start(&example_config(&[])).await;
    let (st, _, v) = Ask::new(Proxy::Nginx, "POST", "/accounts/acct-1/../acct-2/transfers")
        .json(json!({"amount": 50}))
        .send(&s)
        .await;
    assert_eq!((st, v["field"].as_str()), (400, Some("path")), "{v}");
    let (st, _, v) = Ask::new(Proxy::Traefik, "POST", "/acc%6Funts/acct-1/transfers")
        .json(json!({"amount": 20_000}))
        .send(&s)
        .await;
    assert_eq!(
        (st, v["reasons"][0]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let ask = Ask::new(Proxy::Nginx, "GET", "/crm/records/c-1");
    let mut headers = ask.proxy_headers();
    headers.push(("x-original-uri".into(), "/shell/bash".into()));
    let (st, _, v) = ask.send_raw(&s, headers).await;
    assert_eq!(
        (st, v["field"].as_str()),
        (400, Some("header x-original-uri")),
        "{v}"
    );
    // A body of another type is not what the transfer rule reads.
    let resp = s
        .client
        .post(s.url("/authz/envoy/accounts/acct-1/transfers"))
        .bearer_auth(agent())
        .header("content-type", "text/plain")
        .body(r#"{"amount": 50}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    s.shutdown().await;
}

/// An escalation through forward auth is an approval request like any: once approved, the
/// same request through the proxy is allowed by its grant; another amount asks again.
#[tokio::test]
async fn escalate_then_approve_then_the_same_request_is_allowed() {
    let s = TestServer::start(&example_config(&[])).await;
    let ask = |amount: i64| {
        Ask::new(Proxy::Traefik, "POST", "/accounts/acct-7/transfers")
            .json(json!({"amount": amount}))
    };
    let (st, h, _) = ask(250).send(&s).await;
    assert_eq!(st, 403);
    let id = header(&h, "x-mandate-approval-id").unwrap().to_owned();
    let (st, v) = common::finance_approve(&s, &id, "FIN-9").await;
    assert_eq!(st, 200, "{v}");
    for proxy in PROXIES {
        let (st, h, v) = Ask::new(proxy, "POST", "/accounts/acct-7/transfers")
            .json(json!({"amount": 250}))
            .send(&s)
            .await;
        assert_eq!(st, 200, "{proxy:?}: {v}");
        assert_eq!(v["reasons"][0]["code"], "granted", "{v}");
        assert_eq!(v["grant"]["approval_request"], id.as_str());
        assert_eq!(
            header(&h, "x-mandate-principal"),
            Some("Agent::\"agent-1\"")
        );
    }
    let (st, h, _) = ask(300).send(&s).await;
    assert_eq!(st, 403);
    assert_ne!(header(&h, "x-mandate-approval-id"), Some(id.as_str()));
    s.shutdown().await;
}

/// A request no route names is denied (`no_route`), and that deny is a decision on record;
/// with `forward_auth.default_action` it is put to the policy as that action instead.
#[tokio::test]
async fn unrouted_requests_are_denied_and_recorded_or_take_the_default() {
    let s = TestServer::start(&example_config(&[])).await;
    let (st, h, v) = Ask::new(Proxy::Nginx, "DELETE", "/accounts/acct-1")
        .send(&s)
        .await;
    assert_eq!(
        (st, v["reasons"][0]["code"].as_str()),
        (403, Some("no_route")),
        "{v}"
    );
    let id = header(&h, "x-mandate-decision-id").unwrap();
    let log = std::fs::read_to_string(s.running.as_ref().unwrap().service.audit.path()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(id))
        .expect("the deny is recorded");
    assert!(line.contains("\"action\":\"http:DELETE\""), "{line}");
    assert!(line.contains("no_route"), "{line}");
    s.shutdown().await;

    let s = TestServer::start(&example_config(&[
        ("MANDATE_FORWARD_AUTH__DEFAULT_ACTION", "crm:read"),
        ("MANDATE_FORWARD_AUTH__DEFAULT_RESOURCE_TYPE", "CrmRecord"),
    ]))
    .await;
    let (st, _, v) = Ask::new(Proxy::Envoy, "GET", "/anything/else")
        .send(&s)
        .await;
    assert_eq!(
        (st, v["policy_ids"][0].as_str()),
        (200, Some("crm-read")),
        "{v}"
    );
    s.shutdown().await;
}

/// An enforcement point's own credential names no agent: forward auth decides only for the
/// agent whose token the proxy forwards.
#[tokio::test]
async fn an_enforcement_point_credential_is_not_an_agent() {
    use sha2::Digest as _;
    let path = repo().join("config/mandate.toml");
    let digest = hex::encode(sha2::Sha256::digest(b"gateway-secret"));
    let text = std::fs::read_to_string(&path).unwrap()
        + &format!(
            "\n[[enforcement_points]]\nname = \"gateway\"\ncredential_sha256 = \"{digest}\"\n"
        );
    let s = TestServer::start(&config_from(&text, &path, &[])).await;
    let (st, h, v) = Ask::new(Proxy::Nginx, "GET", "/crm/records/c-1")
        .token(Some("gateway-secret".into()))
        .send(&s)
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (401, Some("agent_token_required")),
        "{v}"
    );
    assert!(
        header(&h, "www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );
    s.shutdown().await;
}

/// Routes are checked against the bundle: at start (a configuration problem naming the rule
/// and its line) and at every reload (a bundle that drops what a route names is refused).
#[tokio::test]
async fn routes_the_bundle_does_not_declare_are_refused_at_start_and_reload() {
    let path = repo().join("config/mandate.toml");
    let example = std::fs::read_to_string(&path).unwrap();
    let text = example.clone()
        + "\n[[routes]]\nname = \"typo\"\nmethod = \"GET\"\npath = \"/x\"\n\
           action = \"crm:raed\"\nresource = { type = \"CrmRecord\", id = \"x\" }\n";
    let line = text.lines().count() - 1;
    let cfg = config_from(&text, &path, &[]);
    let err = mandate::app::start(&cfg, mandate::clock::system())
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains(&format!(
            "config/mandate.toml:{line}: routes[4].action: route `typo`: action `crm:raed` is not declared"
        )),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    common::copy_dir(&repo().join("config/policies"), &bundle);
    let cfg = example_config(&[("MANDATE_POLICY__BUNDLE", bundle.to_str().unwrap())]);
    let s = TestServer::start(&cfg).await;
    // Drop `crm:export` (its policy too, so the bundle itself stays valid).
    let schema = std::fs::read_to_string(bundle.join("schema.cedarschema")).unwrap();
    std::fs::write(
        bundle.join("schema.cedarschema"),
        schema.replace(
            "action \"crm:read\", \"crm:export\" appliesTo",
            "action \"crm:read\" appliesTo",
        ),
    )
    .unwrap();
    let crm = std::fs::read_to_string(bundle.join("crm.cedar")).unwrap();
    let export = crm.find("@id(\"crm-export\")").unwrap();
    std::fs::write(bundle.join("crm.cedar"), &crm[..export]).unwrap();
    mandate::policy::Bundle::load(&bundle).expect("the bundle alone is valid");
    let err = s
        .running
        .as_ref()
        .unwrap()
        .reload()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routes[2].action: action `crm:export` is not declared"),
        "{err}"
    );
    let (st, _, v) = Ask::new(Proxy::Nginx, "POST", "/crm/records/c-1/export")
        .send(&s)
        .await;
    assert_eq!((st, v["decision"].as_str()), (403, Some("escalate")), "{v}");
    s.shutdown().await;
}

/// `[forward_auth]` names the headers and the escalation status; `server.public_url` makes
/// the approval URL absolute.
#[tokio::test]
async fn header_names_escalation_status_and_public_url_are_configurable() {
    let s = TestServer::start(&example_config(&[
        ("MANDATE_FORWARD_AUTH__DECISION_HEADER", "X-Decision"),
        ("MANDATE_FORWARD_AUTH__PRINCIPAL_HEADER", "X-Agent"),
        ("MANDATE_FORWARD_AUTH__APPROVAL_ID_HEADER", "X-Approval"),
        (
            "MANDATE_FORWARD_AUTH__APPROVAL_URL_HEADER",
            "X-Approval-Url",
        ),
        ("MANDATE_FORWARD_AUTH__ESCALATE_STATUS", "429"),
        ("MANDATE_SERVER__PUBLIC_URL", "https://mandate.example.com/"),
    ]))
    .await;
    let ask = |amount: i64| {
        Ask::new(Proxy::Envoy, "POST", "/accounts/acct-1/transfers").json(json!({"amount": amount}))
    };
    let (st, h, v) = ask(50).send(&s).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(header(&h, "x-agent"), Some("Agent::\"agent-1\""));
    assert_eq!(header(&h, "x-decision"), v["decision_id"].as_str());
    assert_eq!(header(&h, "x-mandate-principal"), None);
    let (st, h, v) = ask(250).send(&s).await;
    assert_eq!(st, 429, "{v}");
    let id = v["approval_request"]["id"].as_str().unwrap();
    assert_eq!(header(&h, "x-approval"), Some(id));
    assert_eq!(
        header(&h, "x-approval-url"),
        Some(format!("https://mandate.example.com/v1/approvals/{id}").as_str())
    );
    s.shutdown().await;
}
