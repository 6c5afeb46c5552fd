//! Next-token selection: greedy, or sampling with temperature / top-k / top-p / min-p and a
//! repetition penalty, in the order transformers applies its logits processors.

use anyhow::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or `do_sample: false`) means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: u64,
}

pub struct Sampler {
    pub params: SamplingParams,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let _ = params;
        todo!("helper: sampling")
    }

    /// Pick the next token from `logits` (f32, one row of vocab size) given the tokens so far
    /// (prompt + generated, for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], previous: &[u32]) -> Result<u32> {
        let _ = (logits, previous);
        todo!("helper: sampling")
    }
}
