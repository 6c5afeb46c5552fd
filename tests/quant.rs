//! 4-bit quantization against bitsandbytes 0.50.2: every tensor of the golden files bit for bit,
//! the bnb4bit checkpoint byte for byte, JSON / checkpoint round trips and bad input.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use qscript::quant::{self, Absmax, QuantType, Quantized4bit};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;

fn golden(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(p)
}

fn load(p: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(p), &Device::Cpu).unwrap()
}

/// Raw little-endian bytes of a tensor (bitwise comparison, -0.0 ≠ 0.0, NaN payloads kept).
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<bf16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<f16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

/// Compares named tensors, collecting mismatches so one failure reports all of them.
#[derive(Default)]
struct Checker {
    checked: usize,
    bad: Vec<String>,
}

impl Checker {
    fn eq(&mut self, what: &str, got: &[u8], want: &[u8]) {
        self.checked += 1;
        if got != want {
            let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
            self.bad.push(format!("{what}: {diff} differing bytes (len {} vs {})", got.len(), want.len()));
        }
    }
    fn tensor(&mut self, what: &str, got: &Tensor, want: &Tensor) {
        if got.dtype() != want.dtype() || got.dims() != want.dims() {
            self.checked += 1;
            self.bad.push(format!("{what}: {:?}{:?} vs golden {:?}{:?}", got.dtype(), got.dims(), want.dtype(), want.dims()));
        } else {
            self.eq(what, &bytes(got), &bytes(want));
        }
    }
    fn finish(self, min_checked: usize) {
        assert!(self.bad.is_empty(), "{} of {} comparisons differ:\n{}", self.bad.len(), self.checked, self.bad.join("\n"));
        assert!(self.checked >= min_checked, "only {} comparisons ran", self.checked);
        eprintln!("{} tensors bit-exact", self.checked);
    }
}

/// Check one `P = input.qt.bsN.mode` group of a golden file against our quantization of `input`.
fn check_group(c: &mut Checker, g: &HashMap<String, Tensor>, input: &Tensor, p: &str) {
    let parts: Vec<&str> = p.split('.').collect();
    let qt = QuantType::parse(parts[1]).unwrap();
    let bs: usize = parts[2].trim_start_matches("bs").parse().unwrap();
    let dq = parts[3] == "dq";
    let q = quant::quantize_4bit_tensor(input, qt, bs, dq).unwrap();
    let want = &g[&format!("{p}.packed")];
    c.tensor(&format!("{p}.packed"), &Tensor::from_vec(q.packed.clone(), (q.packed.len(), 1), &Device::Cpu).unwrap(), want);
    if let Some(code) = g.get(&format!("{p}.code")) {
        c.eq(&format!("{p}.code"), &f32_bytes(&q.state.code), &bytes(code));
    }
    match &q.state.absmax {
        Absmax::Plain(a) => c.eq(&format!("{p}.absmax"), &f32_bytes(a), &bytes(&g[&format!("{p}.absmax")])),
        Absmax::Double { absmax_q, offset, nested_absmax, nested_code, nested_blocksize } => {
            assert_eq!(*nested_blocksize, 256);
            c.eq(&format!("{p}.absmax_q"), absmax_q, &bytes(&g[&format!("{p}.absmax_q")]));
            c.eq(&format!("{p}.offset"), &f32_bytes(&[*offset]), &bytes(&g[&format!("{p}.offset")]));
            c.eq(&format!("{p}.nested_absmax"), &f32_bytes(nested_absmax), &bytes(&g[&format!("{p}.nested_absmax")]));
            if let Some(nc) = g.get(&format!("{p}.nested_code")) {
                c.eq(&format!("{p}.nested_code"), &f32_bytes(&nested_code[..]), &bytes(nc));
            }
        }
    }
    // Dequantize from the golden packed codes as well as ours, so a packing mismatch can't
    // hide a dequantization one.
    for (suffix, dtype) in [
        ("dequant", input.dtype()),
        ("dequant_float32", DType::F32),
        ("dequant_bfloat16", DType::BF16),
        ("dequant_float16", DType::F16),
    ] {
        if let Some(want) = g.get(&format!("{p}.{suffix}")) {
            let got = quant::dequantize_4bit(&q, dtype).unwrap();
            c.tensor(&format!("{p}.{suffix}"), &got, want);
        }
    }
}

