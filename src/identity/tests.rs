//! End-to-end tests of the verifier against docs/security.md §1 (J-xx tokens, K-xx key
//! sets): keys generated in-test, tokens signed by hand so every negative case can be built,
//! and a counting JWKS server on 127.0.0.1:0 for the URL cases.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair,
};
use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};

use super::jws::B64;
use super::*;
use crate::clock::ManualClock;

mod key_source;

const NOW: i64 = 1_700_000_000;
const ISS: &str = "https://issuer.example";
const TD: &str = "example.org";
const SUB: &str = "spiffe://example.org/ns/agents/sa/bot";

// ---------------------------------------------------------------------------------------
// keys and signing

struct Ec {
    kp: EcdsaKeyPair,
}

impl Ec {
    fn new() -> Self {
        Self {
            kp: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
        }
    }
    fn jwk(&self, kid: &str) -> Value {
        let p = self.kp.public_key().as_ref();
        json!({"kty":"EC","crv":"P-256","kid":kid,"alg":"ES256","use":"sig",
               "x":B64.encode(&p[1..33]),"y":B64.encode(&p[33..65])})
    }
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.kp
            .sign(&SystemRandom::new(), msg)
            .unwrap()
            .as_ref()
            .to_vec()
    }
}

fn rsa() -> &'static RsaKeyPair {
    static KEY: OnceLock<RsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap())
}

/// `(n, e)` from a DER `RSAPublicKey`.
fn rsa_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn read(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = b[0];
        let (len, hdr) = if b[1] < 0x80 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            (
                b[2..2 + n].iter().fold(0usize, |a, x| a << 8 | *x as usize),
                2 + n,
            )
        };
        (tag, &b[hdr..hdr + len], &b[hdr + len..])
    }
    let (_, seq, _) = read(der);
    let (_, n, rest) = read(seq);
    let (_, e, _) = read(rest);
    (n.to_vec(), e.to_vec())
}

fn rsa_jwk(kid: &str, alg: Option<&str>) -> Value {
    let (n, e) = rsa_components(rsa().public_key().as_ref());
    let mut j = json!({"kty":"RSA","kid":kid,"n":B64.encode(n),"e":B64.encode(e)});
    if let Some(a) = alg {
        j["alg"] = json!(a);
    }
    j
}

fn rsa_sign(msg: &[u8], pss: bool) -> Vec<u8> {
    let kp = rsa();
    let mut sig = vec![0u8; kp.public_modulus_len()];
    let enc: &'static dyn aws_lc_rs::signature::RsaEncoding = if pss {
        &RSA_PSS_SHA256
    } else {
        &RSA_PKCS1_SHA256
    };
    kp.sign(enc, &SystemRandom::new(), msg, &mut sig).unwrap();
    sig
}

enum Signer<'a> {
    Ec(&'a Ec),
    Rsa,
    Pss,
    Hmac(&'a [u8]),
    Raw(Vec<u8>),
}

/// Sign arbitrary header and payload text.
fn sign_raw(header: &str, payload: &str, signer: Signer<'_>) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = match signer {
        Signer::Ec(k) => k.sign(input.as_bytes()),
        Signer::Rsa => rsa_sign(input.as_bytes(), false),
        Signer::Pss => rsa_sign(input.as_bytes(), true),
        Signer::Hmac(secret) => {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            aws_lc_rs::hmac::sign(&key, input.as_bytes())
                .as_ref()
                .to_vec()
        }
        Signer::Raw(s) => s,
    };
    format!("{input}.{}", B64.encode(sig))
}

/// Standard claims for `iss`, with `over` merged in (`null` removes a claim).
fn claims_for(iss: &str, over: Value) -> String {
    let mut c = json!({"iss":iss,"aud":"mandate","sub":SUB,"iat":NOW,"exp":NOW + 300,"jti":"t-1"});
    if let (Value::Object(c), Value::Object(over)) = (&mut c, over) {
        for (k, v) in over {
            if v.is_null() {
                c.remove(&k);
            } else {
                c.insert(k, v);
            }
        }
    }
    c.to_string()
}

fn claims(over: Value) -> String {
    claims_for(ISS, over)
}

fn es_header(kid: &str) -> String {
    json!({"alg":"ES256","kid":kid}).to_string()
}

// ---------------------------------------------------------------------------------------
// issuers and verifiers

fn settings(name: &str, iss: &str, profile: Profile, jwks: Option<JwksSource>) -> IssuerSettings {
    IssuerSettings {
        name: name.into(),
        issuer: iss.into(),
        profile,
        audiences: vec!["mandate".into()],
        algorithms: vec![Algorithm::ES256, Algorithm::RS256, Algorithm::PS256],
        jwks,
        hmac_secret: None,
        leeway: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(3600),
        trust_domain: Some(TD.into()),
        principal_type: "Agent".into(),
        claims: BTreeMap::new(),
        typ: Vec::new(),
    }
}

fn jwks_file(keys: Vec<Value>) -> (tempfile::TempDir, JwksSource) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
    (dir, JwksSource::File(path))
}

struct Fixture {
    v: Verifier,
    clock: Arc<ManualClock>,
    ec: Ec,
    _dir: tempfile::TempDir,
}

/// One issuer with an EC key `ec-1` and an RSA key `rsa-1` (no `alg`) in a file.
fn fixture_with(profile: Profile, tweak: impl FnOnce(&mut IssuerSettings)) -> Fixture {
    let ec = Ec::new();
    let (dir, src) = jwks_file(vec![ec.jwk("ec-1"), rsa_jwk("rsa-1", None)]);
    let mut s = settings("main", ISS, profile, Some(src));
    tweak(&mut s);
    let clock = ManualClock::new(NOW);
    let v = Verifier::new(vec![s], CacheSettings::default(), clock.clone()).unwrap();
    Fixture {
        v,
        clock,
        ec,
        _dir: dir,
    }
}

fn fixture(profile: Profile) -> Fixture {
    fixture_with(profile, |_| {})
}

impl Fixture {
    fn token(&self, over: Value) -> String {
        sign_raw(&es_header("ec-1"), &claims(over), Signer::Ec(&self.ec))
    }
    fn token_h(&self, header: Value, over: Value) -> String {
        sign_raw(&header.to_string(), &claims(over), Signer::Ec(&self.ec))
    }
    async fn code(&self, token: &str) -> &'static str {
        match self.v.verify_uncached(token).await {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// a counting JWKS server

#[derive(Clone)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn keys(keys: Vec<Value>) -> Self {
        Self::body(200, json!({ "keys": keys }).to_string())
    }
    fn body(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            body: body.into(),
            headers: Vec::new(),
        }
    }
}

#[derive(Clone)]
struct Mock {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    reply: Arc<Mutex<Reply>>,
    /// Read the request, then never answer (a hung issuer, K-05).
    hang: Arc<AtomicBool>,
}

impl Mock {
    async fn start(reply: Reply) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock = Self {
            addr: listener.local_addr().unwrap(),
            hits: Arc::new(AtomicUsize::new(0)),
            reply: Arc::new(Mutex::new(reply)),
            hang: Arc::new(AtomicBool::new(false)),
        };
        let m = mock.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let m = m.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let m = m.clone();
                        async move {
                            m.hits.fetch_add(1, Ordering::SeqCst);
                            if m.hang.load(Ordering::SeqCst) {
                                std::future::pending::<()>().await;
                            }
                            let r = m.reply.lock().unwrap().clone();
                            let mut resp = hyper::Response::builder().status(r.status);
                            for (k, v) in r.headers {
                                resp = resp.header(k, v);
                            }
                            Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(r.body))).unwrap())
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        mock
    }
    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }
    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn url_source(url: &str, min_refetch: Duration) -> JwksSource {
    JwksSource::Url {
        url: url.into(),
        refresh: Duration::from_secs(300),
        min_refetch_interval: min_refetch,
        max_staleness: Duration::from_secs(3600),
        fetch_timeout: sources::FETCH_TIMEOUT,
        ca_file: None,
    }
}

fn url_verifier(url: &str, min_refetch: Duration) -> (Verifier, Arc<ManualClock>) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let s = settings(
        "remote",
        ISS,
        Profile::Oidc,
        Some(url_source(url, min_refetch)),
    );
    let clock = ManualClock::new(NOW);
    let v = Verifier::new(vec![s], CacheSettings::default(), clock.clone()).unwrap();
    (v, clock)
}

async fn code_of(v: &Verifier, token: &str) -> &'static str {
    match v.verify_uncached(token).await {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

/// The codes of `n` checks of `token` released at once by a barrier (K-02).
async fn concurrent_codes(v: &Verifier, token: &str, n: usize) -> Vec<&'static str> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (v, t, b) = (v.clone(), token.to_owned(), barrier.clone());
        tasks.spawn(async move {
            b.wait().await;
            code_of(&v, &t).await
        });
    }
    tasks.join_all().await
}

