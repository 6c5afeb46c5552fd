//! qscript: a fine-tuning workbench in one binary.
//!
//! Layers (top uses bottom): `cli` → `script` → `generate` / (later `train`, `data`) → `model` → `quant`.
//! The script layer holds no ML logic; workflows never touch Rhai.

pub mod cli;
pub mod data;
pub mod device;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod profile;
pub mod quant;
pub mod script;
pub mod train;
pub mod util;

/// Set by Ctrl-C; long native work (generation, loading) polls it and stops cleanly.
pub static CANCEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Error returned when long work notices [`CANCEL`].
pub fn check_cancel() -> anyhow::Result<()> {
    if CANCEL.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("interrupted (Ctrl-C)");
    }
    Ok(())
}

/// How many running pieces of work stop cleanly on Ctrl-C by themselves (a training loop ends
/// its step and writes a checkpoint): while one runs, the Ctrl-C handler must not end the process
/// on the first Ctrl-C (a second one still exits at once).
pub static CANCEL_HANDLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts into [`CANCEL_HANDLED`] while alive.
pub struct CancelHandled(());

impl CancelHandled {
    pub fn begin() -> Self {
        CANCEL_HANDLED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(())
    }
}

impl Drop for CancelHandled {
    fn drop(&mut self) {
        CANCEL_HANDLED.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
