//! `qscript bench ...`: measured figures as JSON lines (performance is reported, not asserted).

use crate::generate::sampling::SamplingParams;
use crate::generate::{generate, GenerateOptions};
use crate::model::{hub, parse_dtype, LoadOptions, Model};
use clap::Subcommand;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The trainer's QLoRA/LoRA optimizer step (forward and backward over the accumulation micro-batches, clipping at 1.0, AdamW) on random token batches
    #[command(after_help = "Examples:\n  qscript bench train --quant nf4\n  qscript bench train --shape llama-3.2-3b --device cuda --batch 4 --seq 1024 --gradient-checkpointing\n  qscript bench train --shape llama-3.2-3b --device cuda --batch 4 --seq 1024 --gradient-checkpointing --no-offload")]
    Train {
        /// Hub id, HF directory or GGUF file
        #[arg(long, default_value = hub::DEFAULT_MODEL)]
        model: String,
        /// A random-weight model of this shape instead of --model: smollm2-135m, llama-3.2-1b, llama-3.2-3b
        #[arg(long)]
        shape: Option<String>,
        /// cpu, cuda, cuda:N or auto (the GPU when this build has CUDA and one is present)
        #[arg(long, default_value = "auto")]
        device: String,
        /// Compute dtype (default: float32 on the CPU, bfloat16 on CUDA)
        #[arg(long)]
        dtype: Option<String>,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// LoRA rank (all seven projections, alpha = 2r)
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// LoRA dropout (0: no dropout work at all, Unsloth's fast setting)
        #[arg(long, default_value_t = 0.1)]
        lora_dropout: f64,
        /// Base weights: nf4 (4-bit, double quant) or none (dense)
        #[arg(long, default_value = "nf4")]
        quant: String,
        /// Recompute each layer in backward; on a GPU its kept input waits in pinned host memory
        #[arg(long)]
        gradient_checkpointing: bool,
        /// With --gradient-checkpointing: keep the layer inputs on the GPU (no offload to host memory)
        #[arg(long)]
        no_offload: bool,
        /// Micro-batches of --batch rows per optimizer step
        #[arg(long, default_value_t = 1)]
        gradient_accumulation_steps: usize,
        /// Timed steps (after one warm-up step)
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Data-parallel: N ranks of --batch rows each (as `qscript RECIPE --nproc-per-node N`)
        #[command(flatten)]
        launch: super::launch::LaunchArgs,
    },
    /// Load time, prefill time and greedy decode speed of a model on this machine
    #[command(after_help = "Examples:\n  qscript bench generate\n  qscript bench generate --shape llama-3.2-3b --device cuda --quant nf4 --dtype bfloat16")]
    Generate {
        /// Hub id, HF directory or GGUF file
        #[arg(long, default_value = hub::DEFAULT_MODEL)]
        model: String,
        /// A random-weight model of this shape instead of --model (random prompt ids): smollm2-135m, llama-3.2-1b, llama-3.2-3b
        #[arg(long)]
        shape: Option<String>,
        /// cpu, cuda, cuda:N or auto (with --shape)
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Base weights with --shape: nf4 (4-bit, double quant) or none
        #[arg(long, default_value = "none")]
        quant: String,
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
    /// NF4 dequantization (bs 64, double quant) to bf16, and on CUDA the fused 4-bit GEMV
    #[command(after_help = "Examples:\n  qscript bench dequant --device cuda --rows 8192 --cols 3072\n\nGB/s counts 0.5 B read + 2 B written per weight (the Python reference's convention): gb_per_s is the kernel alone (CUDA events), gb_per_s_back_to_back the calls back to back timed by the host, as the reference times bitsandbytes.")]
    Dequant {
        /// cpu, cuda, cuda:N or auto (the GPU when this build has CUDA and one is present)
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 8192)]
        rows: usize,
        #[arg(long, default_value_t = 3072)]
        cols: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    /// Load time, peak memory and the time of one forward over N tokens, dense or 4-bit
    #[command(after_help = "Examples:\n  qscript bench forward\n  qscript bench forward --load-in-4bit --quant-type nf4 --double-quant\n\nRun dense and 4-bit as separate commands: peak_rss_mib is the process's high-water mark.")]
    Forward {
        /// Hub id, HF directory or GGUF file
        #[arg(long, default_value = hub::DEFAULT_MODEL)]
        model: String,
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Quantize the decoder linears while loading (bitsandbytes 4-bit)
        #[arg(long)]
        load_in_4bit: bool,
        #[arg(long, default_value = "nf4", value_parser = ["nf4", "fp4"])]
        quant_type: String,
        #[arg(long)]
        double_quant: bool,
        /// bnb_4bit_compute_dtype
        #[arg(long, default_value = "float32")]
        compute_dtype: String,
        /// Tokens in the forward
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

/// Current resident set size in bytes (VmRSS).
fn current_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process in bytes (VmHWM), where /proc is available.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The 1-minute load average (other work on the machine skews every figure here).
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// The model's dense CPU weight tensors (embedding, linears, LM head if untied, norms).
fn dense_weights(m: &Model) -> Vec<candle_core::Tensor> {
    use crate::model::llama::{Linear, Weight};
    let l = &m.llama;
    let dense = |lin: &Linear| match &lin.weight {
        Weight::Dense(w) => Some(w.clone()),
        _ => None,
    };
    let mut out = vec![l.embed_tokens.clone()];
    out.extend(l.norms().map(|(_, n)| n.weight.clone()));
    out.extend(l.linears().filter_map(|(_, lin)| dense(lin)));
    out.push(l.norm.weight.clone());
    out.extend(l.lm_head.as_ref().and_then(dense));
    out.retain(|t| t.device().is_cpu());
    out
}

/// A CPU tensor's bytes (contiguous float tensors), else `None`.
fn with_bytes<R>(t: &candle_core::Tensor, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    use candle_core::CpuStorage as S;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return None };
    let (a, b) = layout.contiguous_offsets()?;
    fn bytes<T>(v: &[T]) -> &[u8] {
        // SAFETY: plain number types; the byte view covers exactly the elements.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    Some(f(match cpu {
        S::F32(v) => bytes(&v[a..b]),
        S::BF16(v) => bytes(&v[a..b]),
        S::F16(v) => bytes(&v[a..b]),
        S::F64(v) => bytes(&v[a..b]),
        _ => return None,
    }))
}

