//! bitsandbytes-compatible 4-bit quantization (NF4 / FP4, blockwise, optional double
//! quantization), CPU reference.
//!
//! Everything here is bit-exact with bitsandbytes 0.50.2 running on an NVIDIA GPU (what
//! transformers uses to write `*-bnb-4bit` checkpoints): packed codes, absmax, double-quant
//! statistics, code maps, dequantized values, and the `quant_state.bitsandbytes__*` JSON. That
//! means reproducing the GPU's arithmetic, not just the algorithm: the fast-math reciprocal
//! (`rcp`), flush-to-zero of denormals (`blockwise::ftz`) and PyTorch's CUDA summation order
//! for the double-quant offset (`double_quant::torch_cuda_mean`).
//!
//! ```no_run
//! use qscript::quant::{quantize_4bit, dequantize_4bit, QuantType};
//! let w = vec![0.1f32; 64 * 64];
//! let q = quantize_4bit(&w, &[64, 64], QuantType::Nf4, 64, true)?;
//! let back = dequantize_4bit(&q, candle_core::DType::BF16)?; // Tensor [64, 64]
//! println!("{}", q.state.to_bnb_json());
//! # anyhow::Ok(())
//! ```

pub mod blockwise;
pub mod codebook;
pub mod double_quant;
mod json;
mod rcp;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

pub use codebook::{dynamic_map, FP4_CODE, NF4_CODE};
pub use double_quant::NESTED_BLOCKSIZE;
pub use json::{from_bnb_json, BnbJson};
pub use rcp::rcp_approx;

/// Default quantization block size (bitsandbytes' `quantize_4bit` default).
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// What follows a 4-bit weight's key in the key of its quant-state tensor (bnb's layout).
pub const BNB_QUANT_STATE: &str = ".quant_state.bitsandbytes__";

/// The quant-state key of the 4-bit weight `weight_key` (`....weight.quant_state.bitsandbytes__nf4`).
pub fn bnb_quant_state_key(weight_key: &str, quant_type: &str) -> String {
    format!("{weight_key}{BNB_QUANT_STATE}{quant_type}")
}

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    /// bitsandbytes' name: "nf4" or "fp4".
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parse "nf4" / "fp4" (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => bail!("unknown 4-bit quant type {s:?}: expected \"nf4\" or \"fp4\""),
        }
    }

    /// The code book bitsandbytes stores as `quant_map`.
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4_CODE,
            QuantType::Fp4 => FP4_CODE,
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-block scales: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double {
        /// 8-bit codes of `absmax - offset`, one per block.
        absmax_q: Vec<u8>,
        /// Mean of the original absmax vector.
        offset: f32,
        /// Values of `absmax_q` per nested absmax (256 when we quantize).
        nested_blocksize: usize,
        /// One f32 scale per `nested_blocksize` codes.
        nested_absmax: Vec<f32>,
        /// The 8-bit map the codes index (bnb's signed dynamic map when we quantize).
        nested_code: Box<[f32; 256]>,
    },
}

/// Everything needed besides the packed codes to dequantize (bnb's `QuantState`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    /// Dtype of the original tensor (F32, BF16 or F16); the default dequantization dtype.
    pub dtype: DType,
    /// The stored code book (`quant_map`). Dequantization uses bnb's fixed tables for
    /// `quant_type`, as its kernels do; this is kept so checkpoints round-trip.
    pub code: [f32; 16],
    pub absmax: Absmax,
}

/// A quantized tensor: two 4-bit codes per byte, the even element in the high nibble.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    pub packed: Vec<u8>,
    pub state: QuantState,
}

/// Check a blocksize: a power of two from 32 to 4096, like bitsandbytes.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if !(blocksize.is_power_of_two() && (32..=4096).contains(&blocksize)) {
        bail!("invalid 4-bit blocksize {blocksize}: must be a power of two from 32 to 4096");
    }
    Ok(())
}

