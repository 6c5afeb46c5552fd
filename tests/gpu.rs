//! CUDA 4-bit kernels (src/kernels/quant4/: cuda.rs, quant4.cu) against their CPU twins: dequantization
//! bit for bit (NF4/FP4, plain and double-quantized scales, odd sizes, every golden tensor), the
//! fused GEMV within f32 accuracy, and `Linear` on a GPU. Every test prints a skip line and
//! passes when CUDA device 0 cannot be opened.
#![cfg(feature = "cuda")]

mod common;
use common::values;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use qscript::kernels::quant4::Quant4Gpu;
use qscript::model::llama::Linear;
use qscript::quant::{self, QuantType, Quantized4bit};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// CUDA device 0, opened once for all tests; `None` (after a skip line) without one.
fn gpu(test: &str) -> Option<&'static Device> {
    static DEV: OnceLock<Option<Device>> = OnceLock::new();
    let dev = DEV
        .get_or_init(|| match qscript::device::open_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("no CUDA device: {e}");
                None
            }
        })
        .as_ref();
    if dev.is_none() {
        eprintln!("{test}: skipped (no CUDA device)");
    }
    dev
}

fn upload(q: &Quantized4bit, dev: &Device) -> Quant4Gpu {
    Quant4Gpu::upload(q, dev.as_cuda_device().unwrap()).unwrap()
}

/// Raw little-endian bytes of a tensor on any device (bitwise: -0.0 ≠ 0.0, NaN payloads kept).
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
    match t.dtype() {
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<bf16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<f16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

/// "" when equal, else where the first difference is.
fn diff(got: &[u8], want: &[u8], elem: usize) -> String {
    if got == want {
        return String::new();
    }
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0) / elem;
    format!("{n} differing bytes (len {} vs {}), first at element {first}", got.len(), want.len())
}

/// The GPU dequantization of `q` in f32, bf16 and f16 equals the CPU's byte for byte; pushes
/// a line per mismatch to `bad`. Returns the GPU tensors.
fn check_dequant(dev: &Device, q: &Quantized4bit, what: &str, bad: &mut Vec<String>) -> HashMap<DType, Tensor> {
    let g = upload(q, dev);
    let mut out = HashMap::new();
    for (dtype, elem) in [(DType::F32, 4), (DType::BF16, 2), (DType::F16, 2)] {
        let got = g.dequantize(dtype).unwrap();
        assert_eq!(got.dims(), q.state.shape.as_slice(), "{what}");
        assert!(got.device().is_cuda());
        let want = quant::dequantize_4bit(q, dtype).unwrap();
        let d = diff(&bytes(&got), &bytes(&want), elem);
        if !d.is_empty() {
            bad.push(format!("{what} {dtype:?}: {d}"));
        }
        out.insert(dtype, got);
    }
    out
}

#[test]
fn dequantize_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("dequantize_matches_cpu_bit_for_bit") else { return };
    // Odd counts (a padding nibble), partial blocks, one element, a single 32-wide group, the
    // vector path over many threads, >256 blocks (two nested scales, the second partial).
    let shapes: &[&[usize]] = &[&[3, 100], &[3, 101], &[7, 9], &[1], &[32], &[1, 63], &[64, 64], &[300, 64], &[129, 577], &[1000, 576]];
    let mut bad = Vec::new();
    let mut checked = 0;
    for (si, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut w = values(n, si as u64);
        // Scales of very different sizes, zeros, denormals, -0.0.
        for (i, v) in w.iter_mut().enumerate() {
            match i % 97 {
                0 => *v *= 1e30,
                1 => *v = 0.0,
                2 => *v = -0.0,
                3 => *v = 1e-40,
                _ if (i / 64) % 5 == 4 => *v *= 1e-36,
                _ => {}
            }
        }
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for bs in [32, 64, 4096] {
                for dq in [false, true] {
                    let q = quant::quantize_4bit(&w, shape, qt, bs, dq).unwrap();
                    check_dequant(dev, &q, &format!("{shape:?} {qt} bs{bs} dq={dq}"), &mut bad);
                    checked += 3;
                }
            }
        }
    }
    assert!(bad.is_empty(), "{} of {checked} differ:\n{}", bad.len(), bad.join("\n"));
    eprintln!("{checked} GPU dequantizations bit-identical to the CPU");
}

