//! F-02: the JWKS document parser; no panic, bounded memory, no oversized set accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = mandate::fuzzing::jwks(data) {
        panic!("F-02 violated: {v}");
    }
});
