//! F-01: the whole token verification pipeline with fixed keys and a fixed clock; never `Ok`
//! unless the input is one of the committed `valid-*` seeds.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mandate::fuzzing::Tokens;

static TARGET: LazyLock<Tokens> = LazyLock::new(|| {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let seeds = root.join("fuzz/seeds/token");
    let valid = std::fs::read_dir(&seeds)
        .expect("seed directory")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("valid-"))
        .map(|e| std::fs::read(e.path()).expect("seed"));
    Tokens::new(&root.join("config/dev/jwks.json"), valid).expect("token target")
});

fuzz_target!(|data: &[u8]| {
    if let Err(v) = TARGET.check(data) {
        panic!("F-01 violated: {v}");
    }
});
