//! The fuzz targets of `fuzz/` (docs/security.md F-01 to F-04) on the stable toolchain,
//! without cargo-fuzz: each test replays the committed seed corpus (`fuzz/seeds/<target>/`),
//! then runs a seeded random mutator over it for a bounded time. The mutator is blind (no
//! coverage feedback); `scripts/fuzz` runs the same targets under libFuzzer.
//!
//! `MANDATE_FUZZ_SECS` sets the time per target (default 3); `MANDATE_FUZZ_SEED` replays a
//! run (the seed is printed). An input that breaks an oracle is written to
//! `$CARGO_TARGET_TMPDIR/fuzz-failures/` and named in the failure, ready to be committed as
//! a seed once fixed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use mandate::fuzzing::{self, Bodies, Bundles, Tokens, Violation};
use serde_json::json;

fn seeds_dir(target: &str) -> PathBuf {
    common::repo().join("fuzz/seeds").join(target)
}

/// The committed seeds of `target`, by file name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(seeds_dir(target))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds for `{target}`");
    out
}

fn budget() -> Duration {
    let secs = std::env::var("MANDATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Fragments a mutation may insert: JSON and JOSE syntax, edge numbers, and names the
/// parsers look for.
const DICTIONARY: &[&str] = &[
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    ".",
    "=",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "-0",
    "1e999",
    "9223372036854775808",
    "-9223372036854775809",
    "0.5",
    "\"alg\"",
    "\"none\"",
    "\"kid\"",
    "\"crit\"",
    "\"jku\"",
    "\"typ\"",
    "\"exp\"",
    "\"aud\"",
    "\"sub\"",
    "\"iss\"",
    "\"kty\"",
    "\"EC\"",
    "\"RSA\"",
    "\"OKP\"",
    "\"n\"",
    "\"e\"",
    "\"x\"",
    "\"y\"",
    "\"crv\"",
    "\"keys\"",
    "\"action\"",
    "\"resource\"",
    "\"subject\"",
    "\"context\"",
    "\"mandate\"",
    "\"properties\"",
    "\"evaluations\"",
    "\"__entity\"",
    "\"__extn\"",
    "permit",
    "forbid",
    "when",
    "unless",
    "principal",
    "resource",
    "action",
    "context",
    " in ",
    " like ",
    "has",
    "@id(\"x\")",
    "@approval(\"g\")",
    "@quorum(\"2\")",
    "Action::\"",
    "::",
    "decimal(\"1.0\")",
    "ip(\"10.0.0.0/8\")",
    "\u{feff}",
    "\u{0}",
    "\u{ffff}",
];

/// One random edit of `input`. For tokens (`b64_segments`), half the edits decode a segment,
/// edit the bytes and re-encode it, so edits reach the JSON behind the base64url.
fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>], b64_segments: bool) -> Vec<u8> {
    if b64_segments && rng.below(2) == 0 {
        let text = String::from_utf8_lossy(input);
        let mut parts: Vec<String> = text.split('.').map(str::to_owned).collect();
        let i = rng.below(parts.len());
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        if let Ok(bytes) = b64.decode(&parts[i]) {
            let edited = mutate(rng, &bytes, others, false);
            parts[i] = b64.encode(edited);
            return parts.join(".").into_bytes();
        }
    }
    let mut out = input.to_vec();
    let pos = rng.below(out.len() + 1);
    match rng.below(8) {
        0 if !out.is_empty() => {
            let i = rng.below(out.len());
            out[i] ^= 1 << rng.below(8);
        }
        1 if !out.is_empty() => {
            let i = rng.below(out.len());
            out[i] = rng.next() as u8;
        }
        2 => out.insert(pos, rng.next() as u8),
        3 if !out.is_empty() => {
            let len = 1 + rng.below(16.min(out.len()));
            let start = rng.below(out.len() - len + 1);
            out.drain(start..start + len);
        }
        4 if !out.is_empty() => {
            let len = 1 + rng.below(64.min(out.len()));
            let start = rng.below(out.len() - len + 1);
            let chunk = out[start..start + len].to_vec();
            let at = rng.below(out.len() + 1);
            out.splice(at..at, chunk);
        }
        5 if !others.is_empty() => {
            let other = &others[rng.below(others.len())];
            let from = rng.below(other.len() + 1);
            out.truncate(pos);
            out.extend_from_slice(&other[from..]);
        }
        _ => {
            let word = DICTIONARY[rng.below(DICTIONARY.len())];
            out.splice(pos..pos, word.bytes());
        }
    }
    out
}

