//! The code books of bitsandbytes 0.50.2, exactly as it builds and uses them.
//!
//! * NF4 and FP4 hold 16 values each (bnb's `quant_map` / `get_4bit_type`); a 4-bit code is an
//!   index into them. Quantization does not search the code book: bnb's CUDA kernels use a
//!   decision tree whose thresholds are decimal constants (`dQuantizeNF4`, `dQuantizeFP4`), and a
//!   value gets the code of the number of thresholds it strictly exceeds.
//! * The signed dynamic 8-bit map (`create_dynamic_map(signed=True)`) quantizes the absmax
//!   statistics under double quantization.

// The constants keep bnb's decimal spelling; each rounds to the f32 its kernels use.
#![allow(clippy::excessive_precision)]

use super::QuantType;

/// bnb's NF4 `quant_map` (quantiles of N(0, 1), normalised to [-1, 1]).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bnb's FP4 `quant_map`: 1 sign, 2 exponent, 1 mantissa bit in bit-pattern order, divided (in
/// f32) by the largest magnitude, 12. Code 8 is +0.0: bnb's list spells it `-0`, a Python int.
pub const FP4_CODE: [f32; 16] = {
    const RAW: [f32; 16] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];
    let mut out = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = RAW[i] / 12.0;
        i += 1;
    }
    out
};

/// What the CUDA dequantization kernel multiplies by: NF4's table as is; for FP4 the kernel
/// multiplies a magnitude table by ±1.0, so code 8 dequantizes to -0.0 (not the +0.0 of
/// [`FP4_CODE`]); every other value equals the code book.
pub(crate) const fn dequant_table(qt: QuantType) -> [f32; 16] {
    match qt {
        QuantType::Nf4 => NF4_CODE,
        QuantType::Fp4 => {
            let mut t = FP4_CODE;
            t[8] = -0.0;
            t
        }
    }
}

/// `dQuantizeNF4`'s decision thresholds (midpoints between neighbouring codes, rounded to f32
/// from the decimal literals in bnb's kernel), ascending.
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// `dQuantizeFP4`'s thresholds on |x| (ascending) and the code each rank maps to.
const FP4_THRESHOLDS: [f32; 7] = [0.002_604_17, 0.085_937_5, 0.208_333_33, 0.291_666_67, 0.416_666_7, 0.583_333, 0.833_333_3];
const FP4_RANK_CODE: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// The NF4 code of a value already scaled into [-1, 1]. A branch-free count equals bnb's
/// binary decision tree (the thresholds are sorted); NaN exceeds nothing and gets code 0, as on
/// the GPU.
#[inline(always)]
pub fn quantize_nf4_value(x: f32) -> u8 {
    let mut c = 0u8;
    for t in NF4_THRESHOLDS {
        c += (x > t) as u8;
    }
    c
}

/// The FP4 code of a value already scaled into [-1, 1]: sign bit from `x < 0` (so -0.0 and NaN
/// get +), magnitude from the thresholds on |x|.
#[inline(always)]
pub fn quantize_fp4_value(x: f32) -> u8 {
    let a = x.abs();
    let mut rank = 0usize;
    for t in FP4_THRESHOLDS {
        rank += (a > t) as usize;
    }
    FP4_RANK_CODE[rank] | (((x < 0.0) as u8) << 3)
}

/// bnb's signed dynamic 8-bit map, `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`: for exponent i = 0..7, the 2^i midpoints of `linspace(0.1, 1, 2^i + 1)`
/// scaled by ±10^(i-6), plus 0 and 1, sorted.
///
/// Bit-exactness needs torch's f32 `linspace`, which computes `start + step*k` for the first
/// half and `end - step*(steps-1-k)` for the rest, each as one fused multiply-add, and the
/// scale as the f64 power of ten cast to f32.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let steps = (1usize << i) + 1;
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (steps - 1) as f32;
        let half = steps / 2;
        let b: Vec<f32> = (0..steps)
            .map(|k| if k < half { step.mul_add(k as f32, start) } else { (-step).mul_add((steps - 1 - k) as f32, end) })
            .collect();
        // Python's `10 ** (i - 6)` is a double; torch casts the scalar to f32 before multiplying.
        let scale = if i < 6 { 10f64.powi(i - 6) as f32 } else { 1.0 };
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| scale * m));
        data.extend(means.iter().map(|m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).expect("no NaN in the dynamic map"));
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `dQuantize<0>` of bnb's kernels: the 8-bit code of a scaled value `x` in a sorted 256-entry
/// map. A 7-step binary search from the middle, then the nearer of the last pivot and its
/// neighbour on x's side, the midpoint computed as `(a + b) * 0.5` in f32; a value exactly on a
/// midpoint keeps the pivot.
pub fn quantize_8bit_value(code: &[f32; 256], x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let q = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    q as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_thresholds_sit_between_codes() {
        for (i, t) in NF4_THRESHOLDS.iter().enumerate() {
            assert!(NF4_CODE[i] < *t && *t < NF4_CODE[i + 1]);
            assert_eq!(quantize_nf4_value(NF4_CODE[i]), i as u8);
        }
        assert_eq!(quantize_nf4_value(1.0), 15);
        assert_eq!(quantize_nf4_value(f32::NAN), 0);
    }

    #[test]
    fn fp4_codes_round_trip() {
        for c in 0..16u8 {
            let v = FP4_CODE[c as usize];
            let want = if c == 8 { 0 } else { c }; // +0.0 has code 0
            assert_eq!(quantize_fp4_value(v), want, "code {c} value {v}");
        }
        assert_eq!(quantize_fp4_value(-1e-9), 0b1000);
        assert_eq!(quantize_fp4_value(-0.0), 0);
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map();
        assert_eq!(m[127], 0.0);
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        for i in 0..127 {
            assert_eq!(m[i], -m[254 - i]);
        }
        for (i, v) in m.iter().enumerate() {
            assert_eq!(quantize_8bit_value(&m, *v) as usize, i);
        }
    }
}
