//! Tokens minted independently by PyJWT and `cryptography` (keys Mandate never generated),
//! verified by the real server: valid SPIFFE, Kubernetes and OIDC tokens are allowed, and
//! every rejection class of the identity pipeline answers 401 naming its reason. Each case
//! names the docs/security.md id it covers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::collections::BTreeMap;

use common::{TestServer, config_from, python};
use serde_json::json;

/// Generates keys, writes the JWKS files into argv[1], prints `{case: token}` as JSON.
const MINT: &str = r#"
import base64, json, sys, time
import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

out = sys.argv[1]
now = int(time.time())

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def int_b64(n):
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

def ec_jwk(key, kid):
    nums = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": b64(nums.x.to_bytes(32, "big")), "y": b64(nums.y.to_bytes(32, "big"))}

def rsa_jwk(key, kid, alg="RS256"):
    nums = key.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "alg": alg, "use": "sig", "n": int_b64(nums.n), "e": int_b64(nums.e)}

es = ec.generate_private_key(ec.SECP256R1())
rogue = ec.generate_private_key(ec.SECP256R1())
rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)

json.dump({"keys": [ec_jwk(es, "es-1"), rsa_jwk(rs, "rs-1"), rsa_jwk(weak, "weak-1")]},
          open(out + "/oidc-jwks.json", "w"))
json.dump({"keys": [ec_jwk(es, "svid-1")]}, open(out + "/spiffe-jwks.json", "w"))
json.dump({"keys": [rsa_jwk(rs, "k8s-1")]}, open(out + "/k8s-jwks.json", "w"))

OIDC = "https://idp.peer.test"
base = {"iss": OIDC, "aud": "mandate", "sub": "agent-py", "iat": now, "exp": now + 300}

def es256(claims, headers=None, kid="es-1", key=es):
    h = {"kid": kid}
    h.update(headers or {})
    return jwt.encode(claims, key, algorithm="ES256", headers=h)

def raw_es256(header_json, payload_json, key=es):
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    signing_input = b64(header_json.encode()) + "." + b64(payload_json.encode())
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

rs_pub_pem = rs.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
import hmac, hashlib
def hs256_with(secret, claims):
    h = b64(json.dumps({"alg": "HS256", "kid": "rs-1", "typ": "JWT"}).encode())
    p = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, (h + "." + p).encode(), hashlib.sha256).digest()
    return h + "." + p + "." + b64(sig)

none_token = b64(json.dumps({"alg": "none"}).encode()) + "." + b64(json.dumps(base).encode()) + "."

SPIFFE = "https://spire.peer.test"
svid = {"iss": SPIFFE, "aud": ["mandate"], "sub": "spiffe://example.org/ns/prod/sa/payments",
        "iat": now, "exp": now + 300}
K8S = "https://kubernetes.default.svc"
k8s = {"iss": K8S, "aud": ["mandate"], "sub": "system:serviceaccount:prod:payments", "iat": now,
       "exp": now + 600, "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "payments", "uid": "u1"},
                                          "pod": {"name": "payments-7d9f", "uid": "p1"}}}

cases = {
    "valid_es256": es256(base),
    "valid_rs256": jwt.encode(base, rs, algorithm="RS256", headers={"kid": "rs-1"}),
    "valid_spiffe": jwt.encode(svid, es, algorithm="ES256", headers={"kid": "svid-1", "typ": "JWT"}),
    "valid_k8s": jwt.encode(k8s, rs, algorithm="RS256", headers={"kid": "k8s-1"}),
    "j01_alg_none": none_token,
    "j03_hs256_with_rsa_public_key": hs256_with(rs_pub_pem, base),
    "j07_jku_header": es256(base, {"jku": "http://127.0.0.1:9/jwks"}),
    "j09_embedded_jwk": es256(base, {"jwk": ec_jwk(es, "es-1")}),
    "j11_crit_header": es256(base, {"crit": ["exp"]}),
    "j14_expired": es256(dict(base, iat=now - 7200, exp=now - 3600)),
    "j14_missing_exp": es256({k: v for k, v in base.items() if k != "exp"}),
    "j14_float_exp": raw_es256('{"alg":"ES256","kid":"es-1"}', json.dumps(dict(base, exp=now + 300.5))),
    "j15_nbf_future": es256(dict(base, nbf=now + 3600, exp=now + 7200)),
    "j16_iat_future": es256(dict(base, iat=now + 3600, exp=now + 3700)),
    "j16_lifetime_excessive": es256(dict(base, exp=now + 90 * 86400)),
    "j18_unknown_issuer": es256(dict(base, iss="https://evil.example")),
    "j18_issuer_trailing_slash": es256(dict(base, iss=OIDC + "/")),
    "j19_wrong_audience": es256(dict(base, aud="someone-else")),
    "j19_missing_audience": es256({k: v for k, v in base.items() if k != "aud"}),
    "j20_bad_spiffe_id": jwt.encode(dict(svid, sub="spiffe://other.org/ns/prod"), es, algorithm="ES256",
                                    headers={"kid": "svid-1"}),
    "j20_spiffe_dot_segment": jwt.encode(dict(svid, sub="spiffe://example.org/ns/../admin"), es,
                                         algorithm="ES256", headers={"kid": "svid-1"}),
    "j21_k8s_claims_missing": jwt.encode({k: v for k, v in k8s.items() if k != "kubernetes.io"}, rs,
                                         algorithm="RS256", headers={"kid": "k8s-1"}),
    "j22_duplicate_claim": raw_es256('{"alg":"ES256","kid":"es-1"}',
                                     json.dumps(base)[:-1] + ', "sub": "admin"}'),
    "j22_duplicate_header": raw_es256('{"alg":"ES256","kid":"es-1","kid":"es-1"}', json.dumps(base)),
    "j29_zero_signature": es256(base).rsplit(".", 1)[0] + "." + b64(bytes(64)),
    "j31_weak_rsa_key": jwt.encode(base, weak, algorithm="RS256", headers={"kid": "weak-1"}),
    "j34_stripped_signature": es256(base).rsplit(".", 1)[0] + ".",
    "j36_k8s_token_on_spiffe_issuer": jwt.encode(dict(k8s, iss=SPIFFE), es, algorithm="ES256",
                                                 headers={"kid": "svid-1"}),
    "bad_signature_rogue_key": es256(base, key=rogue),
    "unknown_kid": es256(base, kid="es-404"),
}
print(json.dumps(cases))
"#;

