//! A per-op time profile for the training engine, on when `QSCRIPT_PROFILE=1`: each op adds its
//! wall time to a named counter; `report()` prints the table. Off, it costs one relaxed load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static TIMES: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("QSCRIPT_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty());
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// A GPU whose queue each scope drains at its start and end, so the time of queued kernels
/// lands in the op that launched them (set by the benchmarks when profiling on CUDA).
static SYNC: Mutex<Option<candle_core::Device>> = Mutex::new(None);

pub fn sync_device(d: Option<candle_core::Device>) {
    *SYNC.lock().unwrap_or_else(|e| e.into_inner()) = d.filter(|d| !d.is_cpu());
}

fn drain() {
    if let Some(d) = SYNC.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = d.synchronize();
    }
}

/// Adds the time until it is dropped to `name`.
pub struct Scope(Option<(&'static str, Instant)>);

pub fn scope(name: &'static str) -> Scope {
    Scope(enabled().then(|| {
        drain();
        (name, Instant::now())
    }))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((name, t)) = self.0.take() {
            drain();
            let mut m = TIMES.lock().unwrap_or_else(|e| e.into_inner());
            let e = m.entry(name).or_insert((0.0, 0));
            e.0 += t.elapsed().as_secs_f64();
            e.1 += 1;
        }
    }
}

/// The table so far (op, seconds, calls, share), slowest first; clears the counters.
pub fn report() -> String {
    let mut m = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let total: f64 = m.values().map(|v| v.0).sum();
    let mut rows: Vec<_> = m.iter().map(|(k, v)| (*k, v.0, v.1)).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut s = format!("{:<22} {:>9} {:>7} {:>6}\n", "op", "seconds", "calls", "share");
    for (k, secs, calls) in rows {
        s.push_str(&format!("{k:<22} {secs:>9.3} {calls:>7} {:>5.1}%\n", 100.0 * secs / total.max(1e-12)));
    }
    m.clear();
    s
}
