//! `qscript quantize SRC OUT`: write a bitsandbytes 4-bit checkpoint (what transformers saves
//! for a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`).

use crate::model::quantized::{parse_bnb_dtype, quantize_checkpoint, BnbConfig};
use crate::quant::QuantType;
use std::path::PathBuf;

pub const EXAMPLES: &str = "\
Examples:
  qscript quantize path/to/SmolLM2-135M out/SmolLM2-135M-bnb-4bit --quant-type nf4 --double-quant
                                  a model directory: decoder linears in 4 bits, the rest copied,
                                  config.json gains quantization_config (loads in transformers)
  qscript quantize weights.safetensors weights-nf4.safetensors --blocksize 128
                                  a single file: every 2-D floating tensor quantized
  qscript quantize src out --force  replace an existing OUT";

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// An HF model directory or a .safetensors file
    pub src: PathBuf,
    /// Output directory (for a model directory) or .safetensors file
    pub out: PathBuf,
    /// 4-bit data type
    #[arg(long, default_value = "nf4", value_parser = ["nf4", "fp4"])]
    pub quant_type: String,
    /// Quantize the absmax statistics too (bnb_4bit_use_double_quant)
    #[arg(long)]
    pub double_quant: bool,
    /// Elements per absmax block: a power of two from 32 to 4096
    #[arg(long, default_value_t = crate::quant::DEFAULT_BLOCKSIZE)]
    pub blocksize: usize,
    /// bnb_4bit_compute_dtype recorded in config.json (float32, bfloat16, float16)
    #[arg(long, default_value = "bfloat16")]
    pub compute_dtype: String,
    /// Overwrite OUT if it exists
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let cfg = BnbConfig {
        quant_type: QuantType::parse(&a.quant_type)?,
        double_quant: a.double_quant,
        compute_dtype: parse_bnb_dtype("--compute-dtype", &a.compute_dtype)?,
        blocksize: a.blocksize,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let r = quantize_checkpoint(&a.src, &a.out, &cfg, a.force, &mut |done, total, name| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    });
    bar.finish_and_clear();
    let r = r?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{}: {} tensors quantized ({}{}, blocksize {}), {} copied; {:.1} MiB -> {:.1} MiB in {:.2}s",
        a.out.display(),
        r.quantized,
        cfg.quant_type,
        if cfg.double_quant { " + double quant" } else { "" },
        cfg.blocksize,
        r.copied,
        mib(r.bytes_in),
        mib(r.bytes_out),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
