//! Forward auth: the endpoints a proxy calls before it lets a request through to its
//! upstream (issue 12). One per proxy, each reading only the headers its own proxy sets, so
//! a header an agent could send through another proxy is never believed:
//!
//! - `/authz/envoy/<original path>`: Envoy `ext_authz` in HTTP mode with `path_prefix:
//!   /authz/envoy`. The original method is this request's method, the original path and
//!   query string follow the prefix, the host is `Host` (`:authority`).
//! - `/authz/nginx`: nginx `auth_request`. `X-Original-Method`, `X-Original-URI` and
//!   `X-Original-Host` (else `Host`).
//! - `/authz/traefik`: Traefik ForwardAuth. `X-Forwarded-Method`, `X-Forwarded-Uri`,
//!   `X-Forwarded-Host`.
//!
//! The agent is the forwarded `Authorization: Bearer` token, verified like every token.
//! [`crate::routes`] maps the original request to a check, the service decides and records
//! it, and the answer is in the statuses a proxy acts on: `200` allow (with headers for the
//! upstream), `403` deny, `403` (`forward_auth.escalate_status`) with the approval request
//! on an escalation, `401` for a token that does not verify, `400` for a request that cannot
//! be routed without doubt (a required header missing or repeated, an ambiguous path).
//! Fail closed: nothing but an allow is a 2xx, and a proxy treats any other status as a
//! refusal.

use crate::metrics::Api;
use crate::service::Call;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue, WWW_AUTHENTICATE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::Value;

use super::caller::{Caller, authenticate};
use super::http::decision_response;
use super::{ApiError, AppState, Body, ConnInfo, body};
use crate::config::ForwardAuthConfig;
use crate::routes::{self, Headers as _, Inputs, Lookup, Match, Matched, RouteError, Routed};
use crate::service::Settled;
use crate::vocabulary::{CheckRequest, Outcome, Principal, Reason};

/// Envoy's HTTP-mode answer header listing request headers to remove before the request
/// goes upstream (the gRPC mode's `headers_to_remove`).
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// Envoy's `path_prefix`: the original path follows it.
pub const ENVOY_PREFIX: &str = "/authz/envoy";
pub const NGINX: &str = "/authz/nginx";
pub const TRAEFIK: &str = "/authz/traefik";

/// Which proxy is asking, by the endpoint it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Envoy,
    Nginx,
    Traefik,
}

impl Proxy {
    /// The proxy whose endpoint `path` is, if any.
    pub fn of(path: &str) -> Option<Proxy> {
        match path {
            NGINX => Some(Proxy::Nginx),
            TRAEFIK => Some(Proxy::Traefik),
            p if p == ENVOY_PREFIX || p.starts_with("/authz/envoy/") => Some(Proxy::Envoy),
            _ => None,
        }
    }
}

/// The answer's headers and escalation status, built once from `[forward_auth]`.
#[derive(Debug, Clone)]
pub struct Settings {
    decision: HeaderName,
    principal: HeaderName,
    approval_id: HeaderName,
    approval_url: HeaderName,
    escalate_status: StatusCode,
    /// `forward_auth.strip_authorization`.
    strip_authorization: bool,
    /// `server.public_url`: the approval URL is absolute when it is set.
    public_url: String,
}

impl Settings {
    /// From the validated configuration (a name or status it refused cannot reach here).
    pub fn new(c: &ForwardAuthConfig, public_url: Option<&str>) -> Result<Self, String> {
        let name =
            |n: &str| HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("`{n}`: {e}"));
        Ok(Self {
            decision: name(&c.decision_header)?,
            principal: name(&c.principal_header)?,
            approval_id: name(&c.approval_id_header)?,
            approval_url: name(&c.approval_url_header)?,
            escalate_status: StatusCode::from_u16(c.escalate_status)
                .map_err(|e| format!("escalate_status: {e}"))?,
            strip_authorization: c.strip_authorization,
            public_url: public_url.unwrap_or_default().to_owned(),
        })
    }
}

/// The original request, as its proxy describes it.
#[derive(Debug)]
pub(super) struct Original {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: Option<String>,
    pub(super) host: Option<String>,
}

/// Decide the request `proxy` asks about, and answer in its terms.
pub async fn check(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
    proxy: Proxy,
) -> Response<Body> {
    match decide(state, conn, req, proxy).await {
        Ok((settled, principal)) => answer(&state.forward_auth, &settled, &principal),
        Err(e) => refusal(e),
    }
}

