//! `qscript bench ...`: measured figures as JSON lines (performance is reported, not asserted).

use crate::generate::sampling::SamplingParams;
use crate::generate::{generate, GenerateOptions};
use crate::model::{hub, parse_dtype, LoadOptions, Model};
use clap::Subcommand;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Load time, prefill time and greedy decode speed of a model on this machine
    Generate {
        /// Hub id, HF directory or GGUF file
        #[arg(long, default_value = hub::DEFAULT_MODEL)]
        model: String,
        /// Prompt length for the prefill measurement
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens to decode greedily
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Repetitions (the best is reported alongside the median)
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
}

/// Peak resident set size of this process in bytes (VmHWM), where /proc is available.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Generate { model, prompt_tokens, new_tokens, dtype, repeat } => {
            let opts = LoadOptions { dtype: parse_dtype(&dtype)?, ..Default::default() };
            // Resolve first (a first run may download/convert), so load time is the cached load.
            hub::resolve(&model, None)?;
            let t = Instant::now();
            let m = Model::load(&model, &opts)?;
            let load_secs = t.elapsed().as_secs_f64();
            let tok = m.tokenizer()?;
            let text = "The quick brown fox jumps over the lazy dog while the model reads a long prompt. ".repeat(prompt_tokens / 8 + 8);
            let mut ids = tok.encode(&text, false)?;
            ids.truncate(prompt_tokens);
            let gen_opts = GenerateOptions {
                max_new_tokens: 1,
                sampling: SamplingParams { temperature: 0.0, top_k: None, top_p: None, min_p: None, repetition_penalty: None, seed: 0 },
                stop: vec![],
                eos_token_ids: vec![],
            };
            let mut prefill = Vec::new();
            let mut decode = Vec::new();
            for _ in 0..repeat.max(1) {
                let g = generate(&m, &ids, &gen_opts, &mut |_| {})?;
                prefill.push(g.prefill_secs);
                let short = &ids[..16.min(ids.len())];
                let g = generate(&m, short, &GenerateOptions { max_new_tokens: new_tokens, ..gen_opts.clone() }, &mut |_| {})?;
                decode.push(g.tokens_per_sec());
            }
            let line = serde_json::json!({
                "bench": "generate",
                "model": model,
                "dtype": dtype,
                "threads": candle_core::utils::get_num_threads(),
                "load_secs": load_secs,
                "prompt_tokens": ids.len(),
                "prefill_secs_median": median(prefill.clone()),
                "prefill_secs_best": prefill.iter().cloned().fold(f64::INFINITY, f64::min),
                "decode_tokens": new_tokens,
                "decode_tok_per_s_median": median(decode.clone()),
                "decode_tok_per_s_best": decode.iter().cloned().fold(0.0, f64::max),
                "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
            });
            println!("{line}");
            Ok(())
        }
    }
}
