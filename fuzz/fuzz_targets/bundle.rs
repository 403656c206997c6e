//! F-03: the bundle loader and policy parser (policies, schema, entities, tests, manifest
//! separated by NUL bytes); no panic, every refusal names a problem, parse ∘ print = id.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mandate::fuzzing::Bundles;

static TARGET: LazyLock<Bundles> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("mandate-fuzz-bundle-{}", std::process::id()));
    Bundles::new(dir).expect("bundle target")
});

fuzz_target!(|data: &[u8]| {
    if let Err(v) = TARGET.load(data) {
        panic!("F-03 violated: {v}");
    }
});
