#[global_allocator]
// Counting live bytes for `--max-memory` (one thread-local add per allocation).
static ALLOC: qscript::util::memory::Counting<mimalloc::MiMalloc> = qscript::util::memory::Counting(mimalloc::MiMalloc);

extern "C" {
    // mimalloc's C API (linked in by the `mimalloc` crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t`.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

fn main() {
    // Never hand freed pages back to the OS: a training step frees and re-allocates about a
    // GiB of activations, and re-faulting those pages cost ~1 s of system time per step.
    // SAFETY: setting an option is thread-safe and valid at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    std::process::exit(qscript::cli::main());
}
