//! Token verification cost: the full pipeline cold (ES256, RS256-2048) and the cached hot path
//! (a SHA-256 and a moka hit), docs/design.md §8.
#![expect(
    clippy::unwrap_used,
    reason = "a bench is test code: a failed setup should stop it loudly"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::Algorithm;
use mandate::clock::{Clock, SystemClock};
use mandate::identity::{CacheSettings, IssuerSettings, JwksSource, Profile, Verifier};
use serde_json::json;

const ISS: &str = "https://bench.example";

/// `(n, e)` from a DER `RSAPublicKey` (SEQUENCE of two INTEGERs).
fn rsa_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn read(b: &[u8]) -> (&[u8], &[u8]) {
        let (len, hdr) = if b[1] < 0x80 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            (
                b[2..2 + n].iter().fold(0usize, |a, x| a << 8 | *x as usize),
                2 + n,
            )
        };
        (&b[hdr..hdr + len], &b[hdr + len..])
    }
    let (seq, _) = read(der);
    let (n, rest) = read(seq);
    let (e, _) = read(rest);
    (n.to_vec(), e.to_vec())
}

fn signed(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    sign: impl Fn(&[u8]) -> Vec<u8>,
) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", B64.encode(sig))
}

fn setup() -> (Verifier, String, String, tempfile::TempDir) {
    let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let point = ec.public_key().as_ref();
    let (n, e) = rsa_components(rsa.public_key().as_ref());
    let jwks = json!({"keys":[
        {"kty":"EC","crv":"P-256","kid":"ec","alg":"ES256","x":B64.encode(&point[1..33]),"y":B64.encode(&point[33..65])},
        {"kty":"RSA","kid":"rsa","alg":"RS256","n":B64.encode(n),"e":B64.encode(e)},
    ]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let mut claims_map = BTreeMap::new();
    claims_map.insert("owner".to_owned(), "owner".to_owned());
    let settings = IssuerSettings {
        name: "bench".into(),
        issuer: ISS.into(),
        profile: Profile::Spiffe,
        audiences: vec!["mandate".into()],
        algorithms: vec![Algorithm::ES256, Algorithm::RS256],
        jwks: Some(JwksSource::File(path)),
        hmac_secret: None,
        leeway: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(3600),
        trust_domain: Some("example.org".into()),
        principal_type: "Agent".into(),
        claims: claims_map,
        typ: Vec::new(),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now_unix();
    let claims = json!({"iss":ISS,"aud":"mandate","sub":"spiffe://example.org/ns/a/sa/bot",
        "iat":now,"exp":now + 3000,"jti":"bench","owner":"alice"});
    let es = signed(
        &json!({"alg":"ES256","kid":"ec","typ":"JWT"}),
        &claims,
        |m| ec.sign(&SystemRandom::new(), m).unwrap().as_ref().to_vec(),
    );
    let rs = signed(
        &json!({"alg":"RS256","kid":"rsa","typ":"JWT"}),
        &claims,
        |m| {
            let mut sig = vec![0u8; rsa.public_modulus_len()];
            rsa.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), m, &mut sig)
                .unwrap();
            sig
        },
    );
    let v = Verifier::new(vec![settings], CacheSettings::default(), clock).unwrap();
    (v, es, rs, dir)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (v, es, rs, _dir) = setup();
    rt.block_on(async {
        v.verify_uncached(&es).await.unwrap();
        v.verify_uncached(&rs).await.unwrap();
    });

    let mut cold = c.benchmark_group("verify_cold");
    cold.bench_function("es256", |b| {
        b.iter(|| {
            rt.block_on(v.verify_uncached(std::hint::black_box(&es)))
                .unwrap()
        })
    });
    cold.bench_function("rs256_2048", |b| {
        b.iter(|| {
            rt.block_on(v.verify_uncached(std::hint::black_box(&rs)))
                .unwrap()
        })
    });
    cold.finish();

    let mut cached = c.benchmark_group("verify_cached");
    cached.bench_function("es256", |b| {
        b.iter(|| rt.block_on(v.verify(std::hint::black_box(&es))).unwrap())
    });
    cached.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