/// Seconds to read every byte of `weights` once, on the rayon pool as the forward does.
fn read_weights(weights: &[candle_core::Tensor]) -> f64 {
    let t = Instant::now();
    let h = rayon::scope(|_| weights.iter().filter_map(|w| with_bytes(w, crate::kernels::gemv::cpu::stream_read)).fold(0, |a, b| a ^ b));
    std::hint::black_box(h);
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Train { launch, .. } if launch.nproc_per_node.is_some() => {
            super::EXIT_ON_CANCEL.store(false, std::sync::atomic::Ordering::SeqCst);
            super::launch::run(&launch, &|| crate::CANCEL.load(std::sync::atomic::Ordering::SeqCst))
        }
        BenchCommand::Train { model, shape, device, dtype, batch, seq, rank, lora_dropout, quant, gradient_checkpointing, no_offload, gradient_accumulation_steps, steps, .. } => {
            // A rank of a data-parallel run: meet the others; "cuda" / "auto" is GPU LOCAL_RANK.
            let env = crate::train::distributed::init_from_env()?;
            let device = match &env {
                Some(e) if cfg!(feature = "cuda") && (device == "cuda" || device == "auto") => format!("cuda:{}", e.local_rank),
                _ => device,
            };
            let device = crate::device::parse(&device)?;
            let dtype = match dtype {
                Some(d) => parse_dtype(&d)?,
                None if device.is_cpu() => candle_core::DType::F32,
                None => candle_core::DType::BF16,
            };
            let case = TrainCase { model, shape, device, dtype, batch, seq, rank, lora_dropout, quant, ckpt: gradient_checkpointing, offload: !no_offload, accumulation: gradient_accumulation_steps, steps };
            bench_train(&case)
        }
        BenchCommand::Dequant { device, rows, cols, iters } => bench_dequant(&device, rows, cols, iters),
        BenchCommand::Generate { shape: Some(shape), device, quant, prompt_tokens, new_tokens, dtype, repeat, .. } => {
            bench_decode_random(&shape, &device, &quant, &dtype, prompt_tokens, new_tokens, repeat)
        }
        BenchCommand::Generate { model, prompt_tokens, new_tokens, dtype, repeat, .. } => bench_generate(&model, prompt_tokens, new_tokens, &dtype, repeat),
        BenchCommand::Forward { model, dtype, load_in_4bit, quant_type, double_quant, compute_dtype, tokens, repeat } => {
            bench_forward(&model, &dtype, load_in_4bit, quant_type, double_quant, compute_dtype, tokens, repeat)
        }
    }
}

