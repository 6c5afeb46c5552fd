//! The memory limit (`--max-memory`): a counting wrapper around the global allocator keeps the
//! live heap bytes (recipe data, datasets, models' CPU tensors, generated text — everything a
//! recipe makes), and the recipe engine stops a recipe that goes past the limit between two
//! operations. The count is kept per thread and folded into the total every 256 KiB, so an
//! allocation costs one thread-local add.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The limit in bytes; 0: none (the library's default; the command line sets one).
static LIMIT: AtomicUsize = AtomicUsize::new(0);
const FOLD: isize = 256 << 10;

thread_local! {
    static DELTA: Cell<isize> = const { Cell::new(0) };
}

fn count(n: isize) {
    // `try_with`: a thread being torn down counts straight into the total.
    if DELTA
        .try_with(|d| {
            let v = d.get() + n;
            if v.abs() >= FOLD {
                LIVE.fetch_add(v, Ordering::Relaxed);
                d.set(0);
            } else {
                d.set(v);
            }
        })
        .is_err()
    {
        LIVE.fetch_add(n, Ordering::Relaxed);
    }
}

/// The global allocator `A`, counting live bytes.
pub struct Counting<A>(pub A);

// SAFETY: every call forwards to `A` unchanged; only a counter is updated beside it.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = self.0.alloc(l);
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = self.0.alloc_zeroed(l);
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        self.0.dealloc(p, l);
        count(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = self.0.realloc(p, l, new_size);
        if !q.is_null() {
            count(new_size as isize - l.size() as isize);
        }
        q
    }
}

/// Live heap bytes (0 when the counting allocator is not installed, as in tests).
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed).max(0) as usize
}

pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

pub fn limit() -> usize {
    LIMIT.load(Ordering::Relaxed)
}

/// The error when the live heap is past the limit.
pub fn over_limit() -> Option<String> {
    let max = limit();
    (max > 0 && live() > max).then(|| {
        format!("stopped: memory limit reached ({} in use, --max-memory {}); raise it with --max-memory", human(live()), human(max))
    })
}

/// The default limit: three quarters of the machine's memory (unknown: none).
pub fn default_limit() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok()))
    });
    total_kib.map_or(0, |k| k / 4 * 3 * 1024)
}

/// `8G`, `512M`, `100K`, `1000` (bytes); `0` or `none`: no limit.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_uppercase();
    if t == "NONE" {
        return Ok(0);
    }
    let t = t.trim_end_matches("IB").trim_end_matches('B');
    let (num, mul) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}`: expected a size like 8G, 512M or none"))?;
    Ok((v * mul as f64) as usize)
}

pub fn human(b: usize) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}
