//! Dataset throughput: write N synthetic conversations (~300 tokens each) as JSONL, load them,
//! tokenize + mask them with the default model's tokenizer and chat template, then pack one
//! epoch of batches. Prints timings and memory as JSON.
//!
//!     cargo run --release --example bench_data [-- N]     (N defaults to 100000)
//!
//! HF tokenizers makes several small allocations per token; with glibc's malloc that is ~40%
//! of the time. mimalloc, set below, cuts the CPU time ~1.6×; the qscript binary should set the
//! same global allocator (`src/main.rs`) to get these figures.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use qscript::data::tokenize::ChatTokenizer;
use qscript::data::*;
use qscript::data::chat_template::ChatTemplate;
use qscript::model::hub::{resolve, ModelSource, DEFAULT_MODEL};
use qscript::model::Tokenizer;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

/// Resident and peak memory (kB) from /proc (0 elsewhere).
fn mem() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| s.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0);
    (get("VmRSS:"), get("VmHWM:"))
}

/// CPU seconds this process has used (user + system), from /proc (0 elsewhere). With other
/// work on the machine, CPU time / threads estimates the wall time on an idle machine.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Reset the peak-RSS counter so the next peak is this phase's.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Pseudo-English: a fixed vocabulary of syllable words, sentences with punctuation and numbers.
fn synth(n: usize, seed: u64) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let syl = ["ka", "lo", "ren", "ti", "mar", "sen", "do", "ve", "qui", "bra", "tor", "ne", "shi", "pa", "lum", "gor", "the", "and", "is", "of", "an", "er", "in", "on"];
    let words: Vec<String> = (0..6000)
        .map(|_| (0..rng.random_range(1..4)).map(|_| syl[rng.random_range(0..syl.len())]).collect())
        .collect();
    let sentence = |rng: &mut rand::rngs::StdRng, n_words: usize| -> String {
        let mut s = String::new();
        for i in 0..n_words {
            if i > 0 {
                s.push(' ');
            }
            if rng.random_bool(0.03) {
                s.push_str(&rng.random_range(0..10_000).to_string());
            } else {
                s.push_str(&words[rng.random_range(0..words.len())]);
            }
            if rng.random_bool(0.08) {
                s.push_str([",", ".", "?", "!", ":"][rng.random_range(0..5)]);
            }
        }
        s
    };
    (0..n)
        .map(|_| {
            let turns = rng.random_range(1..3);
            let mut msgs = Vec::new();
            if rng.random_bool(0.3) {
                msgs.push(serde_json::json!({"role": "system", "content": sentence(&mut rng, 12)}));
            }
            for _ in 0..turns {
                let q = rng.random_range(10..44) / turns;
                let a = rng.random_range(40..150) / turns;
                msgs.push(serde_json::json!({"role": "user", "content": sentence(&mut rng, q)}));
                msgs.push(serde_json::json!({"role": "assistant", "content": sentence(&mut rng, a)}));
            }
            serde_json::to_string(&serde_json::json!({ "messages": msgs })).unwrap()
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(100_000);
    let dir = match resolve(DEFAULT_MODEL, None)? {
        ModelSource::HfDir(d) => d,
        other => anyhow::bail!("expected an HF directory, got {other:?}"),
    };
    let tok = Tokenizer::from_dir(&dir)?.ok_or_else(|| anyhow::anyhow!("no tokenizer.json"))?;
    let tpl = ChatTemplate::new(tok.chat_template.as_deref().unwrap(), tok.bos_token.as_deref().unwrap_or(""), tok.eos_token.as_deref().unwrap_or(""))?;
    let eos = tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e)).into_iter().collect();
    let ct = ChatTokenizer::new(&tok, Some(tpl), eos);

    let tmp = std::env::temp_dir().join(format!("qscript-bench-data-{}.jsonl", std::process::id()));
    let t = Instant::now();
    let lines = synth(n, 1);
    std::fs::write(&tmp, lines.join("\n"))?;
    drop(lines);
    let gen_s = t.elapsed().as_secs_f64();
    let file_mb = std::fs::metadata(&tmp)?.len() as f64 / 1e6;

    let t = Instant::now();
    let (ds, report) = load_dataset(&tmp.display().to_string(), &LoadOptions::default())?;
    let load_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&tmp)?;
    eprintln!("{}", report.summary());

    let (rss_before, _) = mem();
    reset_peak();
    let (t, c) = (Instant::now(), cpu_s());
    let opts = TokenizeOptions { max_seq_length: Some(1024), ..Default::default() };
    let tds = tokenize_dataset(&ds, &ct, &opts)?;
    let tok_s = t.elapsed().as_secs_f64();
    let tok_cpu = cpu_s() - c;
    let (rss_after, peak) = mem();
    eprintln!("{}", tds.report.summary());

    let tokens = tds.report.tokens;
    let token_bytes = tds.token_bytes();
    let hf_bytes = tokens * (4 + 8); // u32 ids + i64 labels, as HF keeps them
    let tds = Arc::new(tds);
    let t = Instant::now();
    let mut it = BatchIterator::new(tds.clone(), BatchOptions { batch_size: 8, packing: true, max_seq_length: Some(1024), ..Default::default() })?;
    let n_batches = it.batches_per_epoch();
    let (mut packed_tokens, mut slots) = (0, 0);
    for _ in 0..n_batches {
        let b = it.next_batch();
        packed_tokens += b.num_tokens();
        slots += b.batch * b.seq;
    }
    let batch_s = t.elapsed().as_secs_f64();

    let out = serde_json::json!({
        "records": n,
        "threads": rayon::current_num_threads(),
        "generate_s": gen_s,
        "jsonl_mb": file_mb,
        "load_s": load_s,
        "tokenize_mask_s": tok_s,
        "tokens": tokens,
        "trained_tokens": tds.report.trained_tokens,
        "tokens_per_example": tokens as f64 / tds.len() as f64,
        "tokenize_mask_cpu_s": tok_cpu,
        "tokenize_mask_idle_estimate_s": tok_cpu / rayon::current_num_threads() as f64,
        "tokens_per_s": tokens as f64 / tok_s,
        "token_arrays_mb": token_bytes as f64 / 1e6,
        "hf_style_arrays_mb": hf_bytes as f64 / 1e6,
        "rss_before_tokenize_mb": rss_before as f64 / 1e3,
        "rss_after_tokenize_mb": rss_after as f64 / 1e3,
        "peak_during_tokenize_mb": peak as f64 / 1e3,
        "tokenize_peak_growth_over_token_arrays": (peak.saturating_sub(rss_before)) as f64 * 1e3 / token_bytes as f64,
        "pack_epoch_s": batch_s,
        "packed_batches": n_batches,
        "packing_efficiency": packed_tokens as f64 / slots as f64,
        "lints": tds.report.lints.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