async fn decide(
    state: &AppState,
    conn: &ConnInfo,
    req: Request<Incoming>,
    proxy: Proxy,
) -> Result<(Settled, Arc<Principal>), ApiError> {
    let mut call = super::call_from(state, Api::ExtAuthzHttp, req.headers());
    let principal = agent(
        call.identify(authenticate(state, conn, req.headers()))
            .await?,
    )?;
    let original = original(proxy, &req)?;
    let found = state
        .routes
        .find(&original.method, original.host.as_deref(), &original.path)
        .map_err(route_error)?;
    let routed = resolve(state, proxy, &found, &original, req).await?;
    let settled = settle(state, &principal, &found.matched, routed, &original, call).await;
    Ok((settled, principal))
}

/// Decide the check a route produced, for either proxy mode (HTTP here, gRPC in
/// `ext_authz`). Fail closed: a request no rule maps to an action (and no default is
/// configured) is denied; the upstream gets only what a rule names. Recorded like any
/// decision.
pub(super) async fn settle(
    state: &AppState,
    principal: &Arc<Principal>,
    matched: &Matched<'_>,
    routed: Routed,
    original: &Original,
    call: Call,
) -> Settled {
    let req = CheckRequest {
        principal: principal.clone(),
        action: routed.action.clone(),
        action_properties: None,
        resource: routed.resource(),
        context: routed.context,
    };
    match matched {
        Matched::None => state.service.refuse(&req, no_route(original), call).await,
        Matched::Rule { .. } | Matched::Default(_) => state.service.check(&req, call).await,
    }
}

/// The check `found` maps the request to, reading the JSON body only when its rule does.
async fn resolve(
    state: &AppState,
    proxy: Proxy,
    found: &Match<'_>,
    original: &Original,
    req: Request<Incoming>,
) -> Result<Routed, ApiError> {
    let (parts, incoming) = req.into_parts();
    let json = match found.reads_body() {
        true => json_body(proxy, &parts.headers, incoming, state).await?,
        false => None,
    };
    let inputs = Inputs {
        headers: &parts.headers,
        query: original.query.as_deref(),
        body: json.as_ref(),
        extensions: None,
    };
    found.resolve(&inputs).map_err(route_error)
}

/// The agent the forwarded token proves. An enforcement point's own credential names no
/// agent here (there is no body to name a subject in): it is refused like a bad token.
pub(super) fn agent(caller: Caller) -> Result<Arc<Principal>, ApiError> {
    match caller {
        Caller::Agent(p) => Ok(p),
        Caller::EnforcementPoint { name } => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "agent_token_required",
            format!(
                "forward auth decides for the agent whose token the proxy forwards; the \
                 credential sent is enforcement point `{name}`'s"
            ),
        )),
    }
}

/// The original method, path, query and host, from the headers of `proxy` only.
fn original(proxy: Proxy, req: &Request<Incoming>) -> Result<Original, ApiError> {
    let h = req.headers();
    let (method, uri, host) = match proxy {
        Proxy::Envoy => envoy(req)?,
        Proxy::Nginx => {
            let host = match header(h, "x-original-host")? {
                Some(v) => Some(v),
                None => header(h, HOST.as_str())?,
            };
            (
                required(h, "x-original-method")?.to_owned(),
                required(h, "x-original-uri")?.to_owned(),
                host.map(str::to_owned),
            )
        }
        Proxy::Traefik => (
            required(h, "x-forwarded-method")?.to_owned(),
            required(h, "x-forwarded-uri")?.to_owned(),
            Some(required(h, "x-forwarded-host")?.to_owned()),
        ),
    };
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (uri, None),
    };
    Ok(Original {
        method,
        path,
        query,
        host,
    })
}

/// Envoy's HTTP mode: the request is the original one, its path behind the prefix.
fn envoy(req: &Request<Incoming>) -> Result<(String, String, Option<String>), ApiError> {
    let rest = req
        .uri()
        .path()
        .strip_prefix(ENVOY_PREFIX)
        .unwrap_or_default();
    if rest.is_empty() {
        return Err(ApiError::field(
            "path",
            format!("the original path follows `{ENVOY_PREFIX}` (Envoy's `path_prefix`)"),
        ));
    }
    let uri = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str().to_owned()),
        None => header(req.headers(), HOST.as_str())?.map(str::to_owned),
    };
    Ok((req.method().as_str().to_owned(), uri, host))
}

/// A header the proxy sets: its one value, if sent. Twice is ambiguous, and refused.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.lookup(name) {
        Lookup::Absent => Ok(None),
        Lookup::One(v) => Ok(Some(v)),
        Lookup::Repeated => Err(route_error(RouteError::RepeatedHeader(name.to_owned()))),
        Lookup::NotText => Err(route_error(RouteError::HeaderNotText(name.to_owned()))),
    }
}

