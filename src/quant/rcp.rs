//! The reciprocal bitsandbytes' CUDA kernels actually compute.
//!
//! bnb is built with `--use_fast_math`, so the `1.0f / absmax` of its quantize kernels compiles
//! to `rcp.approx.ftz.f32` (the GPU's MUFU.RCP): denormals flush to zero and the result is
//! faithfully, not correctly, rounded — for about 13% of mantissas it is the f32 neighbour of the
//! correctly rounded 1/x on the other side of the exact value. That one-ulp difference decides
//! codes whenever `x * (1/absmax)` lands on a threshold, which bf16 weights hit often (FP4's
//! thresholds are ratios like 5/6 or 7/24).
//!
//! The result only depends on the mantissa (checked for every normal exponent), so one bit per
//! mantissa records "differs from the correctly rounded reciprocal". `rcp_approx.zip` holds those
//! 2^23 bits (bit `m & 7` of byte `m >> 3`), deflated; they were read off an NVIDIA H200 with
//!
//! ```text
//! asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(a) : "f"(x));   // x = 1.0 + m * 2^-23, m < 2^23
//! asm("rcp.rn.f32 %0, %1;"         : "=f"(r) : "f"(x));   // bit m = (a != r)
//! ```
//! and `1.0f / x` under `--use_fast_math` gave `a` for every m.

use std::io::Read;
use std::sync::OnceLock;

static TABLE_ZIP: &[u8] = include_bytes!("rcp_approx.zip");

fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The table is part of the binary: failing to read it is a build defect, not bad input.
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(TABLE_ZIP)).expect("embedded rcp table is a zip");
        let mut file = zip.by_index(0).expect("embedded rcp table has one entry");
        let mut bits = Vec::with_capacity(1 << 20);
        file.read_to_end(&mut bits).expect("embedded rcp table inflates");
        assert_eq!(bits.len(), 1 << 20, "embedded rcp table has 2^23 bits");
        bits
    })
}

/// `rcp.approx.ftz.f32(x)`, bit for bit: ±0 and denormal inputs give ±inf, results below the
/// smallest normal flush to ±0, inf gives 0 and NaN stays NaN.
pub fn rcp_approx(x: f32) -> f32 {
    let bits = x.to_bits();
    let exp = (bits >> 23) & 0xff;
    if exp == 0 {
        return f32::INFINITY.copysign(x);
    }
    if exp == 0xff {
        return 1.0 / x;
    }
    let a = x.abs();
    let mut r = 1.0 / a; // correctly rounded
    if r < f32::MIN_POSITIVE {
        return 0.0f32.copysign(x);
    }
    let m = (bits & 0x7f_ffff) as usize;
    if table()[m >> 3] >> (m & 7) & 1 == 1 {
        // Step to the other neighbour of the exact 1/a; a*r is exact in f64 (24 + 24 bits).
        let exact_above = (a as f64) * (r as f64) < 1.0;
        r = f32::from_bits(if exact_above { r.to_bits() + 1 } else { r.to_bits() - 1 });
        if r < f32::MIN_POSITIVE {
            return 0.0f32.copysign(x);
        }
    }
    r.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_the_captured_population() {
        let set: u32 = table().iter().map(|b| b.count_ones()).sum();
        assert_eq!(set, 374_723 + 733_799); // one-ulp-down + one-ulp-up results seen on the H200
    }

    #[test]
    fn special_values() {
        assert_eq!(rcp_approx(0.0), f32::INFINITY);
        assert_eq!(rcp_approx(-0.0), f32::NEG_INFINITY);
        assert_eq!(rcp_approx(1e-40), f32::INFINITY); // denormal input flushes
        assert_eq!(rcp_approx(f32::INFINITY), 0.0);
        assert!(rcp_approx(f32::NAN).is_nan());
        assert_eq!(rcp_approx(1.0), 1.0);
        assert_eq!(rcp_approx(2.0f32.powi(127)), 0.0); // 2^-127 is denormal: flushed
        assert_eq!(rcp_approx(2.0f32.powi(126)), f32::MIN_POSITIVE);
        assert_eq!(rcp_approx(-4.0), -0.25);
    }

    #[test]
    fn within_one_ulp_of_correct() {
        for i in 0..10_000u32 {
            let x = f32::from_bits(0x3f80_0000 + i * 838);
            let (a, r) = (rcp_approx(x), 1.0 / x);
            assert!((a.to_bits() as i64 - r.to_bits() as i64).abs() <= 1);
            let s = x * 2.0f32.powi(-40);
            assert_eq!(rcp_approx(s), a * 2.0f32.powi(40));
        }
    }
}
