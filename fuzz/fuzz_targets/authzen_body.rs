//! F-04: the AuthZEN evaluation(s) body; no panic, every refusal a well-formed 4xx, every
//! request that parses decided.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mandate::fuzzing::Bodies;

static TARGET: LazyLock<Bodies> = LazyLock::new(|| {
    let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/policies");
    Bodies::new(&bundle).expect("body target")
});

fuzz_target!(|data: &[u8]| {
    if let Err(v) = TARGET.authzen_body(data) {
        panic!("F-04 violated: {v}");
    }
});
