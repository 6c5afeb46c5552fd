//! Text generation: chat templates, sampling, the decode loop with a KV cache.

pub mod sampling;
pub mod template;
