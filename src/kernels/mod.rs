//! Hand-written kernels where candle's generic path is the bottleneck. Each has a portable
//! CPU version; CUDA versions come behind the `cuda` feature.

pub mod attention;
pub mod gemv;
pub mod train_cpu;
pub mod vecmath;

