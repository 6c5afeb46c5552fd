//! Llama-family models: config, weights, the explicit forward, tokenizer, loading.

pub mod config;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod tokenizer;
pub mod weights;