/// Load time, prefill time and greedy decode speed of a model from the hub or a file, with the
/// speed of reading every weight once (the batch-1 decode ceiling).
fn bench_generate(model: &str, prompt_tokens: usize, new_tokens: usize, dtype: &str, repeat: usize) -> anyhow::Result<()> {
    let opts = LoadOptions { dtype: parse_dtype(dtype)?, ..Default::default() };
    // Resolve first (a first run may download/convert), so load time is the cached load.
    hub::resolve(model, None)?;
    let t = Instant::now();
    let m = Model::load(model, &opts)?;
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
    let mut read = Vec::new();
    let weights = dense_weights(&m);
    let weight_bytes: usize = weights.iter().filter_map(|t| with_bytes(t, <[u8]>::len)).sum();
    let load_before = loadavg();
    for _ in 0..repeat.max(1) {
        let g = generate(&m, &ids, &gen_opts, &mut |_| {})?;
        prefill.push(g.prefill_secs);
        let short = &ids[..16.min(ids.len())];
        let g = generate(&m, short, &GenerateOptions { max_new_tokens: new_tokens, ..gen_opts.clone() }, &mut |_| {})?;
        decode.push(g.tokens_per_sec());
        // The decode ceiling, measured between decode runs: read every weight once.
        for _ in 0..5 {
            read.push(read_weights(&weights));
        }
    }
    let read_med = median(read.clone());
    let read_best = read.iter().cloned().fold(f64::INFINITY, f64::min);
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
        // Batch-1 decoding reads every weight byte per token: the time to stream them
        // once (same threads, same row-block tasks as the GEMV) bounds tokens/s.
        "weights_mib": weight_bytes as f64 / (1024.0 * 1024.0),
        "weights_read_secs_median": read_med,
        "read_gb_per_s_median": weight_bytes as f64 / read_med / 1e9,
        "decode_ceiling_tok_per_s_median": 1.0 / read_med,
        "decode_ceiling_tok_per_s_best": 1.0 / read_best,
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        "loadavg_1min": [load_before, loadavg()],
    });
    println!("{line}");
    Ok(())
}

/// Load time, peak memory and the time of one forward over `tokens` tokens, dense or 4-bit.
#[allow(clippy::too_many_arguments)]
fn bench_forward(model: &str, dtype: &str, load_in_4bit: bool, quant_type: String, double_quant: bool, compute_dtype: String, tokens: usize, repeat: usize) -> anyhow::Result<()> {
    use crate::model::quantized::{parse_bnb_dtype, BnbConfig};
    let quantization = if load_in_4bit {
        Some(BnbConfig {
            quant_type: crate::quant::QuantType::parse(&quant_type)?,
            double_quant,
            compute_dtype: parse_bnb_dtype("--compute-dtype", &compute_dtype)?,
            ..Default::default()
        })
    } else {
        None
    };
    let opts = LoadOptions { dtype: parse_dtype(dtype)?, quantization, ..Default::default() };
    hub::resolve(model, None)?;
    let rss_before = peak_rss_bytes();
    let t = Instant::now();
    let m = Model::load(model, &opts)?;
    let load_secs = t.elapsed().as_secs_f64();
    let rss_load = peak_rss_bytes();
    let vocab = m.config().vocab_size as u32;
    let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    m.forward_ids(&ids)?; // warm-up
    let mut secs = Vec::new();
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        m.forward_ids(&ids)?;
        secs.push(t.elapsed().as_secs_f64());
    }
    let mib = |b: Option<u64>| b.map(|b| b as f64 / (1024.0 * 1024.0));
    let line = serde_json::json!({
        "bench": "forward",
        "model": model,
        "dtype": dtype,
        "load_in_4bit": load_in_4bit,
        "quant_type": load_in_4bit.then_some(quant_type),
        "double_quant": load_in_4bit.then_some(double_quant),
        "compute_dtype": load_in_4bit.then_some(compute_dtype),
        "threads": candle_core::utils::get_num_threads(),
        "load_secs": load_secs,
        "weights_mib": m.memory_by_kind().iter().map(|(_, b)| b).sum::<usize>() as f64 / (1024.0 * 1024.0),
        "peak_rss_before_load_mib": mib(rss_before),
        "peak_rss_after_load_mib": mib(rss_load),
        "tokens": tokens,
        "forward_secs_median": median(secs.clone()),
        "forward_secs_best": secs.iter().cloned().fold(f64::INFINITY, f64::min),
        "peak_rss_mib": mib(peak_rss_bytes()),
    });
    println!("{line}");
    Ok(())
}