/// Infinite and NaN scales: the products' NaN bits follow the CPU's (x86) rules.
#[test]
fn dequantize_non_finite_scales_like_the_cpu() {
    let Some(dev) = gpu("dequantize_non_finite_scales_like_the_cpu") else { return };
    let mut bad = Vec::new();
    let mut w = values(4 * 64, 9);
    w[5] = f32::INFINITY; // block 0: absmax inf → ±inf and 0·inf = NaN
    w[70] = f32::NEG_INFINITY; // block 1
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for dq in [false, true] {
            let mut q = quant::quantize_4bit(&w, &[4, 64], qt, 64, dq).unwrap();
            check_dequant(dev, &q, &format!("inf {qt} dq={dq}"), &mut bad);
            if let quant::Absmax::Plain(a) = &mut q.state.absmax {
                a[2] = f32::NAN; // a NaN scale (a corrupt checkpoint)
                a[3] = -f32::NAN;
                check_dequant(dev, &q, &format!("NaN {qt}"), &mut bad);
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// tests/golden under the working directory (the binary is built here and run from the repo
/// root on the GPU machine), else under the tree it was built from.
fn golden(p: &str) -> PathBuf {
    let here = PathBuf::from("tests/golden");
    let base = if here.is_dir() { here } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden") };
    base.join(p)
}

fn load(p: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(p), &Device::Cpu).unwrap()
}

/// Every `input.qt.bsN.mode` group of the bitsandbytes golden files: our quantization of the
/// input dequantized on the GPU equals the CPU and bnb's own dequantized tensors.
#[test]
fn golden_nf4_files_dequantize_on_gpu() {
    let Some(dev) = gpu("golden_nf4_files_dequantize_on_gpu") else { return };
    let mut bad = Vec::new();
    let mut groups = 0;
    let mut vs_bnb = 0;
    for file in ["nf4/1.safetensors", "nf4/extra.safetensors"] {
        let g = load(file);
        let mut inputs: Vec<&String> = g.keys().filter(|k| !k.contains('.')).collect();
        inputs.sort();
        for input in inputs {
            let mut ps: Vec<&str> =
                g.keys().filter(|k| k.starts_with(&format!("{input}.")) && k.ends_with(".packed")).map(|k| k.trim_end_matches(".packed")).collect();
            ps.sort();
            for p in ps {
                let parts: Vec<&str> = p.split('.').collect();
                let qt = QuantType::parse(parts[1]).unwrap();
                let bs: usize = parts[2].trim_start_matches("bs").parse().unwrap();
                let q = quant::quantize_4bit_tensor(&g[input.as_str()], qt, bs, parts[3] == "dq").unwrap();
                let ours = check_dequant(dev, &q, &format!("{file} {p}"), &mut bad);
                groups += 1;
                for (suffix, dtype) in [
                    ("dequant", g[input.as_str()].dtype()),
                    ("dequant_float32", DType::F32),
                    ("dequant_bfloat16", DType::BF16),
                    ("dequant_float16", DType::F16),
                ] {
                    if let Some(want) = g.get(&format!("{p}.{suffix}")) {
                        let d = diff(&bytes(&ours[&dtype]), &bytes(want), 2);
                        if !d.is_empty() {
                            bad.push(format!("{file} {p}.{suffix} vs bitsandbytes: {d}"));
                        }
                        vs_bnb += 1;
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "{} mismatches:\n{}", bad.len(), bad.join("\n"));
    // 80 + 58 groups; 208 dequantized tensors from bnb (tests/golden/nf4/EXTRA.md).
    assert_eq!((groups, vs_bnb), (138, 208), "groups / bnb tensors checked");
    eprintln!("{groups} golden groups x 3 dtypes equal the CPU, {vs_bnb} equal bitsandbytes");
}

/// The generator of tests/golden/nf4's big case (EXTRA.md).
fn gen(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut u = (i.wrapping_mul(0x9E37_79B1).wrapping_add(seed.wrapping_mul(0x85EB_CA77))) & 0xffff_ffff;
            u ^= u >> 15;
            u = (u * 0x2C1B_3C6D) & 0xffff_ffff;
            u ^= u >> 12;
            u >>= 8;
            (u as f32) * 2f32.powi(-24) * 4.0 + 0.01
        })
        .collect()
}

/// 11008 × 1024 bf16, double quantization over 176 128 blocks: the SHA-256 of bnb's bf16
/// dequantization.
#[test]
fn golden_big_tensor_on_gpu() {
    let Some(dev) = gpu("golden_big_tensor_on_gpu") else { return };
    let g = load("nf4/extra.safetensors");
    let x: Vec<bf16> = gen(11008 * 1024, 7).iter().map(|v| bf16::from_f32(v - 2.0)).collect();
    let q = quant::quantize_4bit_bf16(&x, &[11008, 1024], QuantType::Nf4, 64, true).unwrap();
    let deq = upload(&q, dev).dequantize(DType::BF16).unwrap();
    assert_eq!(Sha256::digest(bytes(&deq)).to_vec(), bytes(&g["big7.nf4.bs64.dq.dequant_bfloat16_sha256"]));
}

/// The transformers checkpoint (nf4, double quant) loaded from its tensors dequantizes on the
/// GPU exactly as on the CPU.
#[test]
fn golden_bnb4bit_checkpoint_on_gpu() {
    let Some(dev) = gpu("golden_bnb4bit_checkpoint_on_gpu") else { return };
    let gold = load("bnb4bit/1/quantized/model.safetensors");
    let mut prefixes: Vec<&str> = gold.keys().filter_map(|k| k.strip_suffix(".quant_state.bitsandbytes__nf4")).collect();
    prefixes.sort();
    assert_eq!(prefixes.len(), 14);
    let mut bad = Vec::new();
    for p in prefixes {
        let q = Quantized4bit::from_bnb_tensors(p, |n| gold.get(n).cloned()).unwrap();
        check_dequant(dev, &q, p, &mut bad);
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The fused GEMV against the CPU's dequantize + matmul: f32 within 1e-4 of max|y| (accumulation
/// order only), bf16 x/y within bf16 rounding. Shapes cover 8/16/32-lane groups, rows that are
/// not a multiple of the 4-row group, and the generic kernel (cols % 32 ≠ 0, misaligned x).
#[test]
fn gemv_matches_cpu_matmul() {
    let Some(dev) = gpu("gemv_matches_cpu_matmul") else { return };
    let shapes = [(576, 576), (1536, 576), (49152, 576), (576, 1536), (1026, 3072), (3, 100), (7, 9), (5, 33)];
    let mut worst = 0f32;
    for (si, &(rows, cols)) in shapes.iter().enumerate() {
        let w: Vec<f32> = values(rows * cols, 100 + si as u64).iter().map(|v| v * 0.05).collect();
        let xv: Vec<f32> = values(cols, 200 + si as u64);
        for (qt, dq) in [(QuantType::Nf4, true), (QuantType::Nf4, false), (QuantType::Fp4, true)] {
            let q = quant::quantize_4bit(&w, &[rows, cols], qt, 64, dq).unwrap();
            let g = upload(&q, dev);
            let wd = quant::dequantize_4bit(&q, DType::F32).unwrap();
            let what = format!("[{rows}, {cols}] {qt} dq={dq}");
            // f32, also from a misaligned x (offset 1 element: the generic kernel).
            let x = Tensor::from_vec(xv.clone(), (1, cols), &Device::Cpu).unwrap();
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let scale = max_abs(&want);
            let padded = Tensor::cat(&[&Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap(), &x], 1).unwrap();
            for xg in [x.to_device(dev).unwrap(), padded.to_device(dev).unwrap().narrow(1, 1, cols).unwrap()] {
                let got = g.gemv(&xg).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[1, rows][..], DType::F32), "{what}");
                let err = max_abs(&(got.to_device(&Device::Cpu).unwrap() - &want).unwrap()) / scale;
                worst = worst.max(err);
                assert!(err <= 1e-4, "{what} f32: max |Δ| = {err} of max |y|");
            }
            // bf16 x and y; the reference uses the same bf16 x.
            let xb = x.to_dtype(DType::BF16).unwrap();
            let want = xb.to_dtype(DType::F32).unwrap().matmul(&wd.t().unwrap()).unwrap();
            let got = g.gemv(&xb.to_device(dev).unwrap()).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let err = max_abs(&(got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap() - &want).unwrap()) / max_abs(&want);
            // y rounded to bf16: up to 2^-8 of |y|.
            assert!(err <= 5e-3, "{what} bf16: max |Δ| = {err} of max |y|");
            // f16 x goes through f32.
            let got = g.gemv(&x.to_dtype(DType::F16).unwrap().to_device(dev).unwrap()).unwrap();
            assert_eq!(got.dtype(), DType::F16);
        }
    }
    eprintln!("GEMV: worst f32 error {worst:e} of max |y|");
}

/// A 4-bit `Linear` on the GPU: `dense_weight` is the CPU's bit for bit, and forward (batch 1:
/// fused GEMV; batched: GPU dequantize + matmul) matches `x Wᵀ` computed in f32 on the CPU from
/// x in the compute dtype (1e-4 of max |y| in f32; bf16 results are rounded to 2^-8).
#[test]
fn linear_4bit_on_gpu_matches_cpu() {
    let Some(dev) = gpu("linear_4bit_on_gpu_matches_cpu") else { return };
    let (rows, cols) = (192, 320);
    let w: Vec<f32> = values(rows * cols, 7).iter().map(|v| v * 0.05).collect();
    let q = quant::quantize_4bit(&w, &[rows, cols], QuantType::Nf4, 64, true).unwrap();
    for (compute, dtype) in [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::BF16, DType::BF16)] {
        let cpu = Linear::new_4bit(q.clone(), compute, dtype, &Device::Cpu, None).unwrap();
        assert!(cpu.device().is_cpu());
        let gpu = Linear::new_4bit(q.clone(), compute, dtype, dev, None).unwrap();
        assert!(gpu.device().is_cuda());
        let (wc, wg) = (cpu.dense_weight().unwrap(), gpu.dense_weight().unwrap());
        assert!(wg.device().is_cuda());
        assert_eq!(bytes(&wg), bytes(&wc), "dense_weight {compute:?}/{dtype:?}");
        let tol = if compute == DType::F32 && dtype == DType::F32 { 1e-4 } else { 1e-2 };
        let w32 = wc.to_dtype(DType::F32).unwrap();
        for t in [1, 3] {
            let x = Tensor::from_vec(values(t * cols, 11 + t as u64), (1, t, cols), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let want = x.to_dtype(compute).unwrap().to_dtype(DType::F32).unwrap().broadcast_matmul(&w32.t().unwrap()).unwrap();
            let got = gpu.forward(&x.to_device(dev).unwrap()).unwrap();
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
            let got = got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let err = max_abs(&(got - &want).unwrap()) / max_abs(&want);
            assert!(err <= tol, "forward t={t} {compute:?}/{dtype:?}: {err}");
        }
    }
}

/// Runs the two benches briefly (their numbers are printed; no thresholds).
#[test]
fn benches_run() {
    let Some(_) = gpu("benches_run") else { return };
    let (gbs, ms, back_to_back) = qscript::kernels::quant4::bench_dequant(1024, 3072, 5).unwrap();
    eprintln!("dequant 1024x3072 -> bf16: {gbs:.0} GB/s, {ms:.4} ms; {back_to_back:.0} GB/s back to back");
    assert!(gbs > 0.0 && ms > 0.0 && back_to_back > 0.0);
    let (gbs, ms) = qscript::kernels::quant4::bench_gemv(1024, 3072, 5).unwrap();
    eprintln!("gemv 1024x3072 bf16: {gbs:.0} GB/s, {ms:.4} ms");
    assert!(gbs > 0.0 && ms > 0.0);
}

// ---------------------------------------------------------------- the training engine on CUDA

use qscript::model::engine::{self, StepOptions, TrainBatch};
use qscript::model::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
use qscript::model::{LoadOptions, Model};
use qscript::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::SeedableRng;

fn peft_golden(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1").join(p)
}

/// The golden tiny Llama with LoRA r=4 (random B, dropout 0.1) on all seven projections.
fn tiny_lora(dev: &Device, dtype: DType) -> Model {
    let opts = LoadOptions { dtype, device: dev.clone(), ..Default::default() };
    let mut m = Model::load_hf_dir("tiny", &peft_golden("base"), &opts).unwrap();
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.1, target_modules: TargetModules::AllLinear, init_lora_weights: InitLoraWeights::Random, ..Default::default() };
    lora::attach(&mut m.llama, &cfg, 7).unwrap();
    m
}

/// Per-step mean losses of `steps` AdamW steps on fixed packed/padded batches.
fn train_losses(m: &mut Model, steps: usize) -> Vec<f64> {
    let (b, t) = (2, 12);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 37 + 11) % 256).collect();
    let seg = vec![1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0];
    let pos = vec![0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0];
    let labels: Vec<i64> = ids.iter().zip(&seg).map(|(&i, &s)| if s == 0 { -100 } else { i as i64 }).collect();
    let dev = m.llama.device.clone();
    let batch = TrainBatch::new(b, t, &ids, &labels, Some(&pos), Some(&seg), &dev).unwrap();
    let mut opt = AdamW::new(&m.llama, AdamWConfig { lr: 1e-3, ..Default::default() }).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let opts = StepOptions { train: true, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
    (0..steps)
        .map(|_| {
            let mut out = engine::forward_backward(&m.llama, &batch, &opts, &mut rng).unwrap();
            clip_grad_norm(&mut out.grads, 1.0).unwrap();
            opt.step(&mut m.llama, &out.grads, 1e-3).unwrap();
            out.mean_loss()
        })
        .collect()
}

/// 50 steps with dropout on the CPU and on CUDA, both f32: the dropout masks are the same hash on
/// both devices, so only summation order differs. bf16 compute on CUDA stays within 2% of them.
#[test]
fn training_on_cuda_matches_the_cpu() {
    let Some(dev) = gpu("training_on_cuda_matches_the_cpu") else { return };
    let cpu = train_losses(&mut tiny_lora(&Device::Cpu, DType::F32), 50);
    let cuda = train_losses(&mut tiny_lora(dev, DType::F32), 50);
    let bf16 = train_losses(&mut tiny_lora(dev, DType::BF16), 50);
    eprintln!("losses cpu {:.5} -> {:.5}, cuda f32 {:.5} -> {:.5}, cuda bf16 {:.5} -> {:.5}", cpu[0], cpu[49], cuda[0], cuda[49], bf16[0], bf16[49]);
    for i in 0..50 {
        assert!((cpu[i] - cuda[i]).abs() <= 1e-4 * cpu[i].max(1.0), "step {i}: cpu {} cuda {}", cpu[i], cuda[i]);
        assert!((cpu[i] - bf16[i]).abs() <= 2e-2 * cpu[i].max(1.0), "step {i}: cpu {} cuda bf16 {}", cpu[i], bf16[i]);
    }
    assert!(cpu[49] < cpu[0], "the tiny model should learn: {} -> {}", cpu[0], cpu[49]);
}

/// The fused AdamW kernel gives the host update's bits: three steps with weight decay on the
/// same gradients, every adapter weight compared exactly.
#[test]
fn adamw_kernel_matches_the_host_bit_for_bit() {
    use qscript::model::engine::LoraGrad;
    use qscript::model::names::LLAMA;
    let Some(dev) = gpu("adamw_kernel_matches_the_host_bit_for_bit") else { return };
    let (mut cpu, mut cuda) = (tiny_lora(&Device::Cpu, DType::F32), tiny_lora(dev, DType::F32));
    let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.01, ..Default::default() };
    let (mut oc, mut og) = (AdamW::new(&cpu.llama, cfg.clone()).unwrap(), AdamW::new(&cuda.llama, cfg).unwrap());
    let weights = |m: &Model| -> Vec<f32> {
        let mut all = Vec::new();
        for l in &m.llama.layers {
            for &p in LLAMA.projs {
                let lo = l.proj(p).lora.as_ref().unwrap();
                for t in [&lo.a, &lo.b] {
                    all.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
            }
        }
        all
    };
    assert_eq!(weights(&cpu), weights(&cuda), "the same adapters to start from");
    for step in 0..3u64 {
        let grads = |m: &Model, d: &Device| -> Vec<LoraGrad> {
            let mut out = Vec::new();
            for (li, l) in m.llama.layers.iter().enumerate() {
                for (pi, p) in LLAMA.projs.iter().copied().enumerate() {
                    let lo = l.proj(p).lora.as_ref().unwrap();
                    let seed = step * 1000 + (li * 10 + pi) as u64 * 2;
                    let g = |t: &Tensor, s: u64| Tensor::from_vec(values(t.elem_count(), s), t.shape(), d).unwrap();
                    out.push(LoraGrad { layer: li, proj: p, da: g(&lo.a, seed), db: g(&lo.b, seed + 1) });
                }
            }
            out
        };
        let (gc, gg) = (grads(&cpu, &Device::Cpu), grads(&cuda, dev));
        oc.step(&mut cpu.llama, &gc, 1e-3).unwrap();
        og.step(&mut cuda.llama, &gg, 1e-3).unwrap();
        assert!(og.uses_device_state(), "CUDA keeps the optimizer state on the GPU");
        let (a, b) = (weights(&cpu), weights(&cuda));
        let bad = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(bad, 0, "step {step}: {bad} of {} weights differ", a.len());
    }
}

/// The engine's gradients on CUDA equal the CPU's (which the CPU tests check against autograd
/// and finite differences), with and without checkpointing, on a 4-bit base.
#[test]
fn gradients_on_cuda_match_the_cpu() {
    let Some(dev) = gpu("gradients_on_cuda_match_the_cpu") else { return };
    let q = qscript::model::quantized::BnbConfig { quant_type: QuantType::Nf4, double_quant: true, compute_dtype: DType::F32, ..Default::default() };
    let load = |d: &Device| {
        let opts = LoadOptions { dtype: DType::F32, device: d.clone(), quantization: Some(q.clone()), ..Default::default() };
        let mut m = Model::load_hf_dir("tiny", &peft_golden("base"), &opts).unwrap();
        let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.1, target_modules: TargetModules::AllLinear, init_lora_weights: InitLoraWeights::Random, ..Default::default() };
        lora::attach(&mut m.llama, &cfg, 7).unwrap();
        m
    };
    let (mc, mg) = (load(&Device::Cpu), load(dev));
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 53 + 7) % 256).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    for ckpt in [false, true] {
        let opts = StepOptions { train: true, gradient_checkpointing: ckpt, offload_checkpoints: false, grad_scale: None };
        let run = |m: &Model| {
            let batch = TrainBatch::new(b, t, &ids, &labels, None, None, &m.llama.device).unwrap();
            engine::forward_backward(&m.llama, &batch, &opts, &mut rand::rngs::StdRng::seed_from_u64(1)).unwrap()
        };
        let (oc, og) = (run(&mc), run(&mg));
        assert!((oc.mean_loss() - og.mean_loss()).abs() < 1e-5, "loss {} vs {}", oc.mean_loss(), og.mean_loss());
        for (gc, gg) in oc.grads.iter().zip(&og.grads) {
            for (c, g) in [(&gc.da, &gg.da), (&gc.db, &gg.db)] {
                let g = g.to_device(&Device::Cpu).unwrap();
                let rel = max_abs(&(c - &g).unwrap()) / max_abs(c).max(1e-12);
                assert!(rel < 1e-4, "layer {} {:?} (checkpointing {ckpt}): relative difference {rel}", gc.layer, gc.proj);
            }
        }
    }
}

