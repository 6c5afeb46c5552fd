//! The training engine's ops: each file holds one op's forward, the activations it saves, and
//! its hand-derived backward, side by side. Ops are functions over candle tensors (so every op
//! has a CPU path and runs wherever candle runs); frozen weights never get a gradient.
//!
//! Shapes: `n` = batch·seq rows, `h` = hidden, `b`/`t` batch and sequence, `nh`/`kvh` query and
//! key/value heads, `d` head dim.

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod linear;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

use candle_core::DType;

/// Precision for reductions (norm statistics, softmax, loss): f32, or f64 when the model runs
/// in f64 (the finite-difference gradient checks).
pub fn stat_dtype(d: DType) -> DType {
    if d == DType::F64 { DType::F64 } else { DType::F32 }
}