/// `--quant`: nf4 = QLoRA's choice (nf4 + double quant, computing in the load dtype), or none.
fn qlora_quant(quant: &str, dtype: candle_core::DType) -> anyhow::Result<Option<crate::model::quantized::BnbConfig>> {
    match quant {
        "none" => Ok(None),
        "nf4" => Ok(Some(crate::model::quantized::BnbConfig {
            quant_type: crate::quant::QuantType::Nf4,
            double_quant: true,
            compute_dtype: dtype,
            ..Default::default()
        })),
        other => anyhow::bail!("--quant {other}: expected nf4 or none"),
    }
}

/// Greedy batch-1 decoding of a random-weight model of a benchmark shape: prefill of
/// `prompt_tokens` random ids, then `new_tokens` steps through the KV cache, the argmax taken on
/// the device (one token id comes back per step, as in transformers' generate).
fn bench_decode_random(shape: &str, device: &str, quant: &str, dtype: &str, prompt_tokens: usize, new_tokens: usize, repeat: usize) -> anyhow::Result<()> {
    use candle_core::{Tensor, D};
    let device = crate::device::parse(device)?;
    let dtype = parse_dtype(dtype)?;
    let opts = LoadOptions { dtype, device: device.clone(), quantization: qlora_quant(quant, dtype)?, ..Default::default() };
    let t = Instant::now();
    let m = Model::random(shape, &opts)?;
    let load_secs = t.elapsed().as_secs_f64();
    let llama = &m.llama;
    let vocab = m.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_tokens.max(1) as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for r in 0..repeat.max(1) + 1 {
        let mut cache = llama.new_cache();
        let t0 = Instant::now();
        let logits = llama.forward(&Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?, Some(&mut cache), true)?;
        let mut next = logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        let t1 = Instant::now();
        for _ in 0..new_tokens {
            let logits = llama.forward(&Tensor::new(&[next], &device)?.unsqueeze(0)?, Some(&mut cache), true)?;
            next = logits.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        }
        let t2 = Instant::now();
        if r > 0 {
            // The first round warms up kernels and the memory pool.
            prefill.push((t1 - t0).as_secs_f64());
            decode.push(new_tokens as f64 / (t2 - t1).as_secs_f64());
        }
    }
    let line = serde_json::json!({
        "bench": "generate", "model": format!("random:{shape}"), "device": crate::device::name(&device),
        "dtype": crate::model::dtype_name(dtype), "quant": quant, "load_secs": load_secs,
        "prompt_tokens": prompt.len(), "prefill_secs_median": median(prefill.clone()),
        "decode_tokens": new_tokens,
        "decode_tok_per_s_median": median(decode.clone()),
        "decode_tok_per_s_best": decode.iter().cloned().fold(0.0, f64::max),
        "weights_mib": m.memory_by_kind().iter().map(|(_, b)| b).sum::<usize>() as f64 / (1024.0 * 1024.0),
        "peak_gpu_gib": crate::device::peak_memory(&device)?.map(|b| b as f64 / (1u64 << 30) as f64),
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
    });
    println!("{line}");
    Ok(())
}

