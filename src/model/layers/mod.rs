//! The decoder's layers, one file each, every path of a layer side by side: its struct, the
//! inference forward (prefill, and decoding's fast paths where it has them), the training
//! forward returning `(y, Saved)` — exactly the activations its hand-derived backward needs —
//! and that backward. Inference runs the training forward's ops and drops what they save, so
//! the two share their arithmetic by construction; only decoding's batch-1 GEMV, its CPU
//! attention over the buffered cache and the fused CUDA decode (`model/llama/decode_cuda.rs`)
//! are separate, and tests/layers.rs holds them equal. Ops are functions over candle tensors
//! (so every op has a CPU path and runs wherever candle runs); frozen weights never get a
//! gradient. The model (`model/llama.rs`) stacks these layers.
//!
//! Shapes: `n` = batch·seq rows, `h` = hidden, `b`/`t` batch and sequence, `nh`/`kvh` query and
//! key/value heads, `d` head dim.

pub mod attention;
pub mod block;
pub mod embedding;
pub mod kv_cache;
pub mod linear;
pub mod lm_head;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use crate::kernels::stat_dtype;
