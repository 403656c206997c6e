//! Who is calling: an agent proving itself with its own workload token, or a trusted
//! enforcement point (PEP) that may name the subject of a check (shared/DESIGN.md §2).
//!
//! An agent's subject is always its token's; a request in which an agent names another
//! subject is refused, so a compromised agent cannot ask on someone else's behalf.

use std::sync::Arc;

use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::body::EntityRef;
use super::{ApiError, AppState, ConnInfo};
use crate::identity::{IdentityError, Principal};

#[derive(Debug, Clone)]
pub enum Caller {
    /// A workload that proved who it is; checks are about this principal only.
    Agent(Arc<Principal>),
    /// A configured enforcement point; it names subjects.
    EnforcementPoint { name: String },
}

/// Map an identity rejection to a 401 naming the reason.
pub fn identity_error(e: &IdentityError) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
}

/// Exactly one `Authorization: Bearer` credential (SECURITY J-39: two credentials are
/// ambiguous and refused, whatever they are).
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(identity_error(&IdentityError::Ambiguous));
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
        return Err(identity_error(&IdentityError::Missing));
    }
    Ok(Some(token))
}

/// Authenticate the caller of a decision API.
pub async fn authenticate(
    state: &AppState,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let token = bearer(headers)?;
    if let Some(pep) = state.enforcement_points.iter().find(|p| {
        p.mtls_uri_sans
            .iter()
            .any(|san| conn.client_uri_sans.iter().any(|c| c == san))
    }) {
        // An mTLS-identified enforcement point must not also send a credential of its own
        // kind; a bearer it forwards would be ambiguous.
        if token.is_some() {
            return Err(identity_error(&IdentityError::Ambiguous));
        }
        return Ok(Caller::EnforcementPoint {
            name: pep.name.clone(),
        });
    }
    let Some(token) = token else {
        return Err(identity_error(&IdentityError::Missing));
    };
    if state
        .enforcement_points
        .iter()
        .any(|p| p.credential_sha256.is_some())
    {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(pep) = state.enforcement_points.iter().find(|p| {
            p.credential_sha256.is_some_and(|want| {
                aws_lc_rs::constant_time::verify_slices_are_equal(&want, &digest).is_ok()
            })
        }) {
            return Ok(Caller::EnforcementPoint {
                name: pep.name.clone(),
            });
        }
    }
    let principal = state
        .verifier
        .verify(token)
        .await
        .map_err(|e| identity_error(&e))?;
    if let Some(pep) = state
        .enforcement_points
        .iter()
        .find(|p| p.token_subjects.iter().any(|s| s == &principal.id))
    {
        return Ok(Caller::EnforcementPoint {
            name: pep.name.clone(),
        });
    }
    Ok(Caller::Agent(principal))
}

/// The principal a check is about. Agents: their own (a `subject` naming anyone else is a
/// 403; properties they send about themselves are ignored, their verified claims count).
/// Enforcement points: the subject they name, with its properties.
pub fn subject_principal(
    caller: &Caller,
    subject: Option<&EntityRef>,
    field: &str,
) -> Result<Arc<Principal>, ApiError> {
    match (caller, subject) {
        (Caller::Agent(p), None) => Ok(p.clone()),
        (Caller::Agent(p), Some(s)) => {
            if s.kind == p.kind && s.id == p.id {
                Ok(p.clone())
            } else {
                Err(ApiError {
                    status: StatusCode::FORBIDDEN,
                    code: "subject_mismatch",
                    message: format!(
                        "an agent may only ask about itself: the token is for `{}::{}`, the request names `{}::{}`",
                        p.kind, p.id, s.kind, s.id
                    ),
                    field: Some(field.to_owned()),
                })
            }
        }
        (Caller::EnforcementPoint { name }, Some(s)) => {
            Principal::from_parts(&s.kind, &s.id, &format!("pep:{name}"), s.properties.clone())
                .map(Arc::new)
                .map_err(|e| ApiError::field(format!("{field}.properties"), e.to_string()))
        }
        (Caller::EnforcementPoint { name }, None) => Err(ApiError::field(
            field,
            format!("is required: enforcement point `{name}` must name the subject"),
        )),
    }
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
    fn agent_naming_another_subject_is_refused() {
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