/// Replay the seeds of `target`, then mutate them until the budget is spent. Every input
/// must keep `oracle`; the first that does not is saved and fails the test.
fn drive(target: &str, b64_segments: bool, oracle: impl Fn(&[u8]) -> Result<(), Violation>) {
    let corpus: Vec<Vec<u8>> = seeds(target).into_iter().map(|(_, b)| b).collect();
    let fail = |input: &[u8], v: Violation| -> ! {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{target}-{:016x}", fnv(input)));
        std::fs::write(&path, input).unwrap();
        panic!("{target}: {v}\ninput saved to {}", path.display());
    };
    for seed in &corpus {
        if let Err(v) = oracle(seed) {
            fail(seed, v);
        }
    }
    let seed = std::env::var("MANDATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut rng = Rng(seed);
    let deadline = Instant::now() + budget();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let mut input = corpus[rng.below(corpus.len())].clone();
        for _ in 0..1 + rng.below(4) {
            input = mutate(&mut rng, &input, &corpus, b64_segments);
        }
        if let Err(v) = oracle(&input) {
            fail(&input, v);
        }
        runs += 1;
    }
    eprintln!(
        "{target}: {} seeds replayed, {runs} mutated inputs, MANDATE_FUZZ_SEED={seed}",
        corpus.len()
    );
    assert!(
        runs > 0 || budget().is_zero(),
        "{target}: no mutated input ran"
    );
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn token_target() -> Tokens {
    let valid = seeds("token")
        .into_iter()
        .filter(|(name, _)| name.starts_with("valid-"))
        .map(|(_, b)| b);
    Tokens::new(&common::repo().join("config/dev/jwks.json"), valid).unwrap()
}

fn body_target() -> Bodies {
    Bodies::new(&common::repo().join("config/policies")).unwrap()
}

#[test]
fn f01_token_seeds_that_should_verify_do_and_the_rest_are_refused() {
    let target = token_target();
    let tokens = seeds("token");
    let valid = tokens
        .iter()
        .filter(|(n, _)| n.starts_with("valid-"))
        .count();
    assert!(valid >= 3, "the valid seeds are gone");
    for (name, bytes) in &tokens {
        target
            .check(bytes)
            .unwrap_or_else(|v| panic!("seed `{name}`: {v}"));
    }
    // The oracle is live: a valid seed outside the known-valid set is a violation.
    let strict = Tokens::new(&common::repo().join("config/dev/jwks.json"), []).unwrap();
    let (name, first) = tokens
        .iter()
        .find(|(n, _)| n.starts_with("valid-"))
        .unwrap();
    assert!(strict.check(first).is_err(), "seed `{name}` did not verify");
}

#[test]
fn f01_pb02_mutated_tokens_never_verify() {
    let target = token_target();
    drive("token", true, |b| target.check(b));
}

#[test]
fn f02_jwks_parser_never_panics_and_bounds_what_it_accepts() {
    drive("jwks", false, fuzzing::jwks);
}

#[test]
fn f04_check_body_rejects_are_well_formed_4xx() {
    let target = body_target();
    drive("check_body", false, |b| target.check_body(b));
}

#[test]
fn f04_authzen_body_rejects_are_well_formed_4xx() {
    let target = body_target();
    drive("authzen_body", false, |b| target.authzen_body(b));
}

#[test]
fn f03_bundle_loader_never_panics_and_policies_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let target = Bundles::new(dir.path().join("bundle")).unwrap();
    drive("bundle", false, |b| target.load(b));
}

