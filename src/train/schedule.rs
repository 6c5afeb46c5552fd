//! Learning-rate schedules with transformers' formulas (`get_*_schedule_with_warmup`): the rate
//! used for optimizer step `step` (0-based) of `total`.

use super::args::Schedule;

pub fn lr_at(kind: Schedule, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    let warm = warmup as f64;
    if matches!(kind, Schedule::Constant) {
        return base;
    }
    if step < warmup {
        return base * s / warm.max(1.0);
    }
    let factor = match kind {
        Schedule::Linear => ((total as f64 - s) / (total as f64 - warm).max(1.0)).max(0.0),
        Schedule::Cosine => {
            let progress = (s - warm) / (total as f64 - warm).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
        Schedule::ConstantWithWarmup | Schedule::Constant => 1.0,
    };
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_formulas() {
        // get_linear_schedule_with_warmup(warmup=2, total=10) at steps 0..10.
        let lin: Vec<f64> = (0..10).map(|s| lr_at(Schedule::Linear, 1.0, s, 2, 10)).collect();
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (a, b) in lin.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{lin:?}");
        }
        assert!((lr_at(Schedule::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::ConstantWithWarmup, 2.0, 1, 4, 10), 0.5);
        assert_eq!(lr_at(Schedule::Constant, 2.0, 0, 4, 10), 2.0);
    }
}