/// peft's golden adapter on the golden base, on CUDA: transformers' `logits_adapted` to 1e-4.
#[test]
fn peft_golden_logits_on_cuda() {
    let Some(dev) = gpu("peft_golden_logits_on_cuda") else { return };
    let opts = LoadOptions { dtype: DType::F32, device: dev.clone(), ..Default::default() };
    let mut m = Model::load_hf_dir("tiny", &peft_golden("base"), &opts).unwrap();
    qscript::model::adapter::load_adapter(&mut m.llama, &peft_golden("adapter")).unwrap();
    let t = candle_core::safetensors::load(peft_golden("logits.safetensors"), &Device::Cpu).unwrap();
    let ids = t["ids"].to_dtype(DType::U32).unwrap().to_device(dev).unwrap();
    let got = m.llama.forward(&ids, None, false).unwrap().to_device(&Device::Cpu).unwrap();
    let d = max_abs(&(got - &t["logits_adapted"]).unwrap());
    assert!(d <= 1e-4, "max abs diff {d}");
}

/// Every model family's golden (`tests/golden/families`, see tests/families.rs for the CPU
/// checks) on CUDA, base + peft adapter. In f32: the CPU's tolerances (logits 1e-4, loss 1e-5,
/// LoRA gradients 1e-4 of their norm). In bf16 the error against the f32 golden is rounding, so
/// it is bounded by the CPU's own bf16 error (candle's reference ops, other rounding points):
/// CUDA within twice it plus a small floor. Measured on the H200 (2026-12-03) before this bound:
/// gradients 0.033–0.050 of their norm for llama/qwen/mistral and 0.108 for gemma2, where the CPU's
/// bf16 gives 0.034–0.075 and 0.089 (gemma3 0.097): Gemma's random (1+w) norms amplify rounding.
#[test]
fn families_on_cuda_match_the_golden() {
    let Some(dev) = gpu("families_on_cuda_match_the_golden") else { return };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/families");
    for f in ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"] {
        let g = candle_core::safetensors::load(root.join(f).join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids: Vec<u32> = g["ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
        let labels = g["labels"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
        let (t, len1) = (ids.len() / 2, g["lengths"].to_vec1::<i64>().unwrap()[1] as usize);
        // (adapted logits, loss, worst LoRA gradient relative to its norm) against the golden.
        let errors = |dev: &Device, dtype: DType| -> [f64; 3] {
            let opts = LoadOptions { dtype, device: dev.clone(), ..Default::default() };
            let mut m = Model::load_hf_dir(f, &root.join(f).join("base"), &opts).unwrap();
            qscript::model::adapter::load_adapter(&mut m.llama, &root.join(f).join("adapter")).unwrap();
            let x = Tensor::from_vec(ids.clone(), (2, t), dev).unwrap();
            let got = m.llama.forward(&x, None, false).unwrap().to_device(&Device::Cpu).unwrap();
            let want = &g["logits_adapted"];
            let d = |r: usize, n: usize| max_abs(&(got.get(r).unwrap().narrow(0, 0, n).unwrap() - want.get(r).unwrap().narrow(0, 0, n).unwrap()).unwrap());
            let dl = d(0, t).max(d(1, len1));
            let seg: Vec<u32> = (0..2 * t).map(|i| u32::from(i < t || i - t < len1)).collect();
            let batch = TrainBatch::new(2, t, &ids, &labels, None, Some(&seg), dev).unwrap();
            let opts = StepOptions { train: true, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
            let out = engine::forward_backward(&m.llama, &batch, &opts, &mut rand::rngs::StdRng::seed_from_u64(0)).unwrap();
            let el = (out.mean_loss() - g["loss"].to_vec1::<f32>().unwrap()[0] as f64).abs();
            let mut worst: f32 = 0.0;
            for lg in &out.grads {
                for (half, got) in [("lora_A", &lg.da), ("lora_B", &lg.db)] {
                    let want = &g[&format!("grad.{}.{half}.weight", lg.id().path())];
                    let got = got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
                    let l2 = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                    worst = worst.max(l2(&(got - want).unwrap()) / l2(want).max(1e-12));
                }
            }
            [dl as f64, el, worst as f64]
        };
        let names = ["adapted logits", "loss", "worst LoRA gradient (of its norm)"];
        let e32 = errors(dev, DType::F32);
        for ((e, tol), name) in e32.iter().zip([1e-4, 1e-5, 1e-4]).zip(names) {
            assert!(*e <= tol, "{f} F32: {name} differs by {e:.3e}");
        }
        let (e16, cpu16) = (errors(dev, DType::BF16), errors(&Device::Cpu, DType::BF16));
        for (((e, c), floor), name) in e16.iter().zip(cpu16).zip([0.01, 0.002, 0.02]).zip(names) {
            assert!(*e <= 2.0 * c + floor, "{f} BF16: {name} differs by {e:.3e}, the CPU's bf16 by {c:.3e}");
        }
        let show = |e: [f64; 3]| format!("{:.2e} / {:.2e} / {:.2e}", e[0], e[1], e[2]);
        eprintln!("{f} (logits / loss / gradients): F32 {}; BF16 {} (CPU bf16 {})", show(e32), show(e16), show(cpu16));
    }
}

// ------------------------------------------------- LoRA linear and cross-entropy kernels

use qscript::model::layers::{linear, lm_head as cross_entropy};

fn tensor_rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    rel_err(&host(got), &host(want))
}

/// The CUDA LoRA kernels (lora.cu: project / expand / grad, the dropout hash regenerated in
/// each) against the CPU's fused f32 kernel, forward and backward: ranks padded to 8, 16 and 32,
/// odd sizes (rows not a multiple of a block, inner sizes not a multiple of a chunk), dropout on
/// and off; f32 to 2e-6 of the largest value, bf16 to 2e-2.
#[test]
fn lora_linear_kernels_match_the_cpu() {
    let Some(dev) = gpu("lora_linear_kernels_match_the_cpu") else { return };
    let t = |v: Vec<f32>, s: (usize, usize), d: &Device| Tensor::from_vec(v, s, d).unwrap();
    // bf16 with K % 8 == 0 takes the tensor-core kernels; the last shape has grad splits of more
    // than one staged block of U rows.
    for (n, inp, out, r, p) in [(77, 300, 130, 4, 0.1), (256, 512, 1024, 16, 0.0), (130, 264, 96, 32, 0.3), (33, 1000, 8, 16, 0.1), (3000, 8192, 64, 8, 0.1)] {
        let (x, w, a, bm, dy) = (values(n * inp, 1), values(out * inp, 2), values(r * inp, 3), values(out * r, 4), values(n * out, 5));
        for dtype in [DType::F32, DType::BF16] {
            let run = |d: &Device, dt: DType| {
                let cast = |v: &Vec<f32>, s| t(v.clone(), s, d).to_dtype(dt).unwrap();
                let lora = linear::Lora { a: cast(&a, (r, inp)), b: cast(&bm, (out, r)), scaling: 2.0, dropout: p };
                let mut rng = rand::rngs::StdRng::seed_from_u64(11);
                let (y, saved) = linear::forward(&cast(&x, (n, inp)), &cast(&w, (out, inp)), None, Some(&lora), true, &mut rng).unwrap();
                let (dx, g) = linear::backward(&saved, &cast(&w, (out, inp)), Some(&lora), &cast(&dy, (n, out))).unwrap();
                let (da, db) = g.unwrap();
                [y, saved.u.unwrap(), dx, da, db]
            };
            let want = run(&Device::Cpu, DType::F32);
            let got = run(dev, dtype);
            // f32: sums of up to 8192 terms (3000 rows in dA) in another order than the CPU.
            let tol = if dtype == DType::F32 { 5e-6 } else { 2e-2 };
            for (name, g, w) in ["y", "u", "dx", "dA", "dB"].iter().zip(&got).zip(&want).map(|((n, g), w)| (n, g, w)) {
                let e = tensor_rel_err(g, w);
                assert!(e <= tol, "n {n} in {inp} out {out} r {r} p {p} {dtype:?}: {name} off by {e:e} of its max");
            }
        }
    }
}

/// The flash attention kernels against the CPU's f32 attention: output and all three
/// gradients, head sizes 64 and 128, grouped-query, lengths that are not multiples of the
/// 64-row blocks, packed examples and padding.
#[test]
fn flash_attention_matches_the_cpu() {
    use qscript::model::layers::attention;
    let Some(dev) = gpu("flash_attention_matches_the_cpu") else { return };
    for (b, nh, kvh, t, d) in [(2, 4, 2, 150, 64), (1, 6, 2, 200, 128), (2, 3, 3, 64, 128)] {
        // Row 0: two packed examples and trailing padding; row 1 (if any): one example.
        let seg: Vec<u32> = (0..b * t).map(|i| (i / t, i % t)).map(|(r, i)| if r == 0 { if i < t / 3 { 1 } else if i < t - 9 { 2 } else { 0 } } else { 1 }).collect();
        let (q, k, v, d_o) = (values(b * nh * t * d, 31), values(b * kvh * t * d, 32), values(b * kvh * t * d, 33), values(b * nh * t * d, 34));
        let run = |dv: &Device, dt: DType| {
            let ten = |x: &Vec<f32>, h: usize| Tensor::from_vec(x.clone(), (b, h, t, d), dv).unwrap().to_dtype(dt).unwrap();
            let mask = attention::build_mask(&seg, b, t, dv).unwrap();
            let segments = Tensor::from_vec(seg.clone(), (b, t), dv).unwrap();
            let (o, s) = attention::forward_segments(&ten(&q, nh), &ten(&k, kvh), &ten(&v, kvh), &mask, &segments).unwrap();
            assert_eq!(s.flash.is_some(), dv.is_cuda(), "the flash path runs exactly on CUDA");
            let (dq, dk, dv) = attention::backward(&s, &ten(&d_o, nh)).unwrap();
            [o, dq, dk, dv]
        };
        let want = run(&Device::Cpu, DType::F32);
        let got = run(dev, DType::BF16);
        for (name, (g, w)) in ["o", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            assert_eq!(g.dims(), w.dims());
            let e = tensor_rel_err(g, w);
            assert!(e <= 2e-2, "b {b} nh {nh} kvh {kvh} t {t} d {d}: {name} off by {e:e} of its max");
        }
    }
}

/// The flash kernels with the families' features against the CPU's f32 attention (the fused
/// kernel, the window in its mask): output and the three gradients for sliding windows (< t,
/// not a multiple of the 64-row blocks, 2, ≥ t), soft-capping (a cap the logits reach),
/// caller's scales, head sizes 64, 128 and 256, grouped-query, packed examples and padding.
/// Inputs are rounded to bf16 for both sides; tolerance 2e-2 of each tensor's largest value
/// (bf16 probabilities and outputs).
#[test]
fn flash_attention_families_match_the_cpu() {
    use qscript::kernels::attention::AttnParams;
    use qscript::model::layers::attention;
    let Some(dev) = gpu("flash_attention_families_match_the_cpu") else { return };
    // (b, nh, kvh, t, d, input scale, params)
    let p = |scale: Option<f32>, softcap: Option<f32>, window: Option<usize>, d: usize| AttnParams { scale: scale.unwrap_or(AttnParams::plain(d).scale), softcap, window };
    let cases = [
        (2, 4, 2, 150, 64, 1.0, p(None, None, Some(40), 64)),
        (1, 8, 4, 200, 256, 1.0, p(Some(1.0 / 16.0), None, Some(64), 256)),
        (2, 4, 2, 130, 256, 6.0, p(Some(0.0625), Some(3.0), Some(33), 256)),
        (1, 6, 2, 333, 128, 4.0, p(Some(0.1), Some(5.0), None, 128)),
        // A window of 2 (of 1, dq would be 0 up to rounding: no relative error to take).
        (2, 3, 3, 100, 64, 1.0, p(None, Some(10.0), Some(2), 64)),
        (1, 2, 1, 70, 256, 1.0, p(None, None, None, 256)),
        (1, 4, 2, 300, 128, 1.0, p(None, None, Some(1000), 128)),
        (1, 4, 1, 520, 128, 3.0, p(Some(0.05), Some(2.0), Some(129), 128)),
    ];
    for (b, nh, kvh, t, d, amp, params) in cases {
        // Row 0: two packed examples and trailing padding; row 1 (if any): one example.
        let seg: Vec<u32> = (0..b * t).map(|i| (i / t, i % t)).map(|(r, i)| if r == 0 { if i < t / 3 { 1 } else if i < t - 9 { 2 } else { 0 } } else { 1 }).collect();
        let q: Vec<f32> = values(b * nh * t * d, 51).iter().map(|x| x * amp).collect();
        let (k, v, d_o) = (values(b * kvh * t * d, 52), values(b * kvh * t * d, 53), values(b * nh * t * d, 54));
        let run = |dv: &Device, dt: DType| {
            let ten = |x: &Vec<f32>, h: usize| Tensor::from_vec(x.clone(), (b, h, t, d), dv).unwrap().to_dtype(DType::BF16).unwrap().to_dtype(dt).unwrap();
            let mask = attention::build_window_mask(&seg, b, t, params.window, dv).unwrap();
            let segments = Tensor::from_vec(seg.clone(), (b, t), dv).unwrap();
            let (o, s) = attention::forward_segments_with(&ten(&q, nh), &ten(&k, kvh), &ten(&v, kvh), &mask, &segments, &params).unwrap();
            assert_eq!(s.flash.is_some(), dv.is_cuda(), "the flash path runs exactly on CUDA");
            let (dq, dk, dv) = attention::backward(&s, &ten(&d_o, nh)).unwrap();
            [o, dq, dk, dv]
        };
        let want = run(&Device::Cpu, DType::F32);
        let got = run(dev, DType::BF16);
        for (name, (g, w)) in ["o", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            assert_eq!(g.dims(), w.dims());
            let e = tensor_rel_err(g, w);
            assert!(e <= 2e-2, "b {b} nh {nh} kvh {kvh} t {t} d {d} {params:?}: {name} off by {e:e} of its max");
        }
    }
}

/// The tiled attention on CUDA in f32 (the masked-softmax kernel with soft-capping, the
/// softmax-backward and soft-cap-backward kernels) against the CPU's f32 attention: a window in the mask, a cap, GQA,
/// head size 96 (no flash kernel); f32 and bf16 (both from bf16-rounded inputs) to 1e-4 and
/// 3e-2 of each tensor's largest value.
#[test]
fn tiled_attention_with_softcap_matches_the_cpu() {
    use qscript::kernels::attention::AttnParams;
    use qscript::model::layers::attention;
    let Some(dev) = gpu("tiled_attention_with_softcap_matches_the_cpu") else { return };
    let (b, nh, kvh, t, d) = (2, 4, 2, 90, 96);
    let params = AttnParams { scale: 0.08, softcap: Some(2.5), window: Some(20) };
    let seg: Vec<u32> = (0..b * t).map(|i| if i % t < 50 { 1 } else { 2 }).collect();
    let q: Vec<f32> = values(b * nh * t * d, 61).iter().map(|x| x * 5.0).collect();
    let (k, v, d_o) = (values(b * kvh * t * d, 62), values(b * kvh * t * d, 63), values(b * nh * t * d, 64));
    for dtype in [DType::F32, DType::BF16] {
        let run = |dv: &Device, dt: DType| {
            // Inputs rounded to bf16 on both sides (the bf16 run's rounding is not the kernel's).
            let ten = |x: &Vec<f32>, h: usize| Tensor::from_vec(x.clone(), (b, h, t, d), dv).unwrap().to_dtype(DType::BF16).unwrap().to_dtype(dt).unwrap();
            let mask = attention::build_window_mask(&seg, b, t, params.window, dv).unwrap();
            let (o, s) = attention::forward_with(&ten(&q, nh), &ten(&k, kvh), &ten(&v, kvh), &mask, &params, 32).unwrap();
            let (dq, dk, dv) = attention::backward(&s, &ten(&d_o, nh)).unwrap();
            [o, dq, dk, dv]
        };
        let want = run(&Device::Cpu, DType::F32);
        let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
        for (name, (g, w)) in ["o", "dq", "dk", "dv"].iter().zip(run(dev, dtype).iter().zip(&want)) {
            let e = tensor_rel_err(g, w);
            assert!(e <= tol, "{dtype:?}: {name} off by {e:e} of its max");
        }
    }
}

/// The GeGLU kernels (tanh GELU; bf16 8 at a time, and the scalar fallback) against the CPU
/// kernel in f32: f32 to 1e-5, bf16 to 2e-2 of each tensor's largest value.
#[test]
fn geglu_kernels_match_the_cpu() {
    use qscript::kernels::glu::{self, Activation};
    let Some(dev) = gpu("geglu_kernels_match_the_cpu") else { return };
    for (rows, cols) in [(37, 64), (5, 7), (300, 1024)] {
        let g: Vec<f32> = values(rows * cols, 71).iter().map(|x| x * 5.0).collect();
        let (u, dh) = (values(rows * cols, 72), values(rows * cols, 73));
        let run = |d: &Device, dt: DType| {
            let t = |v: &Vec<f32>| Tensor::from_vec(v.clone(), (rows, cols), d).unwrap().to_dtype(dt).unwrap();
            let h = glu::forward(&t(&g), &t(&u), Activation::GeluTanh).unwrap();
            let (dg, du) = glu::backward(&t(&g), &t(&u), &t(&dh), Activation::GeluTanh).unwrap();
            [h, dg, du]
        };
        let want = run(&Device::Cpu, DType::F32);
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for (name, (g, w)) in ["h", "dg", "du"].iter().zip(run(dev, dt).iter().zip(&want)) {
                let e = tensor_rel_err(g, w);
                assert!(e <= tol, "{rows}x{cols} {dt:?}: {name} off by {e:e} of its max");
            }
        }
    }
}

/// The cross-entropy kernel with Gemma 2's final-logit soft-capping against candle's f64 on
/// the CPU: loss sum and `dh`, untrained rows, several chunks; f32 to 1e-5 (dh 1e-4), bf16 to
/// 2e-2 (dh 2e-1: bf16 logits through tanh, as the plain test's 10×).
#[test]
fn capped_cross_entropy_kernel_matches_the_cpu() {
    let Some(dev) = gpu("capped_cross_entropy_kernel_matches_the_cpu") else { return };
    let (n, hidden, vocab) = (300, 64, 5000);
    let h: Vec<f32> = values(n * hidden, 81).iter().map(|x| x * 3.0).collect();
    let head = values(vocab * hidden, 82);
    let targets: Vec<i64> = (0..n as i64).map(|i| if i % 7 == 3 { -100 } else { (i * 7919) % vocab as i64 }).collect();
    let run = |d: &Device, dt: DType| {
        let h = Tensor::from_vec(h.clone(), (n, hidden), d).unwrap().to_dtype(dt).unwrap();
        let head = Tensor::from_vec(head.clone(), (vocab, hidden), d).unwrap().to_dtype(dt).unwrap();
        cross_entropy::forward_backward_capped(&h, &head, &targets, Some(0.01), 128, Some(4.0)).unwrap()
    };
    let want = run(&Device::Cpu, DType::F64);
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let got = run(dev, dt);
        assert_eq!(got.n_tokens, want.n_tokens);
        let lerr = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs();
        assert!(lerr <= tol, "{dt:?}: loss {} vs {}", got.loss_sum, want.loss_sum);
        let e = tensor_rel_err(got.dh.as_ref().unwrap(), want.dh.as_ref().unwrap());
        assert!(e <= tol as f32 * 10.0, "{dt:?}: dh off by {e:e} of its max");
    }
}