fn dtype_name(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => bail!("4-bit quantization works on floating tensors (f32, bf16, f16), not {other:?}"),
    })
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl QuantState {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Number of quantization blocks.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Check that the statistics fit the shape and blocksize (lengths, nested layout).
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        dtype_name(self.dtype)?;
        let nb = self.num_blocks();
        match &self.absmax {
            Absmax::Plain(a) if a.len() != nb => {
                bail!(
                    "absmax has {} values, expected {nb} (one per block of {} in shape {:?})",
                    a.len(),
                    self.blocksize,
                    self.shape
                )
            }
            Absmax::Double { absmax_q, nested_blocksize, nested_absmax, .. } => {
                if absmax_q.len() != nb {
                    bail!(
                        "absmax (quantized) has {} values, expected {nb} (one per block of {} in shape {:?})",
                        absmax_q.len(),
                        self.blocksize,
                        self.shape
                    )
                }
                if !nested_blocksize.is_power_of_two() || !(64..=4096).contains(nested_blocksize) {
                    bail!("invalid nested blocksize {nested_blocksize}: must be a power of two from 64 to 4096");
                }
                let nn = nb.div_ceil(*nested_blocksize);
                if nested_absmax.len() != nn {
                    bail!(
                        "nested_absmax has {} values, expected {nn} (one per {nested_blocksize} absmax values)",
                        nested_absmax.len()
                    )
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The f32 absmax of every block (recovered from the nested statistics when double-quantized).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double { absmax_q, offset, nested_blocksize, nested_absmax, nested_code } => {
                double_quant::decompress(absmax_q, *offset, nested_absmax, nested_code, *nested_blocksize)
            }
        }
    }

    /// The non-tensor part of the state, as bnb serializes it.
    pub fn bnb_json(&self) -> BnbJson {
        BnbJson {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            dtype: self.dtype,
            shape: self.shape.clone(),
            nested: match &self.absmax {
                Absmax::Plain(_) => None,
                Absmax::Double { offset, nested_blocksize, .. } => Some((*nested_blocksize, *offset)),
            },
        }
    }

    /// bnb's `quant_state.bitsandbytes__{nf4|fp4}` JSON, byte for byte as Python's `json.dumps`
    /// writes it (`QuantState.as_dict(packed=True)`).
    pub fn to_bnb_json(&self) -> String {
        self.bnb_json().to_json()
    }
}

fn quantize_impl<T: blockwise::InElem>(
    data: &[T],
    shape: &[usize],
    dtype: DType,
    qt: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4bit> {
    check_blocksize(blocksize)?;
    if numel(shape) != data.len() {
        bail!("shape {shape:?} has {} elements but {} values were given", numel(shape), data.len());
    }
    if data.is_empty() {
        bail!("cannot quantize an empty tensor (shape {shape:?})");
    }
    let (packed, absmax) = blockwise::quantize_4bit_blocks(data, qt, blocksize);
    let absmax = if double_quant {
        let nested_code = Box::new(dynamic_map());
        let c = double_quant::compress(&absmax, &nested_code);
        Absmax::Double {
            absmax_q: c.absmax_q,
            offset: c.offset,
            nested_blocksize: NESTED_BLOCKSIZE,
            nested_absmax: c.nested_absmax,
            nested_code,
        }
    } else {
        Absmax::Plain(absmax)
    };
    let state = QuantState { quant_type: qt, blocksize, shape: shape.to_vec(), dtype, code: qt.code(), absmax };
    Ok(Quantized4bit { packed, state })
}

/// Quantize f32 values of the given shape (row-major). `double_quant` is bnb's
/// `compress_statistics`.
pub fn quantize_4bit(
    data: &[f32],
    shape: &[usize],
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4bit> {
    quantize_impl(data, shape, DType::F32, quant_type, blocksize, double_quant)
}

/// Quantize bf16 values (the state records BF16 as the original dtype).
pub fn quantize_4bit_bf16(
    data: &[bf16],
    shape: &[usize],
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4bit> {
    quantize_impl(data, shape, DType::BF16, quant_type, blocksize, double_quant)
}

/// Quantize f16 values (the state records F16 as the original dtype).
pub fn quantize_4bit_f16(
    data: &[f16],
    shape: &[usize],
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4bit> {
    quantize_impl(data, shape, DType::F16, quant_type, blocksize, double_quant)
}

/// Quantize a floating tensor (f32, bf16 or f16, any device); other dtypes are an error.
pub fn quantize_4bit_tensor(t: &Tensor, quant_type: QuantType, blocksize: usize, double_quant: bool) -> Result<Quantized4bit> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    match t.dtype() {
        DType::F32 => quantize_4bit(&flat.to_vec1::<f32>()?, &shape, quant_type, blocksize, double_quant),
        DType::BF16 => quantize_4bit_bf16(&flat.to_vec1::<bf16>()?, &shape, quant_type, blocksize, double_quant),
        DType::F16 => quantize_4bit_f16(&flat.to_vec1::<f16>()?, &shape, quant_type, blocksize, double_quant),
        other => bail!("cannot quantize a {other:?} tensor: 4-bit quantization needs f32, bf16 or f16"),
    }
}

impl Quantized4bit {
    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.state.numel()
    }

    /// Check packed length and statistics against the shape.
    pub fn validate(&self) -> Result<()> {
        self.state.validate()?;
        let want = self.numel().div_ceil(2);
        if self.packed.len() != want {
            bail!("packed weight has {} bytes, expected {want} for shape {:?}", self.packed.len(), self.state.shape);
        }
        Ok(())
    }

    fn dequantize_into<O: blockwise::OutElem>(&self, out: &mut [O]) -> Result<()> {
        self.validate()?;
        if out.len() != self.numel() {
            bail!("output has {} elements, expected {} for shape {:?}", out.len(), self.numel(), self.state.shape);
        }
        let absmax = self.state.absmax_f32();
        blockwise::dequantize_4bit_blocks(&self.packed, &absmax, self.state.quant_type, self.state.blocksize, out);
        Ok(())
    }

    /// The tensors transformers saves for this weight, keyed `{prefix}`, `{prefix}.absmax`,
    /// `{prefix}.quant_map`, [`{prefix}.nested_absmax`, `{prefix}.nested_quant_map`,]
    /// `{prefix}.quant_state.bitsandbytes__{nf4|fp4}` (prefix e.g. `model.layers.0.mlp.up_proj.weight`).
    /// The packed weight is u8 `[(n + 1) / 2, 1]`; absmax is u8 when double-quantized.
    pub fn to_bnb_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        self.validate()?;
        let cpu = &Device::Cpu;
        let s = &self.state;
        let mut out = vec![(prefix.to_string(), Tensor::from_vec(self.packed.clone(), (self.packed.len(), 1), cpu)?)];
        match &s.absmax {
            Absmax::Plain(a) => out.push((format!("{prefix}.absmax"), Tensor::from_slice(a, a.len(), cpu)?)),
            Absmax::Double { absmax_q, nested_absmax, nested_code, .. } => {
                out.push((format!("{prefix}.absmax"), Tensor::from_slice(absmax_q, absmax_q.len(), cpu)?));
                out.push((format!("{prefix}.nested_absmax"), Tensor::from_slice(nested_absmax, nested_absmax.len(), cpu)?));
                out.push((format!("{prefix}.nested_quant_map"), Tensor::from_slice(&nested_code[..], 256, cpu)?));
            }
        }
        out.push((format!("{prefix}.quant_map"), Tensor::from_slice(&s.code, 16, cpu)?));
        let json = s.to_bnb_json().into_bytes();
        out.push((
            bnb_quant_state_key(prefix, s.quant_type.as_str()),
            Tensor::from_vec(json.clone(), json.len(), cpu)?,
        ));
        Ok(out)
    }

    /// Rebuild from the tensors of a bnb checkpoint (see [`Self::to_bnb_tensors`]); `get`
    /// returns a tensor by full name. Errors name the tensor that is missing or malformed.
    pub fn from_bnb_tensors(prefix: &str, get: impl Fn(&str) -> Option<Tensor>) -> Result<Self> {
        let need = |suffix: &str| -> Result<(String, Tensor)> {
            let name = format!("{prefix}{suffix}");
            let t = get(&name).with_context(|| format!("{name}: missing from the 4-bit checkpoint"))?;
            Ok((name, t))
        };
        let (qs_name, qs) = match ["nf4", "fp4"].iter().find_map(|q| {
            let name = bnb_quant_state_key(prefix, q);
            get(&name).map(|t| (name, t))
        }) {
            Some(x) => x,
            None => bail!("{prefix}.quant_state.bitsandbytes__nf4 (or __fp4): missing from the 4-bit checkpoint"),
        };
        let json_bytes = flat_u8(&qs_name, &qs)?;
        let json = std::str::from_utf8(&json_bytes).map_err(|_| anyhow::anyhow!("{qs_name}: not UTF-8 JSON"))?;
        let meta = from_bnb_json(json).with_context(|| qs_name.clone())?;
        if !qs_name.ends_with(meta.quant_type.as_str()) {
            bail!("{qs_name}: the JSON says quant_type {:?}", meta.quant_type.as_str());
        }
        let (w_name, w) = need("")?;
        let packed = raw_bytes(&w_name, &w)?;
        let (q_name, qmap) = need(".quant_map")?;
        let code: [f32; 16] = f32_vec(&q_name, &qmap)?
            .try_into()
            .map_err(|v: Vec<f32>| anyhow::anyhow!("{q_name}: expected 16 values, got {}", v.len()))?;
        let (a_name, a) = need(".absmax")?;
        let absmax = match meta.nested {
            None => {
                if a.dtype() != DType::F32 {
                    bail!("{a_name}: expected f32 absmax (no double quantization in the quant state), got {:?}", a.dtype());
                }
                Absmax::Plain(f32_vec(&a_name, &a)?)
            }
            Some((nested_blocksize, offset)) => {
                if a.dtype() != DType::U8 {
                    bail!("{a_name}: expected u8 absmax codes (double quantization), got {:?}", a.dtype());
                }
                let absmax_q = flat_u8(&a_name, &a)?;
                let (n_name, n) = need(".nested_absmax")?;
                let nested_absmax = f32_vec(&n_name, &n)?;
                let (c_name, c) = need(".nested_quant_map")?;
                let nested_code: Box<[f32; 256]> = f32_vec(&c_name, &c)?
                    .into_boxed_slice()
                    .try_into()
                    .map_err(|v: Box<[f32]>| anyhow::anyhow!("{c_name}: expected 256 values, got {}", v.len()))?;
                Absmax::Double { absmax_q, offset, nested_blocksize, nested_absmax, nested_code }
            }
        };
        let state = QuantState {
            quant_type: meta.quant_type,
            blocksize: meta.blocksize,
            shape: meta.shape,
            dtype: meta.dtype,
            code,
            absmax,
        };
        let q = Quantized4bit { packed, state };
        q.validate().with_context(|| format!("{prefix}: 4-bit weight does not match its quant state"))?;
        Ok(q)
    }
}

fn flat_u8(name: &str, t: &Tensor) -> Result<Vec<u8>> {
    if t.dtype() != DType::U8 {
        bail!("{name}: expected u8, got {:?}", t.dtype());
    }
    Ok(t.flatten_all()?.to_vec1::<u8>()?)
}

fn f32_vec(name: &str, t: &Tensor) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        bail!("{name}: expected f32, got {:?}", t.dtype());
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The packed weight's bytes; bnb's `quant_storage` may view them as another dtype.
fn raw_bytes(name: &str, t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::BF16 => t.to_vec1::<bf16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<f16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        other => bail!("{name}: packed 4-bit weight stored as {other:?}, expected u8 (or a float quant_storage)"),
    })
}