fn groups(g: &HashMap<String, Tensor>, input: &str) -> Vec<String> {
    let mut ps: Vec<String> = g
        .keys()
        .filter(|k| k.starts_with(&format!("{input}.")) && k.ends_with(".packed"))
        .map(|k| k.trim_end_matches(".packed").to_string())
        .collect();
    ps.sort();
    ps
}

#[test]
fn golden_nf4_every_tensor() {
    let g = load("nf4/1.safetensors");
    let mut c = Checker::default();
    for i in 0..5 {
        for dt in ["float32", "bfloat16"] {
            let input = format!("w{i}_{dt}");
            let ps = groups(&g, &input);
            assert_eq!(ps.len(), 8, "{input}");
            for p in ps {
                check_group(&mut c, &g, &g[&input], &p);
            }
        }
    }
    // 10 inputs × 8 groups × (packed, code, dequant + 1 plain / 4 dq stats) = 440.
    c.finish(440);
}

/// Extra cases generated with the same bnb on an H200 (see tests/golden/nf4/EXTRA.md): f16
/// input, odd lengths, blocksizes 32/256/4096, zero and denormal blocks, 1e30 values, FP4
/// threshold ties on 1024 absmax values, dequantization to all three dtypes.
#[test]
fn golden_extra_cases() {
    let g = load("nf4/extra.safetensors");
    let mut c = Checker::default();
    let mut inputs: Vec<&String> = g.keys().filter(|k| !k.contains('.')).collect();
    inputs.sort();
    assert_eq!(inputs.len(), 9);
    for input in inputs {
        for p in groups(&g, input) {
            check_group(&mut c, &g, &g[input], &p);
        }
    }
    c.finish(300);
}

/// The generator of the big case (splitmix-like hash → [0.01, 4.01)), as in EXTRA.md.
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

/// 11008 × 1024 bf16 (176 128 blocks): the double-quant mean takes PyTorch's multi-block path.
#[test]
fn golden_big_tensor_global_mean() {
    let g = load("nf4/extra.safetensors");
    let x: Vec<bf16> = gen(11008 * 1024, 7).iter().map(|v| bf16::from_f32(v - 2.0)).collect();
    let q = quant::quantize_4bit_bf16(&x, &[11008, 1024], QuantType::Nf4, 64, true).unwrap();
    let p = "big7.nf4.bs64.dq";
    let mut c = Checker::default();
    c.eq("packed sha256", &Sha256::digest(&q.packed), &bytes(&g[&format!("{p}.packed_sha256")]));
    let Absmax::Double { absmax_q, offset, nested_absmax, .. } = &q.state.absmax else { panic!("not double-quantized") };
    c.eq("absmax_q", absmax_q, &bytes(&g[&format!("{p}.absmax_q")]));
    c.eq("offset", &f32_bytes(&[*offset]), &bytes(&g[&format!("{p}.offset")]));
    c.eq("nested_absmax", &f32_bytes(nested_absmax), &bytes(&g[&format!("{p}.nested_absmax")]));
    let mut deq = vec![bf16::ZERO; q.numel()];
    quant::dequantize_4bit_bf16(&q, &mut deq).unwrap();
    let deq_bytes: Vec<u8> = deq.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
    c.eq("dequant sha256", &Sha256::digest(&deq_bytes), &bytes(&g[&format!("{p}.dequant_bfloat16_sha256")]));
    c.finish(5);
}