// ---------------------------------------------------------------------------------------
// happy paths

#[tokio::test]
async fn valid_tokens_verify_with_es256_rs256_and_ps256() {
    let f = fixture(Profile::Spiffe);
    assert_eq!(f.code(&f.token(json!({}))).await, "ok");
    let rs = sign_raw(
        &json!({"alg":"RS256","kid":"rsa-1"}).to_string(),
        &claims(json!({})),
        Signer::Rsa,
    );
    assert_eq!(f.code(&rs).await, "ok");
    let ps = sign_raw(
        &json!({"alg":"PS256","kid":"rsa-1"}).to_string(),
        &claims(json!({})),
        Signer::Pss,
    );
    assert_eq!(f.code(&ps).await, "ok");
}

#[tokio::test]
async fn principal_maps_claims_groups_actors_and_profile_attributes() {
    let f = fixture_with(Profile::Spiffe, |s| {
        s.claims.insert("owner".into(), "owner".into());
        s.claims.insert("groups".into(), "groups".into());
        s.claims.insert("team".into(), "org.team".into());
        s.claims.insert("missing".into(), "nope".into());
    });
    let t = f.token(json!({"owner":"alice","groups":"eng","org":{"team":"core"},
        "act":{"sub":"agent-a","act":{"sub":"user-b"}}, "aud":["mandate","other"]}));
    let p = f.v.verify(&t).await.unwrap();
    assert_eq!(p.kind, "Agent");
    assert_eq!(p.id, SUB);
    assert_eq!(p.issuer, "main");
    assert_eq!(p.token_id.as_deref(), Some("t-1"));
    assert_eq!(p.expires_at, NOW + 300);
    assert_eq!(p.owner.as_deref(), Some("alice"));
    assert_eq!(p.groups, vec!["eng".to_owned()]);
    assert_eq!(p.actors, vec!["agent-a".to_owned(), "user-b".to_owned()]);
    assert!(p.multi_audience);
    assert_eq!(p.attributes["team"], json!("core"));
    assert_eq!(p.attributes["actor"], json!("agent-a"));
    assert_eq!(p.attributes["trust_domain"], json!(TD));
    assert_eq!(p.attributes["path"], json!("/ns/agents/sa/bot"));
    assert!(!p.attributes.contains_key("missing"));
    assert_eq!(p.entity.uid().to_string(), format!("Agent::\"{SUB}\""));
    // The cache answers the second time with the very same principal.
    let again = f.v.verify(&t).await.unwrap();
    assert!(Arc::ptr_eq(&p, &again));
}

