//! A per-op time profile for the training engine, on when `QSCRIPT_PROFILE=1`: each op adds its
//! time to a named counter; `report()` prints the table. Off, it costs one relaxed load.
//!
//! On the CPU a scope counts wall time. With a GPU registered ([`gpu`]) it counts GPU time: CUDA
//! events recorded on the stream at the scope's start and end, read back at `report()`, so the
//! profiled step runs at full speed and each op gets the time its kernels spent in the queue
//! (host launch gaps included). Names starting with '·' are sub-steps inside another scope:
//! listed, not added to the total.

use crate::device::timer;
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

fn add(name: &'static str, secs: f64) {
    let mut m = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let e = m.entry(name).or_insert((0.0, 0));
    e.0 += secs;
    e.1 += 1;
}

/// Time scopes on this GPU's stream (the benchmarks set it when profiling on CUDA); `None` or a
/// CPU device: wall time.
pub fn gpu(d: Option<candle_core::Device>) {
    timer::set(d, add);
}

enum Start {
    Wall(Instant),
    Event(timer::Event),
}

/// Adds the time until it is dropped to `name`.
pub struct Scope(Option<(&'static str, Start)>);

pub fn scope(name: &'static str) -> Scope {
    if !enabled() {
        return Scope(None);
    }
    if let Some(event) = timer::mark() {
        return Scope(event.map(|e| (name, Start::Event(e))));
    }
    Scope(Some((name, Start::Wall(Instant::now()))))
}

/// `f()`, its time added to `name`: one line where a scope and its `drop` would take three.
pub fn time<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    let _s = scope(name);
    f()
}

impl Drop for Scope {
    fn drop(&mut self) {
        match self.0.take() {
            None => {}
            Some((name, Start::Wall(t))) => add(name, t.elapsed().as_secs_f64()),
            Some((name, Start::Event(a))) => timer::close(name, a, add),
        }
    }
}

/// The table so far (op, seconds, calls, share), slowest first; clears the counters.
pub fn report() -> String {
    timer::drain(add);
    let mut m = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let total: f64 = m.iter().filter(|(k, _)| !k.starts_with('·')).map(|(_, v)| v.0).sum();
    let mut rows: Vec<_> = m.iter().map(|(k, v)| (*k, v.0, v.1)).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut s = format!("{:<26} {:>9} {:>7} {:>6}\n", "op", "seconds", "calls", "share");
    for (k, secs, calls) in rows {
        s.push_str(&format!("{k:<26} {secs:>9.3} {calls:>7} {:>5.1}%\n", 100.0 * secs / total.max(1e-12)));
    }
    m.clear();
    s
}