/// Mint the token seeds again (`cargo test --test fuzz -- --ignored`): valid tokens of each
/// issuer of the token target at its fixed clock, and near misses of each. Run it only when
/// the target's issuers change; commit what it writes.
#[test]
#[ignore = "writes fuzz/seeds/token; run by hand when the token target's issuers change"]
fn f01_write_token_seeds() {
    let dir = seeds_dir("token");
    std::fs::create_dir_all(&dir).unwrap();
    let key = std::fs::read(common::repo().join("config/dev/signing-key.pem")).unwrap();
    let now = fuzzing::CLOCK;
    let ttl = Duration::from_secs(600);
    let es = |iss: &str, sub: &str, extra: serde_json::Value, at: i64| {
        mandate::identity::dev::mint(
            &key,
            "dev-1",
            iss,
            "mandate",
            sub,
            extra.as_object().cloned().unwrap_or_default(),
            ttl,
            at,
        )
        .unwrap()
    };
    let hs = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(fuzzing::HMAC_SECRET).unwrap(),
        )
        .unwrap()
    };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let oidc = fuzzing::OIDC_ISSUER;
    let svid = fuzzing::SPIFFE_ISSUER;
    let hmac_claims = json!({"iss": fuzzing::HMAC_ISSUER, "aud": ["mandate", "other"],
        "sub": "agent-2", "iat": now, "exp": now + 600, "groups": ["g"], "azp": "mandate"});
    let payload =
        b64(&json!({"iss": oidc, "aud": "mandate", "sub": "a", "exp": now + 60}).to_string());
    let files: Vec<(&str, String)> = vec![
        (
            "valid-oidc",
            es(
                oidc,
                "agent-1",
                json!({"owner": "bob", "groups": ["finance-approvers"]}),
                now,
            ),
        ),
        (
            "valid-spiffe",
            es(
                svid,
                "spiffe://example.org/ns/default/sa/agent",
                json!({}),
                now,
            ),
        ),
        ("valid-hmac", hs(hmac_claims.clone())),
        ("expired-oidc", es(oidc, "agent-1", json!({}), now - 10_000)),
        ("future-oidc", es(oidc, "agent-1", json!({}), now + 10_000)),
        (
            "spiffe-bad-sub",
            es(svid, "spiffe://other.org/x", json!({}), now),
        ),
        (
            "hmac-wrong-aud",
            hs(json!({"iss": fuzzing::HMAC_ISSUER, "aud": "x", "sub": "s", "exp": now + 60})),
        ),
        (
            "alg-none",
            format!("{}.{payload}.", b64(r#"{"alg":"none"}"#)),
        ),
        (
            "jku",
            format!(
                "{}.{payload}.c2ln",
                b64(r#"{"alg":"ES256","jku":"http://127.0.0.1/k"}"#)
            ),
        ),
        (
            "crit",
            format!("{}.{payload}.c2ln", b64(r#"{"alg":"ES256","crit":[]}"#)),
        ),
        (
            "duplicate-alg",
            format!("{}.{payload}.c2ln", b64(r#"{"alg":"ES256","alg":"HS256"}"#)),
        ),
        (
            "unknown-kid",
            format!(
                "{}.{payload}.c2ln",
                b64(r#"{"alg":"ES256","kid":"../../etc/passwd"}"#)
            ),
        ),
        (
            "hs-with-es-issuer",
            format!("{}.{payload}.c2ln", b64(r#"{"alg":"HS256","typ":"JWT"}"#)),
        ),
        (
            "four-segments",
            format!("{}.{payload}.c2ln.c2ln", b64(r#"{"alg":"ES256"}"#)),
        ),
    ];
    for (name, token) in files {
        std::fs::write(dir.join(name), token).unwrap();
    }
    let target = token_target();
    for (name, bytes) in seeds("token") {
        target
            .check(&bytes)
            .unwrap_or_else(|v| panic!("{name}: {v}"));
    }
}