/// The RMSNorm kernels with Gemma's (1 + w) (the 1 added in f32 inside the kernel) against
/// candle's f64 on the CPU, forward and backward: f32 to 1e-5, bf16 to 2e-2.
#[test]
fn plus_one_norm_kernels_match_the_cpu() {
    use qscript::model::layers::norm;
    let Some(dev) = gpu("plus_one_norm_kernels_match_the_cpu") else { return };
    let (rows, hdim) = (33, 2304);
    let (x, w, dy) = (values(rows * hdim, 91), values(hdim, 92), values(rows * hdim, 93));
    let run = |d: &Device, dt: DType| {
        let t = |v: &Vec<f32>, s: &[usize]| Tensor::from_vec(v.clone(), s, d).unwrap().to_dtype(dt).unwrap();
        let wt = t(&w, &[hdim]);
        let (y, s) = norm::forward_with(&t(&x, &[rows, hdim]), &wt, 1e-6, true).unwrap();
        [y, norm::backward(&s, &wt, &t(&dy, &[rows, hdim])).unwrap()]
    };
    let want = run(&Device::Cpu, DType::F64);
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        for (name, (g, w)) in ["y", "dx"].iter().zip(run(dev, dt).iter().zip(&want)) {
            let e = tensor_rel_err(g, w);
            assert!(e <= tol, "{dt:?}: {name} off by {e:e} of its max");
        }
    }
}

