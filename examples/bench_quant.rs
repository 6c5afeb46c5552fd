//! Timing of the 4-bit CPU reference on SmolLM2-135M's decoder linears (30 layers of q/k/v/o
//! 576×576, 192×576, 192×576, 576×576 and gate/up/down 1536×576, 576×1536: 106.2 M weights,
//! random bf16): quantize (nf4 + double quant) and dequantize to f32 / bf16.
//!
//! cargo run --release --example bench_quant [-- THREADS]

use half::bf16;
use qscript::quant::{self, QuantType};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        // xorshift64*, mapped to roughly N(0, 0.02) by summing four uniforms.
        let mut s = 0.0f32;
        for _ in 0..4 {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            s += (seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
        }
        bf16::from_f32((s - 2.0) * 0.035)
    };
    let weights: Vec<(Vec<bf16>, [usize; 2])> =
        (0..30).flat_map(|_| shapes.iter()).map(|&(o, i)| ((0..o * i).map(|_| next()).collect(), [o, i])).collect();
    let n: usize = weights.iter().map(|(w, _)| w.len()).sum();
    println!("{} tensors, {:.1} M weights, {} rayon threads", weights.len(), n as f64 / 1e6, pool.current_num_threads());

    pool.install(|| -> anyhow::Result<()> {
        let t = Instant::now();
        let qs = weights
            .iter()
            .map(|(w, s)| quant::quantize_4bit_bf16(w, s, QuantType::Nf4, 64, true))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tq = t.elapsed().as_secs_f64();
        println!("quantize nf4+dq: {tq:.3} s ({:.0} M weights/s)", n as f64 / tq / 1e6);

        let mut out = vec![0f32; 1536 * 576];
        let t = Instant::now();
        for q in &qs {
            quant::dequantize_4bit_f32(q, &mut out[..q.numel()])?;
        }
        let td = t.elapsed().as_secs_f64();
        println!("dequantize -> f32: {td:.3} s, {:.2} GB/s of f32 output", n as f64 * 4.0 / td / 1e9);

        let mut out = vec![bf16::ZERO; 1536 * 576];
        let t = Instant::now();
        for q in &qs {
            quant::dequantize_4bit_bf16(q, &mut out[..q.numel()])?;
        }
        let td = t.elapsed().as_secs_f64();
        println!("dequantize -> bf16: {td:.3} s, {:.0} M values/s", n as f64 / td / 1e6);
        Ok(())
    })
}
