//! The HTTP side of caller authentication: the one `Authorization: Bearer` credential and the
//! connection's client certificate, handed to the service, which decides who is calling
//! ([`crate::service::caller`]).

use std::sync::Arc;

use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, StatusCode};

use super::body::EntityRef;
use super::{ApiError, AppState, ConnInfo};
use crate::identity::IdentityError;
pub use crate::service::Caller;
use crate::service::Subject;
use crate::service::caller::subject_principal as principal_for;
use crate::vocabulary::Principal;

/// Exactly one `Authorization: Bearer` credential (SECURITY J-39: two credentials are
/// ambiguous and refused, whatever they are).
pub(super) fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(IdentityError::Ambiguous.into());
    }
    let text = first.to_str().map_err(|_| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_malformed",
            "the `Authorization` header is not visible ASCII",
        )
    })?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_malformed",
            "the `Authorization` header must use the `Bearer` scheme",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(IdentityError::Missing.into());
    }
    Ok(Some(token))
}

/// Authenticate the caller of any API: its bearer credential and client certificate, as the
/// service judges them. A refusal is counted for the summary line.
pub async fn authenticate(
    state: &AppState,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let caller = match bearer(headers) {
        Ok(token) => state
            .service
            .authenticate(token, &conn.client_uri_sans)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    if caller.is_err() {
        state.service.stats.token_rejected();
    }
    caller
}

/// The principal a check is about, for a request whose subject (if any) is at `field`.
pub fn subject_principal(
    caller: &Caller,
    subject: Option<&EntityRef>,
    field: &str,
) -> Result<Arc<Principal>, ApiError> {
    let subject = subject.map(|s| Subject {
        kind: &s.kind,
        id: &s.id,
        properties: &s.properties,
    });
    principal_for(caller, subject).map_err(|e| ApiError::subject(e, field))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use serde_json::Map;

    #[test]
    fn j39_two_authorization_headers_are_ambiguous() {
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer a.b.c"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer d.e.f"));
        assert_eq!(bearer(&h).unwrap_err().code, "token_ambiguous");
    }

    #[test]
    fn bearer_scheme_is_required() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h).unwrap_err().code, "token_malformed");
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer   x.y.z "));
        assert_eq!(bearer(&h).unwrap(), Some("x.y.z"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h).unwrap_err().code, "token_missing");
    }

    #[test]
    fn agent_naming_another_subject_is_a_403_at_its_field() {
        let p = Arc::new(Principal::from_parts("Agent", "agent-1", "dev", Map::new()).unwrap());
        let caller = Caller::Agent(p);
        let other = EntityRef {
            kind: "Agent".into(),
            id: "agent-2".into(),
            properties: Map::new(),
        };
        let e = subject_principal(&caller, Some(&other), "subject").unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, "subject_mismatch")
        );
        let same = EntityRef {
            id: "agent-1".into(),
            ..other
        };
        assert_eq!(
            subject_principal(&caller, Some(&same), "subject")
                .unwrap()
                .id,
            "agent-1"
        );
    }
}