/// RMSNorm backward with the residual's gradient fused in, every kernel variant (rows of 8·256·1,
/// ·2, ·4 groups in registers; odd and too-wide rows on the scalar kernel), plain and (1 + w),
/// against candle's f64 on the CPU: f32 to 1e-5, bf16 to 2e-2.
#[test]
fn norm_backward_with_the_residual_matches_the_cpu() {
    use qscript::model::layers::norm;
    let Some(dev) = gpu("norm_backward_with_the_residual_matches_the_cpu") else { return };
    for (rows, hdim) in [(9, 576), (7, 3072), (5, 8192), (6, 2305), (3, 8200)] {
        for plus_one in [false, true] {
            let (x, w, dy, res) = (values(rows * hdim, 71), values(hdim, 72), values(rows * hdim, 73), values(rows * hdim, 74));
            let run = |d: &Device, dt: DType| {
                let t = |v: &Vec<f32>, s: &[usize]| Tensor::from_vec(v.clone(), s, d).unwrap().to_dtype(dt).unwrap();
                let n = norm::RmsNorm { weight: t(&w, &[hdim]), eps: 1e-6, plus_one };
                let (_, s) = n.forward_train(&t(&x, &[rows, hdim])).unwrap();
                let dyt = t(&dy, &[rows, hdim]);
                [n.backward(&s, &dyt).unwrap(), n.backward_plus(&s, &dyt, &t(&res, &[rows, hdim])).unwrap()]
            };
            let want = run(&Device::Cpu, DType::F64);
            for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                for (name, (g, w)) in ["dx", "dx + residual"].iter().zip(run(dev, dt).iter().zip(&want)) {
                    let e = tensor_rel_err(g, w);
                    assert!(e <= tol, "{rows}x{hdim} plus_one {plus_one} {dt:?}: {name} off by {e:e} of its max");
                }
            }
        }
    }
}

/// The SwiGLU kernels (bf16 8 at a time, and the scalar fallback) against the CPU in f32.
#[test]
fn swiglu_kernels_match_the_cpu() {
    use qscript::model::layers::mlp::swiglu;
    let Some(dev) = gpu("swiglu_kernels_match_the_cpu") else { return };
    for (rows, cols) in [(37, 64), (5, 7)] {
        let (g, u, dh) = (values(rows * cols, 41), values(rows * cols, 42), values(rows * cols, 43));
        let run = |d: &Device, dt: DType| {
            let t = |v: &Vec<f32>| Tensor::from_vec(v.clone(), (rows, cols), d).unwrap().to_dtype(dt).unwrap();
            let (h, s) = swiglu::forward(t(&g), t(&u)).unwrap();
            let (dg, du) = swiglu::backward(&s, &t(&dh)).unwrap();
            [h, dg, du]
        };
        let want = run(&Device::Cpu, DType::F32);
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for (name, (g, w)) in ["h", "dg", "du"].iter().zip(run(dev, dt).iter().zip(&want)) {
                let e = tensor_rel_err(g, w);
                assert!(e <= tol, "{rows}x{cols} {dt:?}: {name} off by {e:e} of its max");
            }
        }
    }
}

/// The fused cross-entropy kernel against the candle formulation on the CPU (f32 logits): the
/// loss sum and the gradient `dh`, with untrained rows and several chunks.
#[test]
fn cross_entropy_kernel_matches_the_cpu() {
    let Some(dev) = gpu("cross_entropy_kernel_matches_the_cpu") else { return };
    let (n, hidden, vocab) = (300, 64, 5000);
    let h = values(n * hidden, 21);
    let head = values(vocab * hidden, 22);
    let targets: Vec<i64> = (0..n as i64).map(|i| if i % 7 == 3 { -100 } else { (i * 7919) % vocab as i64 }).collect();
    let run = |d: &Device, dt: DType| {
        let h = Tensor::from_vec(h.clone(), (n, hidden), d).unwrap().to_dtype(dt).unwrap();
        let head = Tensor::from_vec(head.clone(), (vocab, hidden), d).unwrap().to_dtype(dt).unwrap();
        cross_entropy::forward_backward(&h, &head, &targets, Some(0.01), 128).unwrap()
    };
    // f64 on the CPU takes the candle path (the f32 CPU path is its own fused kernel).
    let want = run(&Device::Cpu, DType::F64);
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let got = run(dev, dt);
        assert_eq!(got.n_tokens, want.n_tokens);
        let lerr = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs();
        assert!(lerr <= tol, "{dt:?}: loss {} vs {}", got.loss_sum, want.loss_sum);
        let e = tensor_rel_err(got.dh.as_ref().unwrap(), want.dh.as_ref().unwrap());
        assert!(e <= tol as f32 * 10.0, "{dt:?}: dh off by {e:e} of its max");
    }
}

