//! qscript: a fine-tuning workbench in one binary.
//!
//! Layers (top uses bottom): `cli` → `script` → `generate` / (later `train`, `data`) → `model` → `quant`.
//! The script layer holds no ML logic; workflows never touch Rhai.

pub mod cli;
pub mod data;
pub mod export;
pub mod device;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod profile;
pub mod quant;
pub mod script;
pub mod serve;
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

/// [`check_cancel`], and the memory limit (`--max-memory`): long native work (generation,
/// tokenization, loading, walks) calls this between items, so a recipe cannot get past the
/// limits inside what Rhai counts as one operation.
pub fn check_limits() -> anyhow::Result<()> {
    check_cancel()?;
    if let Some(msg) = util::memory::over_limit() {
        anyhow::bail!(msg);
    }
    Ok(())
}