/// Dequantize into an f32 slice of exactly `numel` elements.
pub fn dequantize_4bit_f32(q: &Quantized4bit, out: &mut [f32]) -> Result<()> {
    q.dequantize_into(out)
}

/// Dequantize into a bf16 slice (f32 product rounded to nearest even).
pub fn dequantize_4bit_bf16(q: &Quantized4bit, out: &mut [bf16]) -> Result<()> {
    q.dequantize_into(out)
}

/// Dequantize into an f16 slice (f32 product rounded to nearest even).
pub fn dequantize_4bit_f16(q: &Quantized4bit, out: &mut [f16]) -> Result<()> {
    q.dequantize_into(out)
}

/// Dequantize to a CPU tensor of the original shape in `dtype` (F32, BF16 or F16).
pub fn dequantize_4bit(q: &Quantized4bit, dtype: DType) -> Result<Tensor> {
    let n = q.numel();
    let shape = q.state.shape.as_slice();
    let cpu = &Device::Cpu;
    Ok(match dtype {
        DType::F32 => {
            let mut v = crate::kernels::uninit_vec(n);
            q.dequantize_into(&mut v)?;
            // SAFETY: dequantize_into checked the length and wrote every element.
            Tensor::from_vec(unsafe { crate::kernels::assume_init(v) }, shape, cpu)?
        }
        DType::BF16 => {
            let mut v = vec![bf16::ZERO; n];
            dequantize_4bit_bf16(q, &mut v)?;
            Tensor::from_vec(v, shape, cpu)?
        }
        DType::F16 => {
            let mut v = vec![f16::ZERO; n];
            dequantize_4bit_f16(q, &mut v)?;
            Tensor::from_vec(v, shape, cpu)?
        }
        other => bail!("cannot dequantize to {other:?}: choose f32, bf16 or f16"),
    })
}