/// transformers + bitsandbytes saved `quantized/` from `source/` (nf4, double quant): quantizing
/// the source weights reproduces every 4-bit tensor byte for byte, and loading the golden
/// tensors gives back exactly our quantization.
#[test]
fn golden_bnb4bit_checkpoint() {
    let src = load("bnb4bit/1/source/model.safetensors");
    let gold = load("bnb4bit/1/quantized/model.safetensors");
    let mut prefixes: Vec<String> =
        gold.keys().filter_map(|k| k.strip_suffix(".quant_state.bitsandbytes__nf4").map(String::from)).collect();
    prefixes.sort();
    assert_eq!(prefixes.len(), 14);
    let mut c = Checker::default();
    for p in &prefixes {
        let q = quant::quantize_4bit_tensor(&src[p], QuantType::Nf4, 64, true).unwrap();
        let ours = q.to_bnb_tensors(p).unwrap();
        assert_eq!(ours.len(), 6);
        for (name, t) in &ours {
            let want = gold.get(name).unwrap_or_else(|| panic!("{name} not in the golden checkpoint"));
            c.tensor(name, t, want);
        }
        let loaded = Quantized4bit::from_bnb_tensors(p, |n| gold.get(n).cloned()).unwrap();
        assert_eq!(loaded, q, "{p}: loading the golden tensors");
        let json = String::from_utf8(bytes(&gold[&format!("{p}.quant_state.bitsandbytes__nf4")])).unwrap();
        assert_eq!(q.state.to_bnb_json(), json);
    }
    let n_keys = gold.keys().filter(|k| prefixes.iter().any(|p| k.starts_with(p.as_str()))).count();
    assert_eq!(n_keys, 14 * 6, "every 4-bit key was compared");
    c.finish(14 * 6);
}

#[test]
fn round_trip_through_bnb_tensors_and_json() {
    let w: Vec<f32> = gen(3 * 1001, 3).iter().map(|v| v - 2.0).collect();
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for bs in [32, 64, 256, 4096] {
            for dq in [false, true] {
                let q = quant::quantize_4bit(&w, &[3, 1001], qt, bs, dq).unwrap();
                let map: HashMap<String, Tensor> = q.to_bnb_tensors("w").unwrap().into_iter().collect();
                let back = Quantized4bit::from_bnb_tensors("w", |n| map.get(n).cloned()).unwrap();
                assert_eq!(back, q);
                let json = q.state.to_bnb_json();
                let parsed = quant::from_bnb_json(&json).unwrap();
                assert_eq!(parsed, q.state.bnb_json());
                assert_eq!(parsed.to_json(), json);
                let a = quant::dequantize_4bit(&q, DType::F32).unwrap();
                let b = quant::dequantize_4bit(&back, DType::F32).unwrap();
                assert_eq!(bytes(&a), bytes(&b));
            }
        }
    }
}

#[test]
fn dequantization_is_close_to_the_input() {
    let w: Vec<f32> = gen(64 * 576, 5).iter().map(|v| (v - 2.0) * 0.01).collect();
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let q = quant::quantize_4bit(&w, &[64, 576], qt, 64, true).unwrap();
        let mut out = vec![0f32; w.len()];
        quant::dequantize_4bit_f32(&q, &mut out).unwrap();
        let absmax = q.state.absmax_f32();
        for (i, (a, b)) in w.iter().zip(&out).enumerate() {
            // Half the widest gap between neighbouring codes, plus double-quant error.
            assert!((a - b).abs() <= 0.18 * absmax[i / 64] + 1e-4, "{qt} {i}: {a} vs {b}");
        }
    }
}

fn err<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    let e = format!("{:#}", r.expect_err("expected an error"));
    assert!(!e.contains('\n'), "one-line error: {e}");
    e
}