fn bench_dequant(device: &str, rows: usize, cols: usize, iters: usize) -> anyhow::Result<()> {
    let dev = crate::device::parse(device)?;
    let line = if dev.is_cpu() {
        let data: Vec<f32> = (0..rows * cols).map(|i| crate::kernels::lora::dropout_bits(7, i) as f32 / 65536.0 - 0.5).collect();
        let q = crate::quant::quantize_4bit(&data, &[rows, cols], crate::quant::QuantType::Nf4, 64, true)?;
        crate::quant::dequantize_4bit(&q, candle_core::DType::BF16)?;
        let t = Instant::now();
        for _ in 0..iters.max(1) {
            std::hint::black_box(crate::quant::dequantize_4bit(&q, candle_core::DType::BF16)?);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
        let gbs = (rows * cols) as f64 * 2.5 / (ms * 1e-3) / 1e9;
        // The CPU's calls are timed back to back already.
        serde_json::json!({"bench": "dequant", "device": "cpu", "rows": rows, "cols": cols, "out": "bfloat16",
            "ms": ms, "gb_per_s": gbs, "gb_per_s_back_to_back": gbs})
    } else {
        cuda_dequant_line(rows, cols, iters)?
    };
    println!("{line}");
    Ok(())
}

fn cuda_dequant_line(rows: usize, cols: usize, iters: usize) -> anyhow::Result<serde_json::Value> {
    let (gbs, ms, back_to_back) = crate::kernels::quant4::bench_dequant(rows, cols, iters)?;
    let (gemv_gbs, gemv_ms) = crate::kernels::quant4::bench_gemv(rows, cols, iters)?;
    Ok(serde_json::json!({"bench": "dequant", "device": "cuda:0", "rows": rows, "cols": cols, "out": "bfloat16",
        "ms": ms, "gb_per_s": gbs, "gb_per_s_back_to_back": back_to_back, "gemv_ms": gemv_ms, "gemv_gb_per_s": gemv_gbs}))
}

/// One `bench train` case.
struct TrainCase {
    model: String,
    shape: Option<String>,
    device: candle_core::Device,
    dtype: candle_core::DType,
    batch: usize,
    seq: usize,
    rank: usize,
    lora_dropout: f64,
    quant: String,
    ckpt: bool,
    /// With `ckpt`: the kept layer inputs in host memory (the trainer's default).
    offload: bool,
    accumulation: usize,
    steps: usize,
}

/// H200 dense bf16 tensor-core peak (TFLOP/s), the denominator of MFU on CUDA.
const GPU_PEAK_TFLOPS: f64 = 989.0;

/// The case's model with LoRA adapters of rank r on all seven projections (alpha 2r, the case's
/// dropout), and its load time.
fn bench_train_model(c: &TrainCase) -> anyhow::Result<(Model, f64)> {
    use crate::model::lora::{self, LoraConfig, TargetModules};
    let opts = LoadOptions { dtype: c.dtype, device: c.device.clone(), quantization: qlora_quant(&c.quant, c.dtype)?, ..Default::default() };
    let t_load = Instant::now();
    let mut m = match &c.shape {
        Some(shape) => Model::random(shape, &opts)?,
        None => {
            hub::resolve(&c.model, None)?;
            Model::load(&c.model, &opts)?
        }
    };
    let load_secs = t_load.elapsed().as_secs_f64();
    let cfg = LoraConfig { r: c.rank, lora_alpha: 2.0 * c.rank as f64, lora_dropout: c.lora_dropout, target_modules: TargetModules::AllLinear, ..Default::default() };
    lora::attach(&mut m.llama, &cfg, 0)?;
    Ok((m, load_secs))
}

/// One step's micro-batches of random token ids (every token trained), and the trainer's step
/// state: AdamW at a constant 2e-4, clipping at TrainingArguments' 1.0, the case's accumulation
/// and checkpointing.
fn bench_train_step(m: &Model, c: &TrainCase) -> anyhow::Result<(Vec<crate::train::MicroBatch>, crate::train::StepState)> {
    use crate::model::engine::TrainBatch;
    use crate::train::{args::Schedule, MicroBatch, StepState, TrainingArguments};
    use rand::{Rng, SeedableRng};
    // The step never writes to output_dir.
    let mut args = TrainingArguments::new("");
    args.learning_rate = 2e-4;
    args.lr_scheduler_type = Schedule::Constant;
    args.gradient_accumulation_steps = c.accumulation;
    args.gradient_checkpointing = c.ckpt;
    args.offload_checkpoints = c.offload;
    args.validate()?;
    let vocab = m.config().vocab_size as u32;
    // Each data-parallel rank its own rows (rank 0's are the single-process run's).
    let comm = crate::train::distributed::world();
    let mut rng = rand::rngs::StdRng::seed_from_u64(comm.rank() as u64);
    let mut micro = Vec::new();
    for _ in 0..c.accumulation {
        let ids: Vec<u32> = (0..c.batch * c.seq).map(|_| rng.random_range(0..vocab)).collect();
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let batch = TrainBatch::new(c.batch, c.seq, &ids, &labels, None, None, &m.llama.device)?;
        micro.push(MicroBatch { batch, tokens: ids.len() });
    }
    // The total only shapes a schedule; this one is constant.
    let mut st = StepState::new(m, args, c.steps + 2)?;
    st.comm = comm;
    Ok((micro, st))
}

/// Seconds and mean loss of `steps` timed trainer steps, after the warm-up steps. GPU work is
/// queued: every step ends with a synchronisation. Two warm-up steps on a GPU (the first loads
/// kernels and grows the memory pool).
fn time_train_steps(m: &mut Model, st: &mut crate::train::StepState, micro: &[crate::train::MicroBatch], steps: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let dev = &m.llama.device.clone();
    // QSCRIPT_PROFILE=host: the host's time per op (what launching costs), not the GPU's.
    if crate::profile::enabled() && std::env::var("QSCRIPT_PROFILE").is_ok_and(|v| v != "host") {
        crate::profile::gpu(Some(dev.clone()));
    }
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    let warmup = if dev.is_cpu() { 1 } else { 2 };
    for i in 0..steps + warmup {
        if i == warmup {
            crate::device::reset_peak_memory(dev)?;
        }
        let t = Instant::now();
        let s = st.train_step(m, micro)?;
        dev.synchronize()?;
        losses.push(s.loss);
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        } else if crate::profile::enabled() {
            let _ = crate::profile::report(); // drop the warm-up steps from the profile
        }
    }
    Ok((times, losses))
}