fn config(dir: &std::path::Path) -> mandate::config::Config {
    let text = format!(
        r#"
[policy]
bundle = "{bundle}"

[[issuers]]
name = "peer-oidc"
issuer = "https://idp.peer.test"
profile = "oidc"
audiences = ["mandate"]
algorithms = ["ES256", "RS256"]
jwks_file = "oidc-jwks.json"
max_lifetime = "24h"

[[issuers]]
name = "peer-spire"
issuer = "https://spire.peer.test"
profile = "spiffe"
trust_domain = "example.org"
audiences = ["mandate"]
algorithms = ["ES256"]
jwks_file = "spiffe-jwks.json"

[[issuers]]
name = "peer-k8s"
issuer = "https://kubernetes.default.svc"
profile = "kubernetes"
audiences = ["mandate"]
algorithms = ["RS256"]
jwks_file = "k8s-jwks.json"
"#,
        bundle = common::repo().join("config/policies").display()
    );
    config_from(&text, &dir.join("peer.toml"), &[])
}

#[tokio::test]
async fn pyjwt_tokens_allowed_and_every_rejection_named() {
    let dir = tempfile::tempdir().unwrap();
    let minted = python(MINT, &[dir.path().to_str().unwrap()]);
    let tokens: BTreeMap<String, String> = serde_json::from_str(&minted).unwrap();
    let s = TestServer::start(&config(dir.path())).await;
    // crm:read is within every agent's authority in the example bundle.
    let read = |principal: &str| {
        json!({"subject": {"type": "Agent", "id": principal},
               "action": "crm:read", "resource": {"type": "CrmRecord", "id": "c-1"}})
    };
    for (case, principal) in [
        ("valid_es256", "agent-py"),
        ("valid_rs256", "agent-py"),
        ("valid_spiffe", "spiffe://example.org/ns/prod/sa/payments"),
        ("valid_k8s", "system:serviceaccount:prod:payments"),
    ] {
        let (st, v) = s
            .post("/v1/check", Some(&tokens[case]), &read(principal))
            .await;
        assert_eq!(
            (st, v["decision"].clone()),
            (200, json!("allow")),
            "{case}: {v}"
        );
    }
    let expected: &[(&str, &[&str])] = &[
        ("j01_alg_none", &["alg_not_allowed"]),
        ("j03_hs256_with_rsa_public_key", &["alg_not_allowed"]),
        ("j07_jku_header", &["header_param_forbidden"]),
        ("j09_embedded_jwk", &["header_param_forbidden"]),
        ("j11_crit_header", &["header_param_forbidden"]),
        ("j14_expired", &["token_expired"]),
        ("j14_missing_exp", &["claims_invalid"]),
        ("j14_float_exp", &["claims_invalid"]),
        ("j15_nbf_future", &["token_not_yet_valid"]),
        (
            "j16_iat_future",
            &["token_not_yet_valid", "token_lifetime_excessive"],
        ),
        ("j16_lifetime_excessive", &["token_lifetime_excessive"]),
        ("j18_unknown_issuer", &["issuer_unknown"]),
        ("j18_issuer_trailing_slash", &["issuer_unknown"]),
        ("j19_wrong_audience", &["aud_mismatch"]),
        ("j19_missing_audience", &["claims_invalid", "aud_mismatch"]),
        ("j20_bad_spiffe_id", &["sub_invalid"]),
        ("j20_spiffe_dot_segment", &["sub_invalid"]),
        ("j21_k8s_claims_missing", &["profile_violation"]),
        ("j22_duplicate_claim", &["claims_invalid"]),
        ("j22_duplicate_header", &["header_invalid"]),
        ("j29_zero_signature", &["signature_invalid"]),
        ("j31_weak_rsa_key", &["key_unknown"]),
        ("j34_stripped_signature", &["token_malformed"]),
        (
            "j36_k8s_token_on_spiffe_issuer",
            &["sub_invalid", "profile_violation"],
        ),
        ("bad_signature_rogue_key", &["signature_invalid"]),
        ("unknown_kid", &["key_unknown"]),
    ];
    for (case, codes) in expected {
        let body = json!({"action": "crm:read", "resource": {"type": "CrmRecord", "id": "c-1"}});
        let (st, v) = s.post("/v1/check", Some(&tokens[*case]), &body).await;
        assert_eq!(st, 401, "{case}: {v}");
        let code = v["error"].as_str().unwrap_or_default();
        assert!(
            codes.contains(&code),
            "{case}: expected one of {codes:?}, got {v}"
        );
        assert!(
            !v["message"].as_str().unwrap_or_default().is_empty(),
            "{case}: {v}"
        );
    }
    s.shutdown().await;
}
