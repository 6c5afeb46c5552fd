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

pub use crate::kernels::stat_dtype;