fn bench_train(c: &TrainCase) -> anyhow::Result<()> {
    let rss0 = peak_rss_bytes();
    let (mut m, load_secs) = bench_train_model(c)?;
    let rss_loaded = current_rss_bytes();
    let (micro, mut st) = bench_train_step(&m, c)?;
    let (times, losses) = time_train_steps(&mut m, &mut st, &micro, c.steps)?;
    let step = median(times.clone());
    let world = crate::train::distributed::world().world_size();
    // Every rank's tokens (the global batch).
    let tokens_per_sec = (c.batch * c.seq * c.accumulation * world) as f64 / step;
    // Matmul FLOPs per token of a frozen-base LoRA step: forward 2·P, input gradients 2·P
    // (no weight gradients), P = the linear and LM-head weights; attention not counted.
    let cfgm = m.config();
    let p_lin = cfgm.num_hidden_layers * (cfgm.hidden_size * (cfgm.num_attention_heads + 2 * cfgm.num_key_value_heads) * cfgm.head_dim
        + cfgm.num_attention_heads * cfgm.head_dim * cfgm.hidden_size + 3 * cfgm.hidden_size * cfgm.intermediate_size)
        + cfgm.vocab_size * cfgm.hidden_size;
    let tflops = 4.0 * p_lin as f64 * tokens_per_sec / 1e12;
    let peak_gpu = crate::device::peak_memory(&m.llama.device)?;
    let line = serde_json::json!({
        "bench": "train", "model": c.shape.as_ref().map_or(c.model.clone(), |s| format!("random:{s}")),
        "device": crate::device::name(&m.llama.device), "dtype": crate::model::dtype_name(m.llama.dtype),
        "quant": c.quant, "batch": c.batch, "seq": c.seq, "rank": c.rank, "lora_dropout": c.lora_dropout, "gradient_accumulation_steps": c.accumulation,
        "gradient_checkpointing": c.ckpt,
        // Whether the checkpointed layer inputs did go to host memory (only a GPU offloads).
        "offload_checkpoints": c.ckpt && c.offload && m.llama.device.is_cuda(), "threads": candle_core::utils::get_num_threads(), "world_size": world,
        "trainable_params": crate::model::lora::parameter_counts(&m.llama).0,
        "load_secs": load_secs,
        "step_secs_median": step, "step_secs_best": times.iter().cloned().fold(f64::INFINITY, f64::min),
        "tokens_per_sec": tokens_per_sec,
        "matmul_tflops_per_sec": tflops,
        "mfu": peak_gpu.map(|_| tflops / (GPU_PEAK_TFLOPS * world as f64)),
        "peak_gpu_gib": peak_gpu.map(|b| b as f64 / (1u64 << 30) as f64),
        "loss_first": losses.first(), "loss_last": losses.last(),
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / 1048576.0),
        "rss_before_load_mib": rss0.map(|b| b as f64 / 1048576.0),
        "rss_after_load_mib": rss_loaded.map(|b| b as f64 / 1048576.0),
    });
    if crate::train::distributed::is_main_process() {
        println!("{line}");
    }
    if crate::profile::enabled() {
        eprint!("{}", crate::profile::report());
    }
    Ok(())
}