/// A header the proxy must set: missing, the proxy is misconfigured, and nothing is allowed.
fn required<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    header(headers, name)?.ok_or_else(|| {
        ApiError::field(
            format!("header {name}"),
            format!("`{name}` is required: the proxy must set it"),
        )
    })
}

impl routes::Headers for HeaderMap {
    fn lookup(&self, name: &str) -> Lookup<'_> {
        let mut values = self.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Lookup::Absent,
            (Some(_), Some(_)) => Lookup::Repeated,
            (Some(v), None) => v.to_str().map_or(Lookup::NotText, Lookup::One),
        }
    }
}

/// The JSON body a rule reads: `None` when none was sent. Read within the server's size and
/// time limits and parsed strictly (a duplicate key is a `400`: the upstream might read the
/// other value). Its type must be JSON, or absent (Envoy forwards `content-type` only when
/// `allowed_headers` lists it); a body Envoy cut at `max_request_bytes` is refused, not read
/// in part.
async fn json_body(
    proxy: Proxy,
    headers: &HeaderMap,
    incoming: Incoming,
    state: &AppState,
) -> Result<Option<Value>, ApiError> {
    if headers.contains_key(CONTENT_TYPE) && !body::is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the route reads the JSON body: it must be `application/json`",
        ));
    }
    let partial = headers
        .get("x-envoy-auth-partial-body")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    if proxy == Proxy::Envoy && partial {
        return Err(ApiError::field(
            "(body)",
            "Envoy sent part of the body (`x-envoy-auth-partial-body`): the route reads it whole",
        ));
    }
    let bytes = body::read_limited(headers, incoming, &state.server).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    body::parse_value(&bytes).map(Some)
}

pub(super) fn route_error(e: RouteError) -> ApiError {
    ApiError::field(e.field(), e.to_string())
}

pub(super) fn no_route(original: &Original) -> Reason {
    Reason {
        code: routes::NO_ROUTE,
        policy_id: None,
        message: format!(
            "no route matches `{} {}`, and no `forward_auth.default_action` is configured",
            original.method, original.path
        ),
    }
}

/// The decision in the proxy's terms: the `/v1/check` body under `200` (allow), `403`
/// (deny) or the escalation status, with the decision id on each, the principal on an allow
/// and the approval request on an escalation.
pub(super) fn answer(s: &Settings, settled: &Settled, principal: &Principal) -> Response<Body> {
    let mut resp = decision_response(settled);
    let d = &settled.decision;
    let mut set = |name: &HeaderName, value: &str| match HeaderValue::from_str(value) {
        Ok(v) => {
            resp.headers_mut().insert(name.clone(), v);
            true
        }
        Err(_) => false,
    };
    set(&s.decision, &d.id.to_string());
    let status = match d.outcome {
        Outcome::Allow => {
            // Fail closed: an allow whose principal cannot be told to the upstream is not
            // given (the upstream would act for nobody it knows).
            if !set(&s.principal, &principal.entity.uid().to_string()) {
                return refusal(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the principal cannot be sent in a header",
                ));
            }
            if s.strip_authorization {
                // The upstream acts for the principal header; the agent's own token stays
                // with the proxy (nginx: `proxy_set_header Authorization ""`).
                resp.headers_mut().insert(
                    HeaderName::from_static(HEADERS_TO_REMOVE),
                    HeaderValue::from_static("authorization"),
                );
            }
            StatusCode::OK
        }
        Outcome::Deny => StatusCode::FORBIDDEN,
        Outcome::Escalate => {
            if let Some(a) = &settled.approval {
                set(&s.approval_id, &a.id.to_string());
                set(
                    &s.approval_url,
                    &format!("{}/v1/approvals/{}", s.public_url, a.id),
                );
            }
            s.escalate_status
        }
    };
    *resp.status_mut() = status;
    resp
}

/// A refusal before any decision; a `401` says how to authenticate (RFC 6750 §3: no error
/// code when no token was sent at all).
pub(super) fn refusal(e: ApiError) -> Response<Body> {
    let challenge = (e.status == StatusCode::UNAUTHORIZED).then(|| match e.code {
        // No credential was sent: a bare challenge (RFC 6750 §3.1).
        "token_missing" | super::mcp_wrap::LOCAL_UNKNOWN => "Bearer".to_owned(),
        code => format!("Bearer error=\"invalid_token\", error_description=\"{code}\""),
    });
    let mut resp = e.into_response();
    if let Some(v) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(WWW_AUTHENTICATE, v);
    }
    resp
}