// ------------------------------------------------------- fused batch-1 decoding (kernels::decode)

use qscript::kernels::decode::cuda as dec;

/// Position `at` for the decode kernels, its device copy in `dev` (u32 [1]).
fn dec_pos(at: usize, dev: &Tensor) -> qscript::kernels::decode::Pos<'_> {
    qscript::kernels::decode::Pos { at, dev }
}
use qscript::model::llama::{KvCache, Llama};

/// An NF4 weight `[rows, cols]` of values in ±`scale` on `dev` (double-quantized scales or not)
/// and its dequantization, row-major.
fn weight4(dev: &Device, rows: usize, cols: usize, seed: u64, dq: bool) -> (Quant4Gpu, Vec<f32>) {
    let w: Vec<f32> = values(rows * cols, seed).iter().map(|v| v * 0.1).collect();
    let q = quant::quantize_4bit(&w, &[rows, cols], QuantType::Nf4, 64, dq).unwrap();
    let deq = quant::dequantize_4bit(&q, DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (upload(&q, dev), deq)
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len()).map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn on(dev: &Device, v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap().to_device(dev).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// HF's rotate_half RoPE of each `d`-sized head of `v` with tables `[positions, d/2]` at `pos`.
fn rope_ref(v: &[f32], d: usize, cos: &[f32], sin: &[f32], pos: usize) -> Vec<f32> {
    let half = d / 2;
    let mut out = v.to_vec();
    for h in v.chunks(d).enumerate().map(|(i, _)| i * d) {
        for i in 0..half {
            let (c, s) = (cos[pos * half + i], sin[pos * half + i]);
            out[h + i] = v[h + i] * c - v[h + i + half] * s;
            out[h + i + half] = v[h + i + half] * c + v[h + i] * s;
        }
    }
    out
}

/// Each fused decode kernel (f32) against a CPU computation from the dequantized weights:
/// RMSNorm + q/k/v + RoPE + cache append (and nothing else of the cache written), attention over
/// several warps' runs of positions with GQA (head_dim 64 and 128), the residual GEMV (plain
/// scales, a partial last row group), the gate/up GEMV with SwiGLU (an odd row count). All
/// kernels are checked before failing, to say which ones differ.
#[test]
fn decode_kernels_match_cpu_references() {
    let Some(dev) = gpu("decode_kernels_match_cpu_references") else { return };
    let mut bad = Vec::new();
    let mut check = |what: &str, got: &[f32], want: &[f32]| {
        let e = rel_err(got, want);
        eprintln!("{what}: max |Δ| = {e:e} of max |want|");
        if !(e <= 1e-4) {
            bad.push(format!("{what}: {e:e}"));
        }
    };
    let (hidden, eps) = (256, 1e-5f32);
    let x = values(hidden, 1);
    let nw: Vec<f32> = values(hidden, 2).iter().map(|v| 1.0 + 0.2 * v).collect();
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / hidden as f32 + eps).sqrt();
    let xn: Vec<f32> = x.iter().zip(&nw).map(|(a, w)| a * r * w).collect();
    let (xt, nwt) = (on(dev, &x, &[1, 1, hidden]), on(dev, &nw, &[hidden]));

    // q, k, v + RoPE + append: 4 heads over 2 KV heads of 64, position 5 of 8.
    let (h, kvh, d, cap, pos) = (4, 2, 64, 8, 5);
    let (wq, dq) = weight4(dev, h * d, hidden, 3, true);
    let (wk, dk) = weight4(dev, kvh * d, hidden, 4, true);
    let (wv, dv) = weight4(dev, kvh * d, hidden, 5, true);
    let cos: Vec<f32> = (0..cap * d / 2).map(|i| (i as f32 * 0.37).cos()).collect();
    let sin: Vec<f32> = (0..cap * d / 2).map(|i| (i as f32 * 0.37).sin()).collect();
    let (kc, vc, qo) = (Tensor::zeros((kvh, cap, d), DType::F32, dev).unwrap(), Tensor::zeros((kvh, cap, d), DType::F32, dev).unwrap(), Tensor::zeros(h * d, DType::F32, dev).unwrap());
    let pos_dev = Tensor::new(&[pos as u32], dev).unwrap();
    let at = dec_pos(pos, &pos_dev);
    dec::qkv_rope(&xt, &nwt, eps, [&wq, &wk, &wv], &on(dev, &cos, &[cap, d / 2]), &on(dev, &sin, &[cap, d / 2]), &at, d, &qo, &kc, &vc).unwrap();
    check("qkv: q", &host(&qo), &rope_ref(&matvec(&dq, &xn), d, &cos, &sin, pos));
    let at_pos = |c: &[f32]| -> (Vec<f32>, f32) {
        let row = (0..kvh).flat_map(|g| c[(g * cap + pos) * d..(g * cap + pos + 1) * d].to_vec()).collect();
        let elsewhere = c.iter().enumerate().filter(|(i, _)| (i / d) % cap != pos).fold(0f32, |m, (_, v)| m.max(v.abs()));
        (row, elsewhere)
    };
    let (krow, kelse) = at_pos(&host(&kc));
    let (vrow, velse) = at_pos(&host(&vc));
    check("qkv: k at pos", &krow, &rope_ref(&matvec(&dk, &xn), d, &cos, &sin, pos));
    check("qkv: v at pos", &vrow, &matvec(&dv, &xn));
    check("qkv: cache untouched elsewhere", &[kelse, velse], &[0.0, 0.0]);

    // Attention: 70 of 80 positions (three rounds of the 8 warps × 4), GQA 6 heads over 2.
    for d in [64, 128] {
        let (h, kvh, cap, len) = (6, 2, 80, 70);
        let q = values(h * d, 10);
        let (kv_k, kv_v) = (values(kvh * cap * d, 11), values(kvh * cap * d, 12));
        let out = Tensor::zeros(h * d, DType::F32, dev).unwrap();
        let last = Tensor::new(&[len as u32 - 1], dev).unwrap();
        dec::attention(&on(dev, &q, &[h * d]), &on(dev, &kv_k, &[kvh, cap, d]), &on(dev, &kv_v, &[kvh, cap, d]), &dec_pos(len - 1, &last), &out).unwrap();
        let mut want = vec![0f32; h * d];
        for head in 0..h {
            let base = (head / (h / kvh)) * cap * d;
            let qh = &q[head * d..(head + 1) * d];
            let s: Vec<f64> = (0..len).map(|j| qh.iter().zip(&kv_k[base + j * d..]).map(|(a, b)| (a * b) as f64).sum::<f64>() / (d as f64).sqrt()).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            for (j, sj) in s.iter().enumerate() {
                let p = (sj - m).exp() / z;
                for i in 0..d {
                    want[head * d + i] += (p * kv_v[base + j * d + i] as f64) as f32;
                }
            }
        }
        check(&format!("attention d={d}"), &host(&out), &want);
    }

    // x += W h: 258 rows (the last group of 4 has 2), 96 inputs, plain scales.
    let (wo, dwo) = weight4(dev, 258, 96, 20, false);
    let (x0, hin) = (values(258, 21), values(96, 22));
    let xr = on(dev, &x0, &[258]);
    dec::residual(&wo, &on(dev, &hin, &[96]), &xr).unwrap();
    check("residual", &host(&xr), &matvec(&dwo, &hin).iter().zip(&x0).map(|(a, b)| a + b).collect::<Vec<_>>());

    // silu(W_gate x̂) · (W_up x̂): 771 rows (the last pair has 1).
    let (wg, dg) = weight4(dev, 771, hidden, 30, true);
    let (wu, du) = weight4(dev, 771, hidden, 31, true);
    let ho = Tensor::zeros(771, DType::F32, dev).unwrap();
    dec::gate_up(&xt, &nwt, eps, &wg, &wu, &ho).unwrap();
    let want: Vec<f32> = matvec(&dg, &xn).iter().zip(matvec(&du, &xn)).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
    check("gate/up + SwiGLU", &host(&ho), &want);
    assert!(bad.is_empty(), "fused decode kernels differ:\n{}", bad.join("\n"));
}

/// A tiny Llama with 4-bit decoder linears (NF4, blocksize 64) on `dev`: 2 layers, vocab 320,
/// `(hidden, heads, kv_heads, head_dim, intermediate)`. Weights scaled so that attention is far
/// from uniform and the logits spread widely (greedy ties are unlikely); norm weights around 1.
fn tiny_4bit(dev: &Device, dtype: DType, double_quant: bool, shape: (usize, usize, usize, usize, usize)) -> Llama {
    let (hidden, heads, kv_heads, d, inter) = shape;
    let (layers, vocab) = (2, 320);
    let cfg = qscript::model::Config::from_json(&serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": d, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": true
    }))
    .unwrap();
    let mut t = HashMap::new();
    let mut seed = 100;
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let v: Vec<f32> = values(n, seed).iter().map(|v| v * scale + offset).collect();
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[vocab, hidden], 1.0, 0.0);
    put("model.norm.weight".into(), &[hidden], 0.2, 1.0);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[hidden], 0.2, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[hidden], 0.2, 1.0);
        put(format!("{p}.self_attn.q_proj.weight"), &[heads * d, hidden], 0.15, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), &[kv_heads * d, hidden], 0.15, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv_heads * d, hidden], 0.1, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), &[hidden, heads * d], 0.05, 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), &[inter, hidden], 0.1, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[inter, hidden], 0.1, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[hidden, inter], 0.05, 0.0);
    }
    let q = qscript::model::quantized::BnbConfig { quant_type: QuantType::Nf4, double_quant, compute_dtype: dtype, ..Default::default() };
    Llama::load_with(&cfg, &t, dtype, dev, Some(&q)).unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