/// The claims `claims(over)` as the map Envoy's `jwt_authn` would hand over.
fn claim_map(over: Value) -> Map<String, Value> {
    match serde_json::from_str(&claims(over)).unwrap() {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

#[test]
fn verified_claims_pass_every_check_after_the_signature() {
    // A payload another verifier (Envoy's jwt_authn) checked the signature of: the same
    // principal as the token's, and every later check still applies, so a looser filter
    // admits nothing more (J-14/J-19 through the metadata path).
    let f = fixture_with(Profile::Spiffe, |s| {
        s.claims.insert("owner".into(), "owner".into());
    });
    let p =
        f.v.principal_from_verified_claims(claim_map(json!({"owner": "alice"})))
            .unwrap();
    assert_eq!((p.kind.as_str(), p.id.as_str()), ("Agent", SUB));
    assert_eq!(p.owner.as_deref(), Some("alice"));
    assert_eq!(p.attributes["trust_domain"], json!(TD));
    assert_eq!(p.issuer, "main");
    let code = |over: Value| match f.v.principal_from_verified_claims(claim_map(over)) {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    assert_eq!(
        code(json!({"iss": "https://other.example"})),
        "issuer_unknown"
    );
    assert_eq!(code(json!({"aud": "someone-else"})), "aud_mismatch");
    assert_eq!(code(json!({"exp": NOW - 100})), "token_expired");
    assert_eq!(code(json!({"exp": null})), "claims_invalid");
    assert_eq!(code(json!({"exp": 1.5e9})), "claims_invalid");
    assert_eq!(code(json!({"iat": NOW - 7200})), "token_lifetime_excessive");
    assert_eq!(code(json!({"sub": "spiffe://evil.org/x"})), "sub_invalid");
    assert_eq!(code(json!({"sub": ""})), "sub_invalid");
    assert_eq!(code(json!({})), "ok");
}

#[test]
fn peer_principal_is_a_spiffe_id_in_the_issuers_trust_domain() {
    let f = fixture(Profile::Spiffe);
    let p = f.v.peer_principal("main", SUB).unwrap();
    assert_eq!((p.kind.as_str(), p.id.as_str()), ("Agent", SUB));
    assert_eq!(p.attributes["path"], json!("/ns/agents/sa/bot"));
    assert_eq!(p.token_id, None);
    let code = |issuer: &str, id: &str| match f.v.peer_principal(issuer, id) {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    assert_eq!(code("main", "spiffe://other.org/ns/a/sa/b"), "sub_invalid");
    assert_eq!(code("main", "https://example.org/x"), "sub_invalid");
    assert_eq!(code("main", "spiffe://example.org/a/../b"), "sub_invalid");
    assert_eq!(code("nobody", SUB), "issuer_unknown");
    // Only a SPIFFE issuer reads peers.
    let oidc = fixture(Profile::Oidc);
    assert_eq!(
        oidc.v.peer_principal("main", SUB).unwrap_err().code(),
        "issuer_unknown"
    );
}

#[tokio::test]
async fn unconvertible_mapped_claim_is_claims_invalid() {
    let f = fixture_with(Profile::Spiffe, |s| {
        s.claims.insert("score".into(), "score".into());
    });
    let err =
        f.v.verify_uncached(&f.token(json!({"score":1.5})))
            .await
            .unwrap_err();
    assert_eq!(err.code(), "claims_invalid");
    assert!(err.to_string().contains("score"), "{err}");
}

#[tokio::test]
async fn cached_principal_is_refused_once_the_clock_passes_exp() {
    let f = fixture(Profile::Spiffe);
    let t = f.token(json!({"exp": NOW + 10}));
    f.v.verify(&t).await.unwrap();
    f.clock.set(NOW + 10 + 60);
    assert_eq!(f.v.verify(&t).await.unwrap_err().code(), "token_expired");
}

#[tokio::test]
async fn dev_mint_round_trips_with_the_dev_key_set() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/dev");
    let pem = std::fs::read(dir.join("signing-key.pem")).unwrap();
    let mut s = settings(
        "dev",
        "mandate-dev",
        Profile::Oidc,
        Some(JwksSource::File(dir.join("jwks.json"))),
    );
    s.algorithms = vec![Algorithm::ES256];
    let v = Verifier::new(vec![s], CacheSettings::default(), ManualClock::new(NOW)).unwrap();
    let mut extra = Map::new();
    extra.insert("owner".into(), json!("alice"));
    extra.insert("sub".into(), json!("cannot-override"));
    let t = dev::mint(
        &pem,
        "dev-1",
        "mandate-dev",
        "mandate",
        "agent-1",
        extra,
        Duration::from_secs(300),
        NOW,
    )
    .unwrap();
    let p = v.verify(&t).await.unwrap();
    assert_eq!(p.id, "agent-1");
    assert!(p.token_id.is_some());
}

#[test]
fn config_errors_name_issuer_and_field() {
    let clock = ManualClock::new(NOW);
    let mut s = settings("hs", ISS, Profile::Oidc, None);
    s.algorithms = vec![Algorithm::HS256];
    s.hmac_secret = Some(vec![1; 16]);
    let e = Verifier::new(vec![s.clone()], CacheSettings::default(), clock.clone()).unwrap_err();
    assert!(
        e.to_string().contains("`hs`") && e.to_string().contains("hmac_secret"),
        "{e}"
    );
    s.hmac_secret = None;
    assert!(Verifier::new(vec![s], CacheSettings::default(), clock.clone()).is_err());
    let s = settings("rs", ISS, Profile::Oidc, None);
    let e = Verifier::new(vec![s], CacheSettings::default(), clock.clone()).unwrap_err();
    assert!(e.to_string().contains("jwks"), "{e}");
    let s = settings(
        "f",
        ISS,
        Profile::Oidc,
        Some(JwksSource::File("/nonexistent/jwks.json".into())),
    );
    let e = Verifier::new(vec![s], CacheSettings::default(), clock.clone()).unwrap_err();
    assert!(
        e.to_string().contains("`f`") && e.to_string().contains("/nonexistent/jwks.json"),
        "{e}"
    );
    let s = settings(
        "u",
        ISS,
        Profile::Oidc,
        Some(url_source("http://example.com/jwks", Duration::ZERO)),
    );
    let e = Verifier::new(vec![s], CacheSettings::default(), clock).unwrap_err();
    assert!(e.to_string().contains("https"), "{e}");
}

// ---------------------------------------------------------------------------------------
// J cases

#[tokio::test]
async fn j01_alg_none_variants_denied_without_key_lookup() {
    let mock = Mock::start(Reply::keys(vec![])).await;
    let (v, _) = url_verifier(&mock.url(), Duration::ZERO);
    for alg in ["none", "None", "NONE", "nOnE"] {
        let h = B64.encode(json!({"alg":alg,"kid":"k"}).to_string());
        let p = B64.encode(claims(json!({})));
        assert_eq!(
            code_of(&v, &format!("{h}.{p}.c2ln")).await,
            "alg_not_allowed",
            "{alg}"
        );
        // RFC 7515 A.5 form, no signature at all: named as the refused algorithm.
        assert_eq!(
            code_of(&v, &format!("{h}.{p}.")).await,
            "alg_not_allowed",
            "{alg}"
        );
    }
    assert_eq!(mock.hits(), 0);
}

#[tokio::test]
async fn j03_hmac_with_public_key_bytes_is_denied() {
    let f = fixture(Profile::Oidc);
    let point = f.ec.kp.public_key().as_ref().to_vec();
    let x = B64.encode(&point[1..33]);
    let (n, _) = rsa_components(rsa().public_key().as_ref());
    let rsa_der = rsa().public_key().as_ref().to_vec();
    for secret in [point.clone(), x.into_bytes(), n.clone(), rsa_der.clone()] {
        for kid in [Some("ec-1"), Some("rsa-1"), None] {
            let mut h = json!({"alg":"HS256"});
            if let Some(k) = kid {
                h["kid"] = json!(k);
            }
            let t = sign_raw(&h.to_string(), &claims(json!({})), Signer::Hmac(&secret));
            assert_eq!(f.code(&t).await, "alg_not_allowed");
        }
    }
    // Even an issuer that allows HS256 only ever uses its configured secret.
    let f = fixture_with(Profile::Oidc, |s| {
        s.algorithms.push(Algorithm::HS256);
        s.hmac_secret = Some(vec![7; 32]);
    });
    for secret in [point, n, rsa_der] {
        let t = sign_raw(
            &json!({"alg":"HS256","kid":"ec-1"}).to_string(),
            &claims(json!({})),
            Signer::Hmac(&secret),
        );
        assert_eq!(f.code(&t).await, "signature_invalid");
    }
    let good = sign_raw(
        &json!({"alg":"HS256"}).to_string(),
        &claims(json!({})),
        Signer::Hmac(&[7; 32]),
    );
    assert_eq!(f.code(&good).await, "ok");
}

#[tokio::test]
async fn j04_alg_must_match_the_keys_bound_algorithm() {
    let ec = Ec::new();
    let (_dir, src) = jwks_file(vec![ec.jwk("ec"), rsa_jwk("rs", Some("RS256"))]);
    let s = settings("main", ISS, Profile::Oidc, Some(src));
    let v = Verifier::new(vec![s], CacheSettings::default(), ManualClock::new(NOW)).unwrap();
    let c = claims(json!({}));
    let cases = [
        (json!({"alg":"RS256","kid":"ec"}), Signer::Rsa),
        (json!({"alg":"PS256","kid":"ec"}), Signer::Pss),
        (json!({"alg":"PS256","kid":"rs"}), Signer::Pss),
        (json!({"alg":"ES256","kid":"rs"}), Signer::Ec(&ec)),
    ];
    for (h, signer) in cases {
        let t = sign_raw(&h.to_string(), &c, signer);
        assert_eq!(code_of(&v, &t).await, "alg_not_allowed", "{h}");
    }
    let t = sign_raw(
        &json!({"alg":"ES384","kid":"ec"}).to_string(),
        &c,
        Signer::Raw(vec![1; 96]),
    );
    assert_eq!(code_of(&v, &t).await, "alg_not_allowed");
    let ok = sign_raw(
        &json!({"alg":"RS256","kid":"rs"}).to_string(),
        &c,
        Signer::Rsa,
    );
    assert_eq!(code_of(&v, &ok).await, "ok");
}

#[tokio::test]
async fn j05_algs_outside_the_profile_are_denied() {
    let f = fixture(Profile::Spiffe);
    let c = claims(json!({}));
    for alg in ["HS256", "EdDSA", "ES256K", "ES512", "RS384"] {
        let t = sign_raw(
            &json!({"alg":alg,"kid":"ec-1"}).to_string(),
            &c,
            Signer::Raw(vec![1; 64]),
        );
        assert_eq!(f.code(&t).await, "alg_not_allowed", "{alg}");
    }
    let mut s = settings("spire", ISS, Profile::Spiffe, None);
    s.algorithms = vec![Algorithm::HS256];
    s.hmac_secret = Some(vec![1; 32]);
    let e = Verifier::new(vec![s], CacheSettings::default(), ManualClock::new(NOW)).unwrap_err();
    assert!(e.to_string().contains("algorithms"), "{e}");
}

#[tokio::test]
async fn j06_kid_is_an_opaque_bounded_map_key() {
    let f = fixture(Profile::Oidc);
    for kid in [
        "../../../../dev/null",
        "/proc/self/environ",
        "' UNION SELECT 'k'--",
        ";id",
        "a\r\nb",
        "ключ",
        "ec-1 ",
        "EC-1",
    ] {
        let t = f.token_h(json!({"alg":"ES256","kid":kid}), json!({}));
        assert_eq!(f.code(&t).await, "key_unknown", "{kid:?}");
    }
    // An escaped NUL never reaches the lookup: the strict JSON pass refuses it.
    let t = f.token_h(json!({"alg":"ES256","kid":"a\u{0}b"}), json!({}));
    assert_eq!(f.code(&t).await, "header_invalid");
    for len in [257, 600, 10 * 1024] {
        let t = f.token_h(json!({"alg":"ES256","kid":"k".repeat(len)}), json!({}));
        assert_ne!(f.code(&t).await, "ok");
    }
    let t = f.token_h(json!({"alg":"ES256","kid":"k".repeat(257)}), json!({}));
    assert_eq!(f.code(&t).await, "header_invalid");
}

/// J-07..J-10: headers that carry or point at keys; none is ever fetched or used.
async fn key_carrying_header_denied(name: &str, value: impl Fn(&str) -> Value) {
    let mock = Mock::start(Reply::keys(vec![])).await;
    let f = fixture(Profile::Oidc);
    for target in [
        mock.url(),
        "http://169.254.169.254/".into(),
        "file:///etc/passwd".into(),
    ] {
        let mut h = json!({"alg":"ES256","kid":"ec-1"});
        h[name] = value(&target);
        let t = f.token_h(h, json!({}));
        let err = f.v.verify_uncached(&t).await.unwrap_err();
        assert_eq!(err.code(), "header_param_forbidden");
        assert!(err.to_string().contains(name));
    }
    assert_eq!(mock.hits(), 0);
}

#[tokio::test]
async fn j07_jku_header_is_never_fetched() {
    key_carrying_header_denied("jku", |u| json!(u)).await;
}

#[tokio::test]
async fn j08_x5u_header_is_never_fetched() {
    key_carrying_header_denied("x5u", |u| json!(u)).await;
}

#[tokio::test]
async fn j09_embedded_jwk_is_refused_even_when_it_is_the_trusted_key() {
    let f = fixture(Profile::Oidc);
    let t = f.token_h(
        json!({"alg":"ES256","kid":"ec-1","jwk":f.ec.jwk("ec-1")}),
        json!({}),
    );
    assert_eq!(f.code(&t).await, "header_param_forbidden");
    key_carrying_header_denied("jwk", |_| json!({"kty":"oct","k":"AAAA"})).await;
}

#[tokio::test]
async fn j10_x5c_chain_is_refused() {
    key_carrying_header_denied("x5c", |_| json!(["MIIBszCCAVmgAwIBAgIUQ"])).await;
}

#[tokio::test]
async fn j11_any_crit_is_refused() {
    let f = fixture(Profile::Oidc);
    for extra in [
        json!({"crit":["x-must-understand"],"x-must-understand":1}),
        json!({"crit":[]}),
        json!({"crit":["alg"]}),
        json!({"crit":["exp","exp"]}),
        json!({"crit":"b64"}),
        json!({"crit":["absent"]}),
        json!({"crit":["b64"],"b64":false}),
        json!({"b64":false}),
    ] {
        let mut h = json!({"alg":"ES256","kid":"ec-1"});
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        assert_eq!(
            f.code(&f.token_h(h.clone(), json!({}))).await,
            "header_param_forbidden",
            "{h}"
        );
    }
}

#[tokio::test]
async fn j12_header_allowlist_per_profile() {
    let spiffe = fixture(Profile::Spiffe);
    let oidc = fixture(Profile::Oidc);
    for extra in ["foo", "ALG", "Kid", "x5t"] {
        let mut h = json!({"alg":"ES256","kid":"ec-1"});
        h[extra] = json!("v");
        assert_eq!(
            spiffe.code(&spiffe.token_h(h.clone(), json!({}))).await,
            "header_param_forbidden",
            "{extra}"
        );
        let t = sign_raw(&h.to_string(), &claims(json!({})), Signer::Ec(&oidc.ec));
        assert_eq!(oidc.code(&t).await, "ok", "{extra}");
    }
    let t = sign_raw(
        &json!({"alg":"ES256","kid":"ec-1","crit":["foo"],"foo":1}).to_string(),
        &claims(json!({})),
        Signer::Ec(&oidc.ec),
    );
    assert_eq!(oidc.code(&t).await, "header_param_forbidden");
}

#[tokio::test]
async fn j13_typ_is_checked_per_profile() {
    let spiffe = fixture(Profile::Spiffe);
    for (typ, want) in [
        ("JWT", "ok"),
        ("JOSE", "ok"),
        ("at+jwt", "header_invalid"),
        ("dpop+jwt", "header_invalid"),
        ("logout+jwt", "header_invalid"),
        ("jwt", "header_invalid"),
    ] {
        let t = spiffe.token_h(json!({"alg":"ES256","kid":"ec-1","typ":typ}), json!({}));
        assert_eq!(spiffe.code(&t).await, want, "{typ}");
    }
    let oidc = fixture_with(Profile::Oidc, |s| s.typ = vec!["at+jwt".into()]);
    let sign = |h: Value| sign_raw(&h.to_string(), &claims(json!({})), Signer::Ec(&oidc.ec));
    assert_eq!(
        oidc.code(&sign(json!({"alg":"ES256","kid":"ec-1","typ":"at+jwt"})))
            .await,
        "ok"
    );
    assert_eq!(
        oidc.code(&sign(json!({"alg":"ES256","kid":"ec-1","typ":"JWT"})))
            .await,
        "header_invalid"
    );
    assert_eq!(
        oidc.code(&sign(json!({"alg":"ES256","kid":"ec-1"}))).await,
        "header_invalid"
    );
    assert_eq!(
        oidc.code(&sign(json!({"alg":"ES256","kid":"ec-1","typ":1})))
            .await,
        "header_invalid"
    );
}

#[tokio::test]
async fn j14_exp_boundary_and_types_with_a_manual_clock() {
    let f = fixture(Profile::Spiffe);
    let t = f.token(json!({"exp": NOW + 100}));
    // Leeway 60 s: valid through exp + 59, expired from exp + 60 on.
    for (now, want) in [
        (NOW + 100 + 59, "ok"),
        (NOW + 100 + 60, "token_expired"),
        (NOW + 100 + 61, "token_expired"),
        (NOW + 100 - 1, "ok"),
    ] {
        f.clock.set(now);
        assert_eq!(f.code(&t).await, want, "now = exp + {}", now - NOW - 100);
    }
    f.clock.set(NOW);
    for exp in [
        json!(null),
        json!("1700000300"),
        json!(1_700_000_300.5),
        json!(1e300),
        json!(true),
        json!(u64::MAX),
    ] {
        assert_eq!(
            f.code(&f.token(json!({"exp": exp}))).await,
            "claims_invalid",
            "{exp}"
        );
    }
    assert_eq!(
        f.code(&f.token(json!({"exp": -1, "iat": -100}))).await,
        "token_expired"
    );
    let err =
        f.v.verify_uncached(&f.token(json!({"exp": NOW - 61})))
            .await
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("token expired at {} (now {NOW}, leeway 60s)", NOW - 61)
    );
}

#[tokio::test]
async fn j15_nbf_in_the_future_or_not_an_integer() {
    let f = fixture(Profile::Spiffe);
    assert_eq!(f.code(&f.token(json!({"nbf": NOW + 60}))).await, "ok");
    assert_eq!(
        f.code(&f.token(json!({"nbf": NOW + 61}))).await,
        "token_not_yet_valid"
    );
    assert_eq!(
        f.code(&f.token(json!({"nbf": "1700000000"}))).await,
        "claims_invalid"
    );
    assert_eq!(
        f.code(&f.token(json!({"nbf": 1.0}))).await,
        "claims_invalid"
    );
}

#[tokio::test]
async fn j16_iat_in_the_future_and_excessive_lifetime() {
    let f = fixture(Profile::Spiffe);
    assert_eq!(
        f.code(&f.token(json!({"iat": NOW + 61}))).await,
        "token_not_yet_valid"
    );
    assert_eq!(
        f.code(&f.token(json!({"iat": NOW + 365 * 86400, "exp": NOW + 365 * 86400 + 10})))
            .await,
        "token_not_yet_valid"
    );
    assert_eq!(f.code(&f.token(json!({"exp": NOW + 3600}))).await, "ok");
    assert_eq!(
        f.code(&f.token(json!({"exp": NOW + 3601}))).await,
        "token_lifetime_excessive"
    );
    assert_eq!(
        f.code(&f.token(json!({"iat": null, "exp": NOW + 3601})))
            .await,
        "token_lifetime_excessive"
    );
    assert_eq!(
        f.code(&f.token(json!({"iat": null, "exp": NOW + 3600})))
            .await,
        "ok"
    );
}

#[tokio::test]
async fn j18_issuer_exact_match_and_keys_scoped_per_issuer() {
    let a = Ec::new();
    let b = Ec::new();
    let (_da, sa) = jwks_file(vec![a.jwk("k1")]);
    let (_db, sb) = jwks_file(vec![b.jwk("k1")]);
    let v = Verifier::new(
        vec![
            settings("a", "https://a.example", Profile::Oidc, Some(sa)),
            settings("b", "https://b.example", Profile::Oidc, Some(sb)),
        ],
        CacheSettings::default(),
        ManualClock::new(NOW),
    )
    .unwrap();
    let h = es_header("k1");
    assert_eq!(
        code_of(
            &v,
            &sign_raw(
                &h,
                &claims_for("https://a.example", json!({})),
                Signer::Ec(&a)
            )
        )
        .await,
        "ok"
    );
    assert_eq!(
        code_of(
            &v,
            &sign_raw(
                &h,
                &claims_for("https://b.example", json!({})),
                Signer::Ec(&b)
            )
        )
        .await,
        "ok"
    );
    // Signed with b's k1 but claiming a: a's k1 is used, and fails.
    assert_eq!(
        code_of(
            &v,
            &sign_raw(
                &h,
                &claims_for("https://a.example", json!({})),
                Signer::Ec(&b)
            )
        )
        .await,
        "signature_invalid"
    );
    for iss in [
        "https://a.example/",
        "HTTPS://A.EXAMPLE",
        "https://а.example",
        "https://a.example ",
        "",
    ] {
        assert_eq!(
            code_of(
                &v,
                &sign_raw(&h, &claims_for(iss, json!({})), Signer::Ec(&a))
            )
            .await,
            "issuer_unknown",
            "{iss}"
        );
    }
    assert_eq!(
        code_of(
            &v,
            &sign_raw(&h, &claims_for("x", json!({"iss": null})), Signer::Ec(&a))
        )
        .await,
        "claims_invalid"
    );
    assert_eq!(v.issuer_names(), vec!["a".to_owned(), "b".to_owned()]);
}

#[tokio::test]
async fn j19_audience_rules() {
    let f = fixture(Profile::Spiffe);
    for (aud, want) in [
        (json!(null), "aud_mismatch"),
        (json!("other"), "aud_mismatch"),
        (json!(["other", "x"]), "aud_mismatch"),
        (json!(""), "aud_mismatch"),
        (json!([]), "claims_invalid"),
        (json!(1), "claims_invalid"),
        (json!("mandate"), "ok"),
        (json!(["mandate"]), "ok"),
        (json!(["other", "mandate"]), "ok"),
    ] {
        assert_eq!(f.code(&f.token(json!({"aud": aud}))).await, want, "{aud}");
    }
    let p =
        f.v.verify_uncached(&f.token(json!({"aud":["other","mandate"]})))
            .await
            .unwrap();
    assert!(p.multi_audience);
    let err =
        f.v.verify_uncached(&f.token(json!({"aud":"other"})))
            .await
            .unwrap_err();
    assert_eq!(err.to_string(), "`aud` does not contain `mandate`");
}

#[tokio::test]
async fn j20_invalid_spiffe_ids_are_sub_invalid() {
    let f = fixture(Profile::Spiffe);
    let long = format!("spiffe://example.org/{}", "a".repeat(2100));
    let bad = [
        "example.org/agent",
        "https://example.org/agent",
        "SPIFFE://example.org/agent",
        "spiffe://other.org/agent",
        "spiffe://Example.org/agent",
        "spiffe://example.org/%2e%2e/agent",
        "spiffe://example.org//agent",
        "spiffe://example.org/./agent",
        "spiffe://example.org/../agent",
        "spiffe://example.org/agent/",
        "spiffe://example.org/agent?x=1",
        "spiffe://example.org/agent#f",
        "spiffe://example.org:8443/agent",
        "spiffe://user@example.org/agent",
        "spiffe://exаmple.org/agent",
        "spiffe://example.org/agént",
        "spiffe:///agent",
        "",
        long.as_str(),
    ];
    for sub in bad {
        assert_eq!(
            f.code(&f.token(json!({"sub": sub}))).await,
            "sub_invalid",
            "{sub}"
        );
    }
    assert_eq!(f.code(&f.token(json!({"sub": null}))).await, "sub_invalid");
    assert_eq!(
        f.code(&f.token(json!({"sub": "spiffe://example.org"})))
            .await,
        "ok"
    );
    assert_eq!(
        f.code(&f.token(json!({"sub": "spiffe://example.org/a.b-c_D/9"})))
            .await,
        "ok"
    );
}

fn k8s_claims() -> Value {
    json!({"sub":"system:serviceaccount:prod:bot","kubernetes.io":{"namespace":"prod","serviceaccount":{"name":"bot","uid":"u"},"pod":{"name":"bot-7f","uid":"p"}}})
}

#[tokio::test]
async fn j21_profile_required_claims() {
    let k8s = fixture_with(Profile::Kubernetes, |s| {
        s.claims
            .insert("ns".into(), "kubernetes.io.namespace".into());
    });
    let p = k8s
        .v
        .verify_uncached(&k8s.token(k8s_claims()))
        .await
        .unwrap();
    assert_eq!(p.attributes["namespace"], json!("prod"));
    assert_eq!(p.attributes["service_account"], json!("bot"));
    assert_eq!(p.attributes["pod"], json!("bot-7f"));
    assert_eq!(p.attributes["ns"], json!("prod"));
    for k in [
        json!(null),
        json!("prod"),
        json!({"serviceaccount":{"name":"bot"}}),
        json!({"namespace":"prod"}),
        json!({"namespace":"prod","serviceaccount":{}}),
        json!({"namespace":1,"serviceaccount":{"name":"bot"}}),
    ] {
        let mut c = k8s_claims();
        c["kubernetes.io"] = k.clone();
        assert_eq!(k8s.code(&k8s.token(c)).await, "profile_violation", "{k}");
    }
    let oidc = fixture(Profile::Oidc);
    assert_eq!(
        oidc.code(&oidc.token(json!({"aud":["mandate","x"]}))).await,
        "profile_violation"
    );
    assert_eq!(
        oidc.code(&oidc.token(json!({"aud":["mandate","x"],"azp":"x"})))
            .await,
        "ok"
    );
    assert_eq!(
        oidc.code(&oidc.token(json!({"aud":["mandate"]}))).await,
        "ok"
    );
}

#[tokio::test]
async fn j22_duplicate_keys_in_header_or_payload_denied() {
    let f = fixture(Profile::Oidc);
    let c = claims(json!({}));
    let t = sign_raw(
        r#"{"alg":"ES256","kid":"ec-1","alg":"none"}"#,
        &c,
        Signer::Ec(&f.ec),
    );
    assert_eq!(f.code(&t).await, "header_invalid");
    let t = sign_raw(
        r#"{"alg":"ES256","kid":"ec-1","kid":"ec-1"}"#,
        &c,
        Signer::Ec(&f.ec),
    );
    assert_eq!(f.code(&t).await, "header_invalid");
    for dup in [
        r#","sub":"admin""#,
        r#","exp":1"#,
        r#","role":"user","role":"admin""#,
    ] {
        let payload = format!("{}{dup}}}", &c[..c.len() - 1]);
        let t = sign_raw(&es_header("ec-1"), &payload, Signer::Ec(&f.ec));
        assert_eq!(f.code(&t).await, "claims_invalid", "{payload}");
    }
}

#[tokio::test]
async fn j23_json_edge_cases_in_a_signed_token() {
    let f = fixture(Profile::Oidc);
    let c = claims(json!({}));
    let t = sign_raw(
        &format!("\u{feff}{}", es_header("ec-1")),
        &c,
        Signer::Ec(&f.ec),
    );
    assert_eq!(f.code(&t).await, "header_invalid");
    for payload in [
        format!("{c} x"),
        c.replace("\"t-1\"", r#""\ud800""#),
        c.replace("\"t-1\"", r#""a\u0000b""#),
        c.replace("\"t-1\"", "NaN"),
    ] {
        let t = sign_raw(&es_header("ec-1"), &payload, Signer::Ec(&f.ec));
        assert_eq!(f.code(&t).await, "claims_invalid", "{payload}");
    }
    let deep = format!("{}1{}", "[".repeat(9), "]".repeat(9));
    assert_eq!(
        f.code(&f.token(json!({"x": serde_json::from_str::<Value>(&deep).unwrap()})))
            .await,
        "claims_invalid"
    );
}

#[tokio::test]
async fn j26_oversized_tokens_rejected_before_parsing() {
    let f = fixture(Profile::Oidc);
    let start = std::time::Instant::now();
    for t in [
        "a".repeat(1 << 20),
        ".".repeat(1 << 20),
        f.token(json!({"sub": "a".repeat(9000)})),
    ] {
        assert_eq!(f.v.verify(&t).await.unwrap_err().code(), "token_malformed");
    }
    assert!(start.elapsed() < Duration::from_millis(200));
}

#[tokio::test]
async fn j27_nested_jwt_is_refused() {
    let f = fixture(Profile::Oidc);
    let inner = f.token(json!({}));
    let t = sign_raw(
        &json!({"alg":"ES256","kid":"ec-1","cty":"JWT"}).to_string(),
        &inner,
        Signer::Ec(&f.ec),
    );
    assert_eq!(f.code(&t).await, "header_param_forbidden");
}

#[tokio::test]
async fn j28_jwe_and_compression_refused_without_processing() {
    let f = fixture(Profile::Oidc);
    assert_eq!(
        f.code("eyJhbGciOiJSU0EtT0FFUCJ9.a2V5.aXY.Y3Q.dGFn").await,
        "token_malformed"
    );
    for extra in [json!({"enc":"A256GCM"}), json!({"zip":"DEF"})] {
        let mut h = json!({"alg":"ES256","kid":"ec-1"});
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        assert_eq!(
            f.code(&f.token_h(h, json!({}))).await,
            "header_param_forbidden"
        );
    }
}

#[tokio::test]
async fn j29_psychic_and_malformed_ecdsa_signatures_denied() {
    let f = fixture(Profile::Oidc);
    let h = es_header("ec-1");
    let c = claims(json!({}));
    // P-256 group order n.
    let n =
        hex::decode("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551").unwrap();
    let input = format!("{}.{}", B64.encode(&h), B64.encode(&c));
    let der_kp = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        f.ec.kp.to_pkcs8v1().unwrap().as_ref(),
    )
    .unwrap();
    let der = der_kp
        .sign(&SystemRandom::new(), input.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let good = f.ec.sign(input.as_bytes());
    let sigs = [
        vec![0u8; 64],
        [n.clone(), n.clone()].concat(),
        [vec![0u8; 31], vec![1], vec![0u8; 31], vec![1]].concat(),
        der,
        good[..63].to_vec(),
        [good.clone(), vec![0]].concat(),
        [good.clone(), vec![0u8; 32]].concat(),
    ];
    for sig in sigs {
        let t = sign_raw(&h, &c, Signer::Raw(sig.clone()));
        assert_eq!(f.code(&t).await, "signature_invalid", "{} bytes", sig.len());
    }
    assert_eq!(f.code(&sign_raw(&h, &c, Signer::Raw(good))).await, "ok");
}

#[test]
fn j30_malformed_ec_keys_dropped_at_load() {
    let ec = Ec::new();
    let good = ec.jwk("good");
    let mut off_curve = ec.jwk("off");
    let mut y = B64.decode(good["y"].as_str().unwrap()).unwrap();
    y[31] ^= 1;
    off_curve["y"] = json!(B64.encode(&y));
    let mut identity = ec.jwk("zero");
    identity["x"] = json!(B64.encode([0u8; 32]));
    identity["y"] = json!(B64.encode([0u8; 32]));
    let mut wrong_crv = ec.jwk("p384");
    wrong_crv["crv"] = json!("P-384");
    let mut short = ec.jwk("short");
    short["x"] = json!(B64.encode([1u8; 31]));
    let mut long = ec.jwk("long");
    long["y"] = json!(B64.encode([1u8; 33]));
    let doc = json!({"keys":[good, off_curve, identity, wrong_crv, short, long]}).to_string();
    let set = jwks::parse(doc.as_bytes(), &[Algorithm::ES256, Algorithm::ES384], "t").unwrap();
    assert_eq!(set.len(), 1);
    assert!(matches!(
        set.lookup(Some("good"), Algorithm::ES256),
        jwks::Lookup::Found(_)
    ));
}

#[test]
fn j31_weak_rsa_keys_dropped_at_load() {
    let algs = [Algorithm::RS256];
    let mut n1024 = vec![0xC3u8; 128];
    n1024[127] |= 1;
    let key =
        |n: &[u8], e: &[u8]| json!({"kty":"RSA","kid":"k","n":B64.encode(n),"e":B64.encode(e)});
    let (n, e) = rsa_components(rsa().public_key().as_ref());
    let mut even_n = n.clone();
    *even_n.last_mut().unwrap() &= 0xFE;
    for (label, k) in [
        ("1024-bit", key(&n1024, &[1, 0, 1])),
        ("e = 1", key(&n, &[1])),
        ("even e", key(&n, &[1, 0, 0])),
        ("even n", key(&even_n, &e)),
    ] {
        let doc = json!({ "keys": [k] }).to_string();
        assert_eq!(
            jwks::parse(doc.as_bytes(), &algs, "t").unwrap_err(),
            jwks::JwksError::NoUsableKeys,
            "{label}"
        );
    }
    let doc = json!({ "keys": [key(&n, &e)] }).to_string();
    assert_eq!(jwks::parse(doc.as_bytes(), &algs, "t").unwrap().len(), 1);
}

#[tokio::test]
async fn j34_stripped_signature_denied() {
    let f = fixture(Profile::Oidc);
    let t = f.token(json!({}));
    let stripped = &t[..t.rfind('.').unwrap() + 1];
    assert_eq!(f.code(stripped).await, "token_malformed");
}

#[tokio::test]
async fn j36_cross_issuer_type_confusion() {
    let ec = Ec::new();
    let (_d1, s1) = jwks_file(vec![ec.jwk("k")]);
    let (_d2, s2) = jwks_file(vec![ec.jwk("k")]);
    let v = Verifier::new(
        vec![
            settings("spire", "https://spire.example", Profile::Spiffe, Some(s1)),
            settings("k8s", "https://k8s.example", Profile::Kubernetes, Some(s2)),
        ],
        CacheSettings::default(),
        ManualClock::new(NOW),
    )
    .unwrap();
    let sa = claims_for("https://k8s.example", k8s_claims());
    assert_eq!(
        code_of(&v, &sign_raw(&es_header("k"), &sa, Signer::Ec(&ec))).await,
        "ok"
    );
    // The same service-account token re-addressed to the SPIFFE issuer fails its sub rules.
    let mut on_svid: Value = serde_json::from_str(&sa).unwrap();
    on_svid["iss"] = json!("https://spire.example");
    assert_eq!(
        code_of(
            &v,
            &sign_raw(&es_header("k"), &on_svid.to_string(), Signer::Ec(&ec))
        )
        .await,
        "sub_invalid"
    );
    // An ID token for another client.
    let other = claims_for("https://k8s.example", json!({"aud":"some-client"}));
    assert_eq!(
        code_of(&v, &sign_raw(&es_header("k"), &other, Signer::Ec(&ec))).await,
        "aud_mismatch"
    );
}

#[tokio::test]
async fn j37_kubernetes_legacy_and_default_audience_tokens() {
    let f = fixture(Profile::Kubernetes);
    let mut legacy = k8s_claims();
    legacy["exp"] = Value::Null;
    assert_eq!(f.code(&f.token(legacy)).await, "claims_invalid");
    let mut default_aud = k8s_claims();
    default_aud["aud"] = json!(["https://kubernetes.default.svc.cluster.local"]);
    assert_eq!(f.code(&f.token(default_aud)).await, "aud_mismatch");
    let mut long = k8s_claims();
    long["exp"] = json!(NOW + 7200);
    assert_eq!(f.code(&f.token(long)).await, "token_lifetime_excessive");
}

// ---------------------------------------------------------------------------------------
// K cases

fn random_kid(i: usize) -> String {
    format!("kid-{i}-{}", uuid::Uuid::now_v7())
}

#[tokio::test]
async fn k01_unknown_kid_flood_is_rate_limited() {
    let ec = Ec::new();
    let mock = Mock::start(Reply::keys(vec![ec.jwk("k1")])).await;
    let (v, _) = url_verifier(&mock.url(), Duration::from_secs(30));
    v.start().await;
    assert_eq!(mock.hits(), 1);
    for i in 0..200 {
        let t = sign_raw(
            &es_header(&random_kid(i)),
            &claims(json!({})),
            Signer::Ec(&ec),
        );
        assert_eq!(code_of(&v, &t).await, "key_unknown");
    }
    // The first miss may refetch; every later one is inside the interval.
    assert_eq!(mock.hits(), 2);
    let good = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    assert_eq!(code_of(&v, &good).await, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k02_concurrent_unknown_kid_triggers_one_fetch() {
    let old = Ec::new();
    let new = Ec::new();
    let mock = Mock::start(Reply::keys(vec![old.jwk("old")])).await;
    let (v, _) = url_verifier(&mock.url(), Duration::from_secs(30));
    v.start().await;
    mock.set(Reply::keys(vec![old.jwk("old"), new.jwk("new")]));
    let token = sign_raw(&es_header("new"), &claims(json!({})), Signer::Ec(&new));
    assert_eq!(concurrent_codes(&v, &token, 200).await, vec!["ok"; 200]);
    assert_eq!(mock.hits(), 2, "one start fetch plus one coalesced refetch");
}

#[tokio::test]
async fn k03_jwks_down_at_startup_means_not_ready_and_key_unavailable() {
    let ec = Ec::new();
    let mock = Mock::start(Reply::body(503, "down")).await;
    let (v, _) = url_verifier(&mock.url(), Duration::ZERO);
    assert!(!v.ready());
    v.start().await;
    assert!(!v.ready());
    let t = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    assert_eq!(code_of(&v, &t).await, "key_unavailable");
    // Recovery: the next miss refetches and finds the keys.
    mock.set(Reply::keys(vec![ec.jwk("k1")]));
    assert_eq!(code_of(&v, &t).await, "ok");
    assert!(v.ready());
}

#[tokio::test]
async fn k04_last_good_keys_survive_an_outage_up_to_max_staleness() {
    let ec = Ec::new();
    let mock = Mock::start(Reply::keys(vec![ec.jwk("k1")])).await;
    let (v, clock) = url_verifier(&mock.url(), Duration::ZERO);
    v.start().await;
    mock.set(Reply::body(500, "oops"));
    let t = sign_raw(
        &es_header("k1"),
        &claims(json!({"exp": NOW + 7200, "iat": NOW + 3600})),
        Signer::Ec(&ec),
    );
    clock.set(NOW + 3600);
    assert_eq!(code_of(&v, &t).await, "ok");
    assert!(v.ready());
    clock.set(NOW + 3601);
    assert_eq!(code_of(&v, &t).await, "key_unavailable");
    assert!(!v.ready());
    assert_eq!(
        keys::backoff(1, Duration::ZERO, Duration::from_secs(300)),
        Duration::from_secs(5)
    );
    assert_eq!(
        keys::backoff(3, Duration::ZERO, Duration::from_secs(300)),
        Duration::from_secs(20)
    );
    assert_eq!(
        keys::backoff(30, Duration::ZERO, Duration::from_secs(300)),
        Duration::from_secs(300)
    );
}

#[tokio::test]
async fn k06_bad_responses_keep_the_last_good_keys() {
    let ec = Ec::new();
    let mock = Mock::start(Reply::keys(vec![ec.jwk("k1")])).await;
    let (v, _) = url_verifier(&mock.url(), Duration::ZERO);
    v.start().await;
    let good = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    let miss = sign_raw(&es_header("nope"), &claims(json!({})), Signer::Ec(&ec));
    for reply in [
        Reply::body(500, "err"),
        Reply::body(404, "nf"),
        Reply::body(200, "<html>hi</html>"),
        Reply::body(200, r#"{"keys":[{"kty":"EC""#),
        Reply::body(200, r#"{"keys":[]}"#),
    ] {
        let before = mock.hits();
        mock.set(reply);
        assert_eq!(code_of(&v, &miss).await, "key_unknown");
        assert_eq!(mock.hits(), before + 1);
        assert_eq!(code_of(&v, &good).await, "ok");
    }
}

#[tokio::test]
async fn k07_oversized_documents_rejected() {
    let ec = Ec::new();
    let mock = Mock::start(Reply::keys(vec![ec.jwk("k1")])).await;
    let (v, _) = url_verifier(&mock.url(), Duration::ZERO);
    v.start().await;
    mock.set(Reply::body(200, vec![b' '; 10 << 20]));
    let miss = sign_raw(&es_header("nope"), &claims(json!({})), Signer::Ec(&ec));
    assert_eq!(code_of(&v, &miss).await, "key_unknown");
    let good = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    assert_eq!(code_of(&v, &good).await, "ok");
    let many: Vec<Value> = (0..101).map(|i| ec.jwk(&format!("k{i}"))).collect();
    let doc = json!({ "keys": many }).to_string();
    assert_eq!(
        jwks::parse(doc.as_bytes(), &[Algorithm::ES256], "t").unwrap_err(),
        jwks::JwksError::TooManyKeys(101)
    );
    assert_eq!(
        jwks::parse(&vec![b' '; 65 * 1024], &[Algorithm::ES256], "t").unwrap_err(),
        jwks::JwksError::TooLarge
    );
}

#[test]
fn k08_duplicate_members_and_kids() {
    let ec = Ec::new();
    let other = Ec::new();
    let j = ec.jwk("k1").to_string();
    let dup_member = format!(r#"{{"keys":[{},"kid":"k2"}}]}}"#, &j[..j.len() - 1]);
    assert!(matches!(
        jwks::parse(dup_member.as_bytes(), &[Algorithm::ES256], "t"),
        Err(jwks::JwksError::Json(_))
    ));
    let dup_keys = r#"{"keys":[],"keys":[]}"#;
    assert!(jwks::parse(dup_keys.as_bytes(), &[Algorithm::ES256], "t").is_err());
    let doc = json!({"keys":[ec.jwk("dup"), other.jwk("dup"), ec.jwk("solo")]}).to_string();
    let set = jwks::parse(doc.as_bytes(), &[Algorithm::ES256], "t").unwrap();
    assert_eq!(set.len(), 1);
    assert!(matches!(
        set.lookup(Some("dup"), Algorithm::ES256),
        jwks::Lookup::Unknown
    ));
}

#[test]
fn k09_keys_not_meant_for_verification_are_ignored() {
    let ec = Ec::new();
    let mut enc = ec.jwk("enc");
    enc["use"] = json!("enc");
    let mut sign_only = ec.jwk("ops");
    sign_only["key_ops"] = json!(["sign"]);
    let mut verify_ops = ec.jwk("ops-ok");
    verify_ops["key_ops"] = json!(["verify"]);
    let unknown = json!({"kty":"XYZ","kid":"x"});
    let oct = json!({"kty":"oct","kid":"o","k":"AAAA"});
    let (n, e) = rsa_components(rsa().public_key().as_ref());
    let rs512 =
        json!({"kty":"RSA","kid":"rs512","alg":"RS512","n":B64.encode(n),"e":B64.encode(e)});
    let doc = json!({"keys":[enc, sign_only, verify_ops, unknown, oct, rs512]}).to_string();
    let set = jwks::parse(doc.as_bytes(), &[Algorithm::ES256, Algorithm::RS256], "t").unwrap();
    assert_eq!(set.len(), 1);
    assert!(matches!(
        set.lookup(Some("ops-ok"), Algorithm::ES256),
        jwks::Lookup::Found(_)
    ));
}

#[test]
fn k10_private_key_material_drops_the_key() {
    let ec = Ec::new();
    let mut private = ec.jwk("p");
    private["d"] = json!(B64.encode([7u8; 32]));
    let (n, e) = rsa_components(rsa().public_key().as_ref());
    let rsa_private =
        json!({"kty":"RSA","kid":"r","n":B64.encode(n),"e":B64.encode(e),"p":"AQ","q":"AQ"});
    let doc = json!({"keys":[private, rsa_private, ec.jwk("ok")]}).to_string();
    let set = jwks::parse(doc.as_bytes(), &[Algorithm::ES256, Algorithm::RS256], "t").unwrap();
    assert_eq!(set.len(), 1);
    assert!(matches!(
        set.lookup(Some("p"), Algorithm::ES256),
        jwks::Lookup::Unknown
    ));
}

#[tokio::test]
async fn k11_redirects_are_not_followed() {
    let ec = Ec::new();
    let target = Mock::start(Reply::keys(vec![ec.jwk("k1")])).await;
    let mut redirect = Reply::body(302, "");
    redirect.headers.push(("location", target.url()));
    let first = Mock::start(redirect).await;
    let (v, _) = url_verifier(&first.url(), Duration::ZERO);
    v.start().await;
    assert_eq!(first.hits(), 1);
    assert_eq!(target.hits(), 0);
    assert!(!v.ready());
    let t = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    assert_eq!(code_of(&v, &t).await, "key_unavailable");
    assert_eq!(target.hits(), 0);
}

#[tokio::test]
async fn k12_key_rotation_timeline() {
    let k1 = Ec::new();
    let k2 = Ec::new();
    let mock = Mock::start(Reply::keys(vec![k1.jwk("k1")])).await;
    let (v, _) = url_verifier(&mock.url(), Duration::ZERO);
    v.start().await;
    let t1 = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&k1));
    let t2 = sign_raw(&es_header("k2"), &claims(json!({})), Signer::Ec(&k2));
    v.verify(&t1).await.unwrap();
    // t0: K2 published next to K1; t1: tokens signed with K2 arrive (refetch on unknown kid).
    mock.set(Reply::keys(vec![k1.jwk("k1"), k2.jwk("k2")]));
    v.verify(&t2).await.unwrap();
    v.verify(&t1).await.unwrap();
    // t2: K1 removed; the refresh that sees it gone also empties the token cache.
    mock.set(Reply::keys(vec![k2.jwk("k2")]));
    let probe = sign_raw(&es_header("probe"), &claims(json!({})), Signer::Ec(&k2));
    assert_eq!(v.verify(&probe).await.unwrap_err().code(), "key_unknown");
    assert_eq!(v.verify(&t1).await.unwrap_err().code(), "key_unknown");
    v.verify(&t2).await.unwrap();
}

#[test]
fn k14_cache_control_max_age_is_clamped() {
    let clamp = |v: &str| sources::max_age(v).map(keys::clamp_refresh);
    assert_eq!(clamp("max-age=0"), Some(Duration::from_secs(30)));
    assert_eq!(
        clamp("public, max-age=31536000"),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        clamp("max-age=600, must-revalidate"),
        Some(Duration::from_secs(600))
    );
    assert_eq!(clamp("no-store"), None);
    assert_eq!(clamp("max-age=abc"), None);
}

/// Accepts TCP connections and then sends nothing, ever (K-05). Returns the URL and a count
/// of accepted connections.
async fn tarpit() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (url, accepted)
}

/// Generous bound for one decision on a shared, noisy 2-core machine; the code waits at most
/// [`MISS_WAIT`] (100 ms) on a fetch.
const FAST: Duration = Duration::from_secs(1);

#[tokio::test]
async fn k05_tarpit_jwks_at_startup_times_out_and_checks_are_refused_fast() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (url, accepted) = tarpit().await;
    let mut src = url_source(&url, Duration::ZERO);
    if let JwksSource::Url { fetch_timeout, .. } = &mut src {
        *fetch_timeout = Duration::from_millis(500);
    }
    let s = settings("slow", ISS, Profile::Oidc, Some(src));
    let v = Verifier::new(vec![s], CacheSettings::default(), ManualClock::new(NOW)).unwrap();
    // The first fetch is bounded by the fetch timeout, not by the tarpit's patience.
    let t0 = std::time::Instant::now();
    v.start().await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(accepted.load(Ordering::SeqCst) >= 1);
    assert!(!v.ready());
    let errors = v.jwks_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "slow");
    assert!(
        errors[0].1.contains(&url) && errors[0].1.contains("timed out"),
        "{errors:?}"
    );
    // Every check while the issuer hangs is refused within the bound, never held for the
    // fetch (each one starts or joins a fetch: the refetch interval is zero).
    let ec = Ec::new();
    let t = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        assert_eq!(code_of(&v, &t).await, "key_unavailable");
        assert!(t0.elapsed() < FAST, "{:?}", t0.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k05_hung_jwks_never_holds_a_decision_past_the_miss_wait() {
    let ec = Ec::new();
    let mock = Mock::start(Reply::keys(vec![ec.jwk("k1")])).await;
    // Default 5 s fetch timeout: the decisions below must not depend on it.
    let (v, _) = url_verifier(&mock.url(), Duration::ZERO);
    v.start().await;
    mock.hang.store(true, Ordering::SeqCst);
    let good = sign_raw(&es_header("k1"), &claims(json!({})), Signer::Ec(&ec));
    let started = std::time::Instant::now();
    for i in 0..5 {
        let miss = sign_raw(
            &es_header(&random_kid(i)),
            &claims(json!({})),
            Signer::Ec(&ec),
        );
        let t0 = std::time::Instant::now();
        assert_eq!(code_of(&v, &miss).await, "key_unknown");
        let took = t0.elapsed();
        assert!(took < FAST, "unknown kid held for {took:?}");
        assert!(
            took >= MISS_WAIT / 2,
            "the miss waited for no fetch: {took:?}"
        );
        // Known keys never wait for anything.
        let t0 = std::time::Instant::now();
        assert_eq!(code_of(&v, &good).await, "ok");
        assert!(t0.elapsed() < FAST, "{:?}", t0.elapsed());
    }
    // Concurrent misses join the one hung fetch; none waits for it to finish.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let v = v.clone();
        let t = sign_raw(
            &es_header(&random_kid(100 + i)),
            &claims(json!({})),
            Signer::Ec(&ec),
        );
        tasks.spawn(async move {
            let t0 = std::time::Instant::now();
            let code = code_of(&v, &t).await;
            (code, t0.elapsed())
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (code, took) = r.unwrap();
        assert_eq!(code, "key_unknown");
        assert!(took < FAST, "{took:?}");
    }
    // Single flight: the hung fetch is the only one, well inside its 5 s timeout.
    assert!(started.elapsed() < sources::FETCH_TIMEOUT);
    assert_eq!(mock.hits(), 2, "start fetch plus the one hung refetch");
    assert!(
        v.ready(),
        "last good keys stay in use while the issuer hangs"
    );
}

#[test]
fn k05_fetch_timeout_above_five_seconds_or_zero_is_refused() {
    for bad in [Duration::ZERO, Duration::from_secs(6)] {
        let mut src = url_source("https://issuer.example/jwks", Duration::ZERO);
        if let JwksSource::Url { fetch_timeout, .. } = &mut src {
            *fetch_timeout = bad;
        }
        let s = settings("t", ISS, Profile::Oidc, Some(src));
        let err = Verifier::new(vec![s], CacheSettings::default(), ManualClock::new(NOW))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`jwks_fetch_timeout`"), "{err}");
    }
}

#[test]
fn jwks_ca_file_must_hold_ca_certificates_and_needs_https() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    for (url, path, expect) in [
        (
            "https://issuer.example/jwks",
            &not_pem,
            "no PEM certificate",
        ),
        ("https://issuer.example/jwks", &garbage, "garbage.pem"),
        ("https://issuer.example/jwks", &missing, "missing.pem"),
        ("http://127.0.0.1:9/jwks", &not_pem, "not https"),
    ] {
        let mut src = url_source(url, Duration::ZERO);
        if let JwksSource::Url { ca_file, .. } = &mut src {
            *ca_file = Some(path.clone());
        }
        let s = settings("t", ISS, Profile::Oidc, Some(src));
        let err = Verifier::new(vec![s], CacheSettings::default(), ManualClock::new(NOW))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`jwks_ca_file`") && err.contains(expect),
            "{expect}: {err}"
        );
    }
}

#[test]
fn k13_server_max_age_never_stretches_the_configured_refresh() {
    let five_min = Duration::from_secs(300);
    assert_eq!(keys::refresh_delay(five_min, None), five_min);
    assert_eq!(
        keys::refresh_delay(five_min, Some(Duration::from_secs(31_536_000))),
        five_min
    );
    assert_eq!(
        keys::refresh_delay(five_min, Some(Duration::ZERO)),
        Duration::from_secs(30)
    );
    assert_eq!(
        keys::refresh_delay(five_min, Some(Duration::from_secs(120))),
        Duration::from_secs(120)
    );
    let one_s = Duration::from_secs(1);
    assert_eq!(keys::refresh_delay(one_s, Some(Duration::ZERO)), one_s);
}

// ---------------------------------------------------------------------------------------
// K-17: the key-set parser under arbitrary and mutated input

mod k17 {
    use proptest::prelude::*;

    use super::*;

    const ALL: &[Algorithm] = &[
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::EdDSA,
    ];

    fn ec_jwk() -> &'static Value {
        static JWK: OnceLock<Value> = OnceLock::new();
        JWK.get_or_init(|| Ec::new().jwk("good"))
    }

    fn valid_doc() -> String {
        json!({"keys": [ec_jwk(), rsa_jwk("rsa", Some("RS256"))]}).to_string()
    }

    /// Whatever the input: no panic, a bounded key set, or an error saying what was wrong.
    fn check(bytes: &[u8]) -> Result<jwks::KeySet, jwks::JwksError> {
        let r = jwks::parse(bytes, ALL, "k17");
        match &r {
            Ok(set) => {
                assert!((1..=jwks::MAX_JWKS_KEYS).contains(&set.len()));
                assert!(bytes.len() <= jwks::MAX_JWKS_BYTES);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("document "), "{msg}");
                match e {
                    jwks::JwksError::Json(why) => assert!(!why.trim().is_empty(), "{msg}"),
                    jwks::JwksError::Shape(why) => assert!(why.contains("`keys`"), "{msg}"),
                    _ => {}
                }
            }
        }
        r
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            // Strict JSON refuses NUL in any string, for the whole document (J-23): left out
            // here so the property below is about keys, not about that refusal.
            "[^\\x00]{0,24}".prop_map(Value::from),
            // Near-valid member values: base64url of plausible lengths.
            prop::collection::vec(any::<u8>(), 0..70).prop_map(|b| Value::from(B64.encode(b))),
        ];
        leaf.prop_recursive(3, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[^\\x00]{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn member_name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "kty", "crv", "kid", "alg", "use", "key_ops", "x", "y", "n", "e", "d", "k",
            ])
            .prop_map(str::to_owned),
            "[^\\x00]{0,6}",
        ]
    }

    fn kty_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            prop::sample::select(vec!["EC", "RSA", "OKP", "oct", ""]).prop_map(Value::from),
            json_value(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn k17_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = check(&bytes);
        }

        #[test]
        fn k17_mutated_valid_documents_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..10)
        ) {
            let mut doc = valid_doc().into_bytes();
            for (at, byte, op) in edits {
                if doc.is_empty() {
                    break;
                }
                let i = at.index(doc.len());
                match op {
                    0 => doc[i] = byte,
                    1 => doc.insert(i, byte),
                    2 => { doc.remove(i); }
                    _ => doc.truncate(i),
                }
            }
            let _ = check(&doc);
        }

        /// One arbitrary key beside a good one: the bad key is skipped, the good one stays.
        #[test]
        fn k17_arbitrary_key_members_never_take_down_the_good_key(
            members in prop::collection::btree_map(member_name(), json_value(), 0..10),
            kty in kty_value(),
            wrap in any::<bool>(),
        ) {
            let mut jwk: Map<String, Value> = members.into_iter().collect();
            jwk.insert("kty".into(), kty);
            // Never the good key's kid: a duplicate kid drops both, by design (K-08).
            if jwk.get("kid") == Some(&json!("good")) {
                jwk.remove("kid");
            }
            let bad = if wrap { Value::Object(jwk) } else { Value::Array(vec![Value::Object(jwk)]) };
            let doc = json!({"keys": [bad, ec_jwk()]}).to_string();
            if doc.len() <= jwks::MAX_JWKS_BYTES {
                let set = check(doc.as_bytes()).unwrap();
                prop_assert!(matches!(set.lookup(Some("good"), Algorithm::ES256), jwks::Lookup::Found(_)));
            }
        }

        /// The size cap is exact: a valid document padded to the limit loads, one byte more
        /// is refused before parsing.
        #[test]
        fn k17_size_cap_is_exact(len in (jwks::MAX_JWKS_BYTES - 64)..(jwks::MAX_JWKS_BYTES + 64)) {
            let mut doc = valid_doc().into_bytes();
            doc.resize(len, b' ');
            match check(&doc) {
                Ok(_) => prop_assert!(len <= jwks::MAX_JWKS_BYTES),
                Err(e) => {
                    prop_assert!(len > jwks::MAX_JWKS_BYTES);
                    prop_assert_eq!(e, jwks::JwksError::TooLarge);
                }
            }
        }

        /// Deep nesting is refused by the depth limit, never by a stack overflow.
        #[test]
        fn k17_deep_nesting_is_refused(depth in 0usize..10_000, object in any::<bool>()) {
            let (open, close) = if object { (r#"{"a":"#, "}") } else { ("[", "]") };
            let doc = format!(
                r#"{{"keys":[{{"kty":"EC","x":{}1{}}}]}}"#,
                open.repeat(depth),
                close.repeat(depth)
            );
            let r = check(doc.as_bytes());
            if depth > 6 {
                prop_assert!(r.is_err());
            }
        }
    }
}
