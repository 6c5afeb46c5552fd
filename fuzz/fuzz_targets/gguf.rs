#![no_main]
// Errors are expected; a panic, an abort, a hang or an oversized allocation is a finding.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = qscript::util::fuzz::gguf(data);
});