/// Greedy decoding of `steps` tokens after `prompt`: the logits row of every step (the first
/// from the prompt) and its argmax. With `forced`, those tokens are fed instead of the argmax.
fn decode_rows(m: &Llama, mut cache: KvCache, prompt: &[u32], steps: usize, forced: Option<&[u32]>) -> (Vec<Vec<f32>>, Vec<u32>, KvCache) {
    let mut ids = prompt.to_vec();
    let (mut rows, mut toks) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let input = Tensor::new(ids.as_slice(), &m.device).unwrap().unsqueeze(0).unwrap();
        let row = host(&m.forward(&input, Some(&mut cache), true).unwrap());
        toks.push(argmax(&row));
        rows.push(row);
        ids = vec![forced.map_or(toks[i], |f| f[i])];
    }
    (rows, toks, cache)
}

/// The fused decode path against the generic CUDA path on tiny 4-bit models: GQA with head_dim
/// 128 and 64, f32 with double-quantized and plain scales, bf16; a 1-token prompt (the fused
/// path from an empty cache) and a 50-token one whose decoding crosses the buffers' growth at 64
/// positions. The fused run is fed the generic run's greedy tokens; per step, f32 logits agree
/// to 1e-3 of max |logit| and give the same greedy token; bf16 logits to 5e-2 (each path rounds
/// every activation to bf16, in different places). Then a 2-token forward (the generic path,
/// reading the fused path's buffers) agrees too.
#[test]
fn decode_fused_matches_generic_path() {
    let Some(dev) = gpu("decode_fused_matches_generic_path") else { return };
    let mut bad = Vec::new();
    for shape in [(256, 4, 2, 128, 512), (128, 4, 2, 64, 1024)] {
        for (dtype, dq) in [(DType::F32, true), (DType::F32, false), (DType::BF16, true)] {
            let m = tiny_4bit(dev, dtype, dq, shape);
            let tol = if dtype == DType::F32 { 1e-3 } else { 5e-2 };
            for prompt_len in [1u32, 50] {
                let what = format!("{shape:?} {dtype:?} dq={dq} prompt {prompt_len}");
                let prompt: Vec<u32> = (0..prompt_len).map(|i| (i * 37 + 5) % 320).collect();
                let steps = 30;
                let (want, toks, mut cg) = decode_rows(&m, m.new_cache().unfused(), &prompt, steps, None);
                assert!(!cg.is_fused());
                let (got, got_toks, mut cf) = decode_rows(&m, m.new_cache(), &prompt, steps, Some(&toks));
                assert!(cf.is_fused(), "{what}: the fused path did not run");
                // 30 steps from an empty cache or 50 positions: one eager step and one capture
                // per buffer size (64, then 128 positions), replays otherwise.
                let replays = cf.graph_replays();
                eprintln!("{what}: {replays} of {steps} steps replayed the captured graph");
                if replays + 4 < steps as u64 {
                    bad.push(format!("{what}: only {replays} of {steps} steps replayed the graph"));
                }
                let worst = got.iter().zip(&want).map(|(g, w)| rel_err(g, w)).fold(0f32, f32::max);
                let same = got_toks.iter().zip(&toks).filter(|(a, b)| a == b).count();
                eprintln!("{what}: worst step max |Δ| = {worst:e} of max |logit|; greedy tokens equal at {same}/{steps} steps");
                if !(worst <= tol) || (dtype == DType::F32 && same != steps) {
                    bad.push(format!("{what}: {worst:e}, {same}/{steps} tokens"));
                }
                // Two more tokens through the generic path, from both caches.
                let two = Tensor::new(&[7u32, 11], dev).unwrap().unsqueeze(0).unwrap();
                let (a, b) = (host(&m.forward(&two, Some(&mut cf), false).unwrap()), host(&m.forward(&two, Some(&mut cg), false).unwrap()));
                let e = rel_err(&a, &b);
                if !(e <= tol) {
                    bad.push(format!("{what}: generic forward after fused decoding: {e:e}"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "fused decoding differs:\n{}", bad.join("\n"));
}

/// Timing of a decoding step's parts on the smollm2-135m and llama-3.2-3b shapes (random NF4
/// weights, bf16; layer 0, 160 cached positions): per call, the host's time to enqueue 500 calls
/// back to back, and the time until the GPU has run them. Prints only; run it explicitly:
/// `gpu --ignored decode_profile --nocapture`.
#[test]
#[ignore]
fn decode_profile() {
    use candle_core::Module;
    use qscript::model::llama::Weight;
    use qscript::model::names::Proj;
    use std::time::Instant;
    fn g(lin: &Linear) -> &Quant4Gpu {
        match &lin.weight {
            Weight::Quant4 { gpu: Some(g), .. } => g,
            _ => panic!("not a 4-bit GPU weight"),
        }
    }
    let Some(dev) = gpu("decode_profile") else { return };
    for shape in ["smollm2-135m", "llama-3.2-3b"] {
        let q = qscript::model::quantized::BnbConfig { quant_type: QuantType::Nf4, double_quant: true, compute_dtype: DType::BF16, ..Default::default() };
        let opts = LoadOptions { dtype: DType::BF16, device: dev.clone(), quantization: Some(q), ..Default::default() };
        let m = Model::random(shape, &opts).unwrap();
        let l = &m.llama;
        let c = &l.config;
        let (h, kvh, d, hid, inter, cap, len) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size, 256, 160);
        let (b, bf) = (&l.layers[0], |t: Tensor| t.to_dtype(DType::BF16).unwrap());
        let (a, f) = (&b.self_attn, &b.mlp);
        let x = bf(on(dev, &values(hid, 1), &[1, 1, hid]));
        let (qv, att, mlp) = (bf(on(dev, &values(h * d, 2), &[h * d])), bf(on(dev, &values(h * d, 3), &[h * d])), bf(on(dev, &values(inter, 4), &[inter])));
        let (kc, vc) = (bf(on(dev, &values(kvh * cap * d, 5), &[kvh, cap, d])), bf(on(dev, &values(kvh * cap * d, 6), &[kvh, cap, d])));
        let time = |what: &str, f: &mut dyn FnMut()| {
            for _ in 0..10 {
                f();
            }
            dev.synchronize().unwrap();
            let n = 500;
            let t0 = Instant::now();
            for _ in 0..n {
                f();
            }
            let enq = t0.elapsed().as_secs_f64();
            dev.synchronize().unwrap();
            let all = t0.elapsed().as_secs_f64();
            eprintln!("{shape} {what:>18}: host {:7.1} µs, with the GPU {:7.1} µs per call", enq * 1e6 / n as f64, all * 1e6 / n as f64);
        };
        let (n1, n2) = (&b.input_layernorm, &b.post_attention_layernorm);
        let last = Tensor::new(&[len as u32 - 1], dev).unwrap();
        let at = dec_pos(len - 1, &last);
        time("qkv + rope", &mut || dec::qkv_rope(&x, &n1.weight, 1e-5, [g(b.proj(Proj::Q)), g(b.proj(Proj::K)), g(b.proj(Proj::V))], &l.rope.cos, &l.rope.sin, &at, d, &qv, &kc, &vc).unwrap());
        time("attention", &mut || dec::attention(&qv, &kc, &vc, &at, &att).unwrap());
        time("o_proj + residual", &mut || dec::residual(g(&a.o_proj), &att, &x).unwrap());
        time("gate/up + swiglu", &mut || dec::gate_up(&x, &n2.weight, 1e-5, g(b.proj(Proj::Gate)), g(b.proj(Proj::Up)), &mlp).unwrap());
        time("down + residual", &mut || dec::residual(g(&f.down_proj), &mlp, &x).unwrap());
        let ids = Tensor::new(&[[5u32]], dev).unwrap();
        time("embedding", &mut || drop(candle_nn::Embedding::new(l.embed_tokens.clone(), hid).forward(&ids).unwrap()));
        time("norm + head + f32", &mut || drop(Linear::new(l.embed_tokens.clone(), None).forward(&l.norm.forward(&x).unwrap()).unwrap().to_dtype(DType::F32).unwrap()));
        let logits = Linear::new(l.embed_tokens.clone(), None).forward(&x).unwrap().to_dtype(DType::F32).unwrap();
        time("argmax + to host", &mut || {
            std::hint::black_box(logits.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap());
        });
        let mut cache = l.new_cache();
        let prompt = Tensor::new(&[[1u32; 32]], dev).unwrap();
        l.forward(&prompt, Some(&mut cache), true).unwrap();
        time("whole step", &mut || drop(l.forward(&ids, Some(&mut cache), true).unwrap()));
        assert!(cache.is_fused());
    }
}

/// Training steps of a real-shaped model (random SmolLM2-135M, NF4, bf16, LoRA r=16 with
/// dropout on all projections, 4×256 tokens) give finite losses, the same in two runs. The steps
/// run on a rayon worker and the optimizer on this thread: with candle's per-thread default
/// stream they raced (NaN losses, run-to-run differences) once the GPU fell behind the host.
#[test]
fn training_steps_are_finite_and_repeatable() {
    let Some(dev) = gpu("training_steps_are_finite_and_repeatable") else { return };
    let run = || -> Vec<f64> {
        let q = qscript::model::quantized::BnbConfig { quant_type: QuantType::Nf4, double_quant: true, compute_dtype: DType::BF16, ..Default::default() };
        let opts = LoadOptions { dtype: DType::BF16, device: dev.clone(), quantization: Some(q), ..Default::default() };
        let mut m = Model::random("smollm2-135m", &opts).unwrap();
        let cfg = LoraConfig { r: 16, lora_alpha: 32.0, lora_dropout: 0.1, target_modules: TargetModules::AllLinear, ..Default::default() };
        lora::attach(&mut m.llama, &cfg, 0).unwrap();
        let (b, t) = (4, 256);
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7919 + 13) % 49152).collect();
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let batch = TrainBatch::new(b, t, &ids, &labels, None, None, dev).unwrap();
        let mut opt = AdamW::new(&m.llama, AdamWConfig { lr: 2e-4, ..Default::default() }).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let so = StepOptions { train: true, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
        (0..4)
            .map(|_| {
                let mut out = engine::forward_backward(&m.llama, &batch, &so, &mut rng).unwrap();
                clip_grad_norm(&mut out.grads, 1.0).unwrap();
                opt.step(&mut m.llama, &out.grads, 2e-4).unwrap();
                out.mean_loss()
            })
            .collect()
    };
    let (a, b) = (run(), run());
    eprintln!("losses {a:?}");
    assert!(a.iter().all(|l| l.is_finite()), "{a:?}");
    assert_eq!(a, b, "two runs of the same steps differ");
}

/// The fused heads/RoPE kernel (split: rows → rotated heads; merge: its transpose, the
/// gradient) against the CPU's copy + candle RoPE, f32 to 1e-6 and bf16 to 1e-2 of the largest
/// value, with per-token positions as packing gives them; merge(split(x)) = x.
#[test]
fn heads_rope_kernel_matches_the_cpu() {
    use qscript::model::layers::rope;
    let Some(dev) = gpu("heads_rope_kernel_matches_the_cpu") else { return };
    let (b, t, h, d, half) = (2, 7, 3, 8, 4);
    let x = values(b * t * h * d, 41);
    let angles: Vec<f32> = (0..b * t * half).map(|i| ((i / half) % 5) as f32 * (0.3 + (i % half) as f32 * 0.7)).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    for (dt, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 1e-2)] {
        let on = |v: &[f32], s: &[usize], dv: &Device| Tensor::from_vec(v.to_vec(), s, dv).unwrap().to_dtype(dt).unwrap();
        for rotate in [true, false] {
            let run = |dv: &Device| {
                let (c, s) = (on(&cos, &[b, t, half], dv), on(&sin, &[b, t, half], dv));
                let r = rotate.then_some((&c, &s));
                let y = rope::split_heads(&on(&x, &[b * t, h * d], dv), b, t, h, d, r).unwrap();
                let back = rope::merge_heads(&y, r).unwrap();
                (y, back)
            };
            let (want_y, _) = run(&Device::Cpu);
            let (got_y, got_back) = run(dev);
            assert_eq!(got_y.dims(), [b, h, t, d]);
            let e = tensor_rel_err(&got_y, &want_y);
            assert!(e <= tol, "{dt:?} rotate {rotate}: split off by {e:e}");
            let e = tensor_rel_err(&got_back, &on(&x, &[b * t, h * d], &Device::Cpu));
            assert!(e <= tol * 2.0, "{dt:?} rotate {rotate}: merge(split(x)) off by {e:e}");
        }
    }
}

/// A CUDA build puts a plain `load_model` on the GPU in bfloat16 (4-bit compute too), names the
/// GPU, and `--device cpu` (the run-wide override) brings it back to the CPU in float32.
#[test]
fn load_model_defaults_to_the_gpu_in_bf16() {
    use qscript::script::model_api::load;
    let Some(_) = gpu("load_model_defaults_to_the_gpu_in_bf16") else { return };
    let base = format!("{}/tests/golden/peft/1/base", env!("CARGO_MANIFEST_DIR"));
    let m = load(&base, &rhai::Map::new()).unwrap();
    let (dev, dtype) = (m.get().unwrap().llama.device.clone(), m.get().unwrap().llama.dtype);
    assert!(dev.is_cuda() && dtype == DType::BF16, "{} {dtype:?}", qscript::device::name(&dev));
    assert!(qscript::device::describe(&dev).starts_with("cuda:0 ("), "{}", qscript::device::describe(&dev));
    let mut opts = rhai::Map::new();
    let mut bnb = rhai::Map::new();
    bnb.insert("load_in_4bit".into(), true.into());
    opts.insert("quantization_config".into(), rhai::Dynamic::from(bnb));
    let q = load(&base, &opts).unwrap();
    assert_eq!(q.get().unwrap().llama.quantization.as_ref().unwrap().compute_dtype, DType::BF16);
    let mut map = rhai::Map::new();
    map.insert("device_map".into(), "auto".into());
    assert!(load(&base, &map).unwrap().get().unwrap().llama.device.is_cuda());
    qscript::device::set_override(Some("cpu")).unwrap();
    let c = load(&base, &rhai::Map::new());
    qscript::device::set_override(None).unwrap();
    let c = c.unwrap();
    assert!(c.get().unwrap().llama.device.is_cpu() && c.get().unwrap().llama.dtype == DType::F32);
}

/// Gradient checkpointing with the kept layer inputs offloaded to pinned host memory
/// (`kernels::offload`) against the same steps with them on the GPU: a random SmolLM2-135M
/// shape (NF4, bf16, LoRA r=16 with dropout), 4×512 tokens, three AdamW steps. The losses and
/// every LoRA gradient are bit-identical (the bytes go out and come back unchanged, the same
/// kernels run on them), and the pinned pool stops growing after the first step (reused, not
/// re-pinned); a longer batch replaces its buffers instead of adding to them, and a shorter one
/// reuses them. The peak GPU memory is measured by `qscript bench train` in processes of their
/// own (the memory pool is the process's, and other tests run beside this one): offloaded, it
/// is lower by at least half of what the 30 kept inputs take.
#[test]
fn checkpoint_offload_is_exact_and_lowers_peak_memory() {
    use qscript::kernels::offload;
    let Some(dev) = gpu("checkpoint_offload_is_exact_and_lowers_peak_memory") else { return };
    let (b, t) = (4, 512);
    // Per step: the loss and a hash of every gradient's bytes, and the pinned bytes pooled after
    // it; then (offloaded) the pinned bytes after a step of 4×640 tokens and one of 4×256.
    let run = |offload: bool| -> (Vec<f64>, Vec<Vec<u8>>, Vec<usize>, Vec<usize>) {
        let q = qscript::model::quantized::BnbConfig { quant_type: QuantType::Nf4, double_quant: true, compute_dtype: DType::BF16, ..Default::default() };
        let opts = LoadOptions { dtype: DType::BF16, device: dev.clone(), quantization: Some(q), ..Default::default() };
        let mut m = Model::random("smollm2-135m", &opts).unwrap();
        let cfg = LoraConfig { r: 16, lora_alpha: 32.0, lora_dropout: 0.1, target_modules: TargetModules::AllLinear, ..Default::default() };
        lora::attach(&mut m.llama, &cfg, 0).unwrap();
        let batch_of = |t: usize| {
            let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7919 + 13) % 49152).collect();
            let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            TrainBatch::new(b, t, &ids, &labels, None, None, dev).unwrap()
        };
        let batch = batch_of(t);
        let mut opt = AdamW::new(&m.llama, AdamWConfig { lr: 2e-4, ..Default::default() }).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let so = StepOptions { train: true, gradient_checkpointing: true, offload_checkpoints: offload, grad_scale: None };
        let (mut losses, mut hashes, mut pinned) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            let mut out = engine::forward_backward(&m.llama, &batch, &so, &mut rng).unwrap();
            let mut h = Sha256::new();
            for g in &out.grads {
                h.update(bytes(&g.da));
                h.update(bytes(&g.db));
            }
            hashes.push(h.finalize().to_vec());
            losses.push(out.loss_sum);
            clip_grad_norm(&mut out.grads, 1.0).unwrap();
            opt.step(&mut m.llama, &out.grads, 2e-4).unwrap();
            pinned.push(offload::pinned_bytes(dev));
        }
        let mut other = Vec::new();
        if offload {
            for t in [640, 256] {
                engine::forward_backward(&m.llama, &batch_of(t), &so, &mut rng).unwrap();
                other.push(offload::pinned_bytes(dev));
            }
        }
        (losses, hashes, pinned, other)
    };
    let (l_gpu, h_gpu, _, _) = run(false);
    let (l_host, h_host, pinned, other) = run(true);
    // SmolLM2-135M: 30 layers, hidden 576; bf16.
    let kept = 30 * b * t * 576 * 2;
    eprintln!("losses {l_gpu:?}; kept inputs {:.1} MiB; pinned after each step {pinned:?}", kept as f64 / 1048576.0);
    assert!(l_gpu.iter().all(|l| l.is_finite()), "{l_gpu:?}");
    assert_eq!(l_gpu, l_host, "losses differ with offload");
    assert_eq!(h_gpu, h_host, "LoRA gradients differ with offload");
    assert!(pinned[0] >= kept, "the parked inputs sit in pinned memory: {pinned:?} < {kept}");
    assert!(pinned.windows(2).all(|w| w[0] == w[1]), "the pinned pool is reused, not grown: {pinned:?}");
    let kept640 = 30 * b * 640 * 576 * 2;
    assert!(other[0] >= kept640 && other[0] <= kept640 * 9 / 8 + 30 * (64 << 10), "a longer batch's buffers replace the shorter ones: {other:?}, kept {kept640}");
    assert_eq!(other[1], other[0], "a shorter batch reuses the longer one's buffers");

    // The peak, each in a process of its own.
    let bench = |extra: &[&str]| -> serde_json::Value {
        // The GPU machine runs a cross-built copy of this binary: QSCRIPT_BIN names its qscript.
        let exe = std::env::var_os("QSCRIPT_BIN").map_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_qscript")), Into::into);
        let o = std::process::Command::new(exe)
            .args(["bench", "train", "--shape", "smollm2-135m", "--device", "cuda", "--batch", "4", "--seq", "512", "--steps", "2", "--gradient-checkpointing"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line = String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().to_string();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let (on, off) = (bench(&[]), bench(&["--no-offload"]));
    eprintln!("bench offloaded: {on}\nbench on the GPU: {off}");
    assert_eq!(on["offload_checkpoints"], true);
    assert_eq!(off["offload_checkpoints"], false);
    assert_eq!(on["loss_last"], off["loss_last"], "bench losses differ with offload");
    let gib = |v: &serde_json::Value| v["peak_gpu_gib"].as_f64().unwrap() * (1u64 << 30) as f64;
    let (p_on, p_off) = (gib(&on), gib(&off));
    assert!(p_on + kept as f64 / 2.0 <= p_off, "offload should lower the peak by most of the kept inputs ({kept} bytes): {p_on} vs {p_off}");
}
