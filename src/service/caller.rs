//! Who is calling: an agent proving itself with its own workload token, or a trusted
//! enforcement point (PEP) that may name the subject of a check (docs/design.md §2).
//!
//! An agent's subject is always its token's; a request in which an agent names another
//! subject is refused, so a compromised agent cannot ask on someone else's behalf.

use std::sync::Arc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::Service;
use crate::identity::IdentityError;
use crate::policy::values::ValueError;
use crate::strict_json::shown;
use crate::vocabulary::Principal;

#[derive(Debug, Clone)]
pub enum Caller {
    /// A workload that proved who it is; checks are about this principal only.
    Agent(Arc<Principal>),
    /// A configured enforcement point; it names subjects.
    EnforcementPoint { name: String },
}

impl Caller {
    /// How the audit trail names the caller of an action.
    pub fn name(&self) -> String {
        match self {
            Caller::Agent(p) => p.id.clone(),
            Caller::EnforcementPoint { name } => format!("pep:{name}"),
        }
    }
}

/// A subject named in a request: `type`, `id` and the properties the caller describes it with.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub kind: &'a str,
    pub id: &'a str,
    pub properties: &'a Map<String, Value>,
}

/// Why a request may not be about the subject it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error(
        "an agent may only ask about itself: the token is for `{token}`, the request names `{named}`"
    )]
    Mismatch { token: String, named: String },
    #[error("is required: enforcement point `{pep}` must name the subject")]
    Missing { pep: String },
    /// The properties an enforcement point gave cannot be Cedar values.
    #[error("{0}")]
    Properties(ValueError),
}

impl Service {
    /// Authenticate a caller from the one bearer credential it sent (if any) and the URI SANs
    /// of its verified client certificate (mTLS). Every refusal is an identity error: the
    /// adapter answers it as failed authentication, never as a decision.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        client_uri_sans: &[String],
    ) -> Result<Caller, IdentityError> {
        if let Some(pep) = self.enforcement_points.iter().find(|p| {
            p.mtls_uri_sans
                .iter()
                .any(|san| client_uri_sans.iter().any(|c| c == san))
        }) {
            // An mTLS-identified enforcement point must not also send a credential of its
            // own kind; a bearer it forwards would be ambiguous.
            if token.is_some() {
                return Err(IdentityError::Ambiguous);
            }
            return Ok(Caller::EnforcementPoint {
                name: pep.name.clone(),
            });
        }
        let Some(token) = token else {
            return Err(IdentityError::Missing);
        };
        if self
            .enforcement_points
            .iter()
            .any(|p| p.credential_sha256.is_some())
        {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if let Some(pep) = self.enforcement_points.iter().find(|p| {
                p.credential_sha256.is_some_and(|want| {
                    aws_lc_rs::constant_time::verify_slices_are_equal(&want, &digest).is_ok()
                })
            }) {
                return Ok(Caller::EnforcementPoint {
                    name: pep.name.clone(),
                });
            }
        }
        let principal = self.verifier.verify(token).await?;
        if let Some(pep) = self
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
}

/// An identity a proxy asserts about the request it asks about, rather than a credential the
/// agent presents.
#[derive(Debug)]
pub enum Asserted<'a> {
    /// The claims Envoy's `jwt_authn` filter verified (its `payload_in_metadata`).
    JwtAuthn(Map<String, Value>),
    /// The SPIFFE ID of the mTLS peer Envoy verified, read with SPIFFE issuer `issuer`.
    Peer { issuer: &'a str, spiffe_id: &'a str },
}

impl Service {
    /// The agent a proxy asserts, believed only when `by` (the caller of the API the
    /// assertion came on) is an authenticated enforcement point: an identity taken from an
    /// unauthenticated message is no identity (cf. SECURITY A-25), since any process that
    /// can reach the listener could write one. The asserted claims then pass every check
    /// after the signature, as a token's do.
    pub fn asserted_agent(
        &self,
        by: Result<&Caller, &String>,
        what: Asserted<'_>,
    ) -> Result<Arc<Principal>, IdentityError> {
        let source = match &what {
            Asserted::JwtAuthn(_) => "a `jwt_authn` payload",
            Asserted::Peer { .. } => "a peer principal",
        };
        match by {
            Ok(Caller::EnforcementPoint { .. }) => {}
            Ok(Caller::Agent(p)) => {
                return Err(IdentityError::AssertionUntrusted(format!(
                    "{source} is believed only from an enforcement point; the call's \
                     credential is agent `{}`'s",
                    shown(&p.id)
                )));
            }
            Err(e) => {
                return Err(IdentityError::AssertionUntrusted(format!(
                    "{source} is believed only from an enforcement point, and the call's \
                     credential is not one: {e}"
                )));
            }
        }
        let principal = match what {
            Asserted::JwtAuthn(claims) => self.verifier.principal_from_verified_claims(claims)?,
            Asserted::Peer { issuer, spiffe_id } => {
                self.verifier.peer_principal(issuer, spiffe_id)?
            }
        };
        Ok(Arc::new(principal))
    }
}

/// The principal a check is about. Agents: their own (naming anyone else is refused;
/// properties they send about themselves are ignored, their verified claims count).
/// Enforcement points: the subject they name, with its properties.
pub fn subject_principal(
    caller: &Caller,
    subject: Option<Subject<'_>>,
) -> Result<Arc<Principal>, SubjectError> {
    match (caller, subject) {
        (Caller::Agent(p), None) => Ok(p.clone()),
        (Caller::Agent(p), Some(s)) => {
            if s.kind == p.kind && s.id == p.id {
                Ok(p.clone())
            } else {
                Err(SubjectError::Mismatch {
                    token: format!("{}::{}", p.kind, p.id),
                    named: format!("{}::{}", s.kind, s.id),
                })
            }
        }
        (Caller::EnforcementPoint { name }, Some(s)) => {
            Principal::from_parts(s.kind, s.id, &format!("pep:{name}"), s.properties.clone())
                .map(Arc::new)
                .map_err(SubjectError::Properties)
        }
        (Caller::EnforcementPoint { name }, None) => {
            Err(SubjectError::Missing { pep: name.clone() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_naming_another_subject_is_refused() {
        let p = Arc::new(Principal::from_parts("Agent", "agent-1", "dev", Map::new()).unwrap());
        let caller = Caller::Agent(p);
        let props = Map::new();
        let other = Subject {
            kind: "Agent",
            id: "agent-2",
            properties: &props,
        };
        assert!(matches!(
            subject_principal(&caller, Some(other)),
            Err(SubjectError::Mismatch { .. })
        ));
        let same = Subject {
            id: "agent-1",
            ..other
        };
        assert_eq!(
            subject_principal(&caller, Some(same)).unwrap().id,
            "agent-1"
        );
    }
}