#[test]
fn bad_input_errors() {
    let w = vec![0.5f32; 128];
    for bs in [0, 16, 48, 100, 8192] {
        let e = err(quant::quantize_4bit(&w, &[128], QuantType::Nf4, bs, false));
        assert!(e.contains("blocksize") && e.contains(&bs.to_string()), "{e}");
    }
    let e = err(quant::quantize_4bit(&w, &[3, 40], QuantType::Nf4, 64, false));
    assert!(e.contains("[3, 40]") && e.contains("120") && e.contains("128"), "{e}");
    let e = err(quant::quantize_4bit(&[], &[0], QuantType::Nf4, 64, false));
    assert!(e.contains("empty"), "{e}");
    for t in [Tensor::zeros((4, 64), DType::U8, &Device::Cpu).unwrap(), Tensor::zeros(64, DType::I64, &Device::Cpu).unwrap()] {
        let e = err(quant::quantize_4bit_tensor(&t, QuantType::Nf4, 64, false));
        assert!(e.contains(&format!("{:?}", t.dtype())) && e.contains("f32, bf16 or f16"), "{e}");
    }
    assert!(err(QuantType::parse("int4")).contains("int4"));

    // Statistics that don't fit the shape.
    let good = quant::quantize_4bit(&w, &[2, 64], QuantType::Nf4, 64, true).unwrap();
    let mut q = good.clone();
    if let Absmax::Double { absmax_q, .. } = &mut q.state.absmax {
        absmax_q.pop();
    }
    let e = err(quant::dequantize_4bit(&q, DType::F32));
    assert!(e.contains("absmax") && e.contains("expected 2"), "{e}");
    let mut q = good.clone();
    q.packed.push(0);
    assert!(err(quant::dequantize_4bit(&q, DType::F32)).contains("65 bytes, expected 64"));
    let mut q = good.clone();
    if let Absmax::Double { nested_absmax, .. } = &mut q.state.absmax {
        nested_absmax.push(1.0);
    }
    assert!(err(quant::dequantize_4bit(&q, DType::BF16)).contains("nested_absmax has 2 values, expected 1"));
    let mut out = vec![0f32; 100];
    assert!(err(quant::dequantize_4bit_f32(&good, &mut out)).contains("output has 100 elements, expected 128"));
    assert!(err(quant::dequantize_4bit(&good, DType::U8)).contains("U8"));

    // Checkpoint tensors: missing, wrong dtype, shape that disagrees with the JSON.
    let map: HashMap<String, Tensor> = good.to_bnb_tensors("m.w").unwrap().into_iter().collect();
    for missing in ["m.w.absmax", "m.w.nested_absmax", "m.w.nested_quant_map", "m.w.quant_map", "m.w"] {
        let e = err(Quantized4bit::from_bnb_tensors("m.w", |n| if n == missing { None } else { map.get(n).cloned() }));
        assert!(e.contains(missing) && e.contains("missing"), "{e}");
    }
    let e = err(Quantized4bit::from_bnb_tensors("m.w", |n| if n.contains("quant_state") { None } else { map.get(n).cloned() }));
    assert!(e.contains("m.w.quant_state.bitsandbytes__nf4"), "{e}");
    let e = err(Quantized4bit::from_bnb_tensors("m.w", |n| {
        if n == "m.w.absmax" {
            Some(Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())
        } else {
            map.get(n).cloned()
        }
    }));
    assert!(e.contains("m.w.absmax") && e.contains("u8"), "{e}");
    let bad_json = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}"#;
    let e = err(Quantized4bit::from_bnb_tensors("m.w", |n| {
        if n.contains("quant_state") {
            Some(Tensor::from_vec(bad_json.as_bytes().to_vec(), bad_json.len(), &Device::Cpu).unwrap())
        } else {
            map.get(n).cloned()
        }
    }));
    assert!(e.contains("m.w") && e.contains("[4, 64]"), "{e}");
    for (json, what) in [
        (r#"{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [2]}"#, "blocksize 48"),
        (r#"{"quant_type": "int4", "blocksize": 64, "dtype": "float32", "shape": [2]}"#, "int4"),
        (r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2]}"#, "int8"),
        (r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}"#, "shape"),
        (r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2], "extra": 1}"#, "extra"),
        ("not json", "JSON"),
    ] {
        let e = err(quant::from_bnb_json(json));
        assert!(e.contains(what), "{e}");
    }
}

/// Timing on this machine (run with `--ignored --nocapture`); `examples/bench_quant.rs` measures
/// the SmolLM2-135M sizes.
#[test]
#[ignore]
fn timing_quick() {
    let w: Vec<bf16> = gen(1536 * 576 * 8, 11).iter().map(|v| bf16::from_f32((v - 2.0) * 0.02)).collect();
    let t = std::time::Instant::now();
    let q = quant::quantize_4bit_bf16(&w, &[1536 * 8, 576], QuantType::Nf4, 64, true).unwrap();
    let tq = t.elapsed().as_secs_f64();
    let mut out = vec![0f32; w.len()];
    let t = std::time::Instant::now();
    quant::dequantize_4bit_f32(&q, &mut out).unwrap();
    let td = t.elapsed().as_secs_f64();
    eprintln!(
        "{} weights: quantize {:.1} M/s, dequantize {:.2} GB/s f32",
        w.len(),
        w.len() as f64 / tq / 1e6,
        w.len() as f64 * 4.0 / td / 1e9
    );
}
