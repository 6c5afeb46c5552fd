//! Sampling follows transformers' logits processors (repetition penalty, then temperature,
//! top_k, top_p, min_p) and is deterministic for a seed; stop strings cut and hold back text.

use qscript::generate::sampling::{apply_repetition_penalty, argmax, Sampler, SamplingParams, StopStrings};
use std::collections::BTreeSet;

fn params(temperature: f64) -> SamplingParams {
    SamplingParams { temperature, ..SamplingParams::greedy() }
}

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

/// Ids that survive the warpers.
fn kept(p: SamplingParams, logits: &[f32]) -> BTreeSet<u32> {
    let mut l = logits.to_vec();
    Sampler::new(p).warp(&mut l);
    l.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, _)| i as u32).collect()
}

/// Ids drawn over many seeds.
fn drawn(p: &SamplingParams, logits: &[f32], seeds: u64) -> BTreeSet<u32> {
    (0..seeds)
        .map(|seed| Sampler::new(SamplingParams { seed, ..p.clone() }).sample(&mut logits.to_vec(), &[]).unwrap())
        .collect()
}

fn set(ids: &[u32]) -> BTreeSet<u32> {
    ids.iter().copied().collect()
}

#[test]
fn greedy_is_argmax_first_on_ties() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]).unwrap(), 1);
    assert_eq!(s.sample(&mut [1.0, 7.0, 7.0, 7.0], &[]).unwrap(), 1);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    assert_eq!(argmax(&[-5.0, f32::INFINITY, f32::INFINITY]), 1);
}

#[test]
fn repetition_penalty_math() {
    let mut l = vec![2.0f32, -2.0, 0.5, 1.0];
    // Repeated ids are penalised once: positive / p, negative * p, unseen untouched.
    apply_repetition_penalty(&mut l, &mut vec![0, 1, 1, 0, 0], 2.0).unwrap();
    assert_eq!(l, vec![1.0, -4.0, 0.5, 1.0]);
    // A penalty below 1 rewards repeats instead.
    let mut l = vec![2.0f32, -2.0];
    apply_repetition_penalty(&mut l, &mut vec![0, 1], 0.5).unwrap();
    assert_eq!(l, vec![4.0, -1.0]);
    assert!(apply_repetition_penalty(&mut [0.0], &mut vec![3], 1.2).is_err());

    // Through the sampler: the penalty runs before greedy selection.
    let mut s = Sampler::new(SamplingParams { repetition_penalty: Some(2.0), ..SamplingParams::greedy() });
    let mut l = vec![3.0f32, 2.0];
    assert_eq!(s.sample(&mut l, &[0, 0]).unwrap(), 1);
    assert_eq!(l, vec![1.5, 2.0]);
}

#[test]
fn top_k_keeps_k_highest_and_ties() {
    let l = [1.0f32, 5.0, 3.0, 4.0, 2.0];
    let p = SamplingParams { top_k: Some(2), ..params(1.0) };
    assert_eq!(kept(p.clone(), &l), set(&[1, 3]));
    assert_eq!(drawn(&p, &l, 300), set(&[1, 3]));
    // Ties with the k-th value stay (HF removes only scores < k-th).
    let p = SamplingParams { top_k: Some(2), ..params(1.0) };
    assert_eq!(kept(p, &[5.0, 4.0, 4.0, 1.0]), set(&[0, 1, 2]));
    // k = 0 disables, k >= vocab keeps everything.
    assert_eq!(kept(SamplingParams { top_k: Some(0), ..params(1.0) }, &l).len(), 5);
    assert_eq!(kept(SamplingParams { top_k: Some(9), ..params(1.0) }, &l).len(), 5);
}

#[test]
fn top_p_removes_low_cumulative_mass() {
    let l = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let tp = |p: f64| SamplingParams { top_p: Some(p), ..params(1.0) };
    // Ascending cumulative mass: 0.05, 0.20, 0.50, 1.0; removed while <= 1 - top_p.
    assert_eq!(kept(tp(0.9), &l), set(&[0, 1, 2]));
    assert_eq!(kept(tp(0.75), &l), set(&[0, 1]));
    assert_eq!(kept(tp(0.01), &l), set(&[0]));
    assert_eq!(kept(tp(0.0), &l), set(&[0]));
    assert_eq!(kept(tp(1.0), &l), set(&[0, 1, 2, 3]));
    assert_eq!(drawn(&tp(0.75), &l, 300), set(&[0, 1]));
}

#[test]
fn min_p_keeps_relative_probability() {
    let l = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let mp = |p: f64| SamplingParams { min_p: Some(p), ..params(1.0) };
    assert_eq!(kept(mp(0.25), &l), set(&[0, 1, 2])); // >= 0.125
    assert_eq!(kept(mp(0.5), &l), set(&[0, 1])); // >= 0.25
    assert_eq!(kept(mp(1.0), &l), set(&[0]));
    assert_eq!(kept(mp(0.0), &l), set(&[0, 1, 2, 3]));
    assert_eq!(drawn(&mp(0.5), &l, 300), set(&[0, 1]));
}

#[test]
fn warpers_apply_in_transformers_order() {
    let l = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    // top_k=2 first renormalises to 0.625 / 0.375, so top_p=0.6 then keeps only the top token
    // (on the full distribution it would keep two).
    let p = SamplingParams { top_k: Some(2), top_p: Some(0.6), ..params(1.0) };
    assert_eq!(kept(p, &l), set(&[0]));
    // Temperature comes first: T=4 flattens the ratios to max to 1, .88, .74, .56, so
    // min_p=0.7 keeps three tokens; at T=1 (ratios 1, .6, .3, .1) only the top one.
    assert_eq!(kept(SamplingParams { min_p: Some(0.7), ..params(4.0) }, &l), set(&[0, 1, 2]));
    assert_eq!(kept(SamplingParams { min_p: Some(0.7), ..params(1.0) }, &l), set(&[0]));
    // Kept logits carry the temperature scaling.
    let mut x = vec![2.0f32, 4.0];
    Sampler::new(params(2.0)).warp(&mut x);
    assert_eq!(x, vec![1.0, 2.0]);
}

#[test]
fn same_seed_same_sequence() {
    let l = logits_of(&[0.2, 0.2, 0.2, 0.2, 0.2]);
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams { seed, ..params(1.0) });
        (0..64).map(|_| s.sample(&mut l.clone(), &[]).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    assert!(run(42).iter().collect::<BTreeSet<_>>().len() > 1);
}

#[test]
fn temperature_distribution() {
    // T -> 0 is argmax.
    let l = [1.0f32, 1.1, 0.9, -3.0];
    assert_eq!(drawn(&params(1e-3), &l, 200), set(&[1]));
    // T = 1 follows the softmax.
    let probs = [0.5, 0.3, 0.15, 0.05];
    let l = logits_of(&probs);
    let mut s = Sampler::new(SamplingParams { seed: 7, ..params(1.0) });
    let n = 20_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[s.sample(&mut l.clone(), &[]).unwrap() as usize] += 1;
    }
    for (c, p) in counts.iter().zip(probs) {
        assert!((*c as f64 / n as f64 - p).abs() < 0.02, "{counts:?}");
    }
    // A high temperature flattens: the rare token shows up far more often.
    let mut s = Sampler::new(SamplingParams { seed: 7, ..params(10.0) });
    let rare = (0..n).filter(|_| s.sample(&mut l.clone(), &[]).unwrap() == 3).count();
    assert!(rare as f64 / n as f64 > 0.15, "{rare}");
}

#[test]
fn bad_input_is_an_error() {
    let mut s = Sampler::new(params(1.0));
    let err = s.sample(&mut [0.0, f32::NAN], &[]).unwrap_err().to_string();
    assert!(err.contains("NaN"), "{err}");
    assert!(Sampler::new(SamplingParams::greedy()).sample(&mut [f32::NAN], &[]).is_err());
    assert!(Sampler::new(params(-1.0)).sample(&mut [0.0], &[]).is_err());
    assert!(Sampler::new(SamplingParams { top_p: Some(1.5), ..params(1.0) }).sample(&mut [0.0], &[]).is_err());
    assert!(Sampler::new(params(1.0)).sample(&mut [f32::NEG_INFINITY], &[]).is_err());
}

#[test]
fn fast_enough_for_a_real_vocab() {
    let vocab = 49_152;
    let logits: Vec<f32> = (0..vocab).map(|i| (i as f32 * 0.618).sin() * 8.0).collect();
    let prev: Vec<u32> = (0..512).map(|i| (i * 97) % vocab as u32).collect();
    let time = |p: SamplingParams| {
        let mut s = Sampler::new(p);
        let mut row = logits.clone();
        let t = std::time::Instant::now();
        let n = 50;
        for _ in 0..n {
            row.copy_from_slice(&logits);
            s.sample(&mut row, &prev).unwrap();
        }
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    };
    let greedy = time(SamplingParams { repetition_penalty: Some(1.1), ..SamplingParams::greedy() });
    let topk_topp = time(SamplingParams { top_k: Some(50), top_p: Some(0.9), repetition_penalty: Some(1.1), ..params(0.7) });
    let topp = time(SamplingParams { top_p: Some(0.9), min_p: Some(0.05), ..params(0.7) });
    eprintln!("ms/token: greedy {greedy:.3}, top_k+top_p {topk_topp:.3}, top_p+min_p over full vocab {topp:.3}");
    // Loose bounds: the machine is shared with builds.
    assert!(greedy < 5.0 && topk_topp < 20.0 && topp < 40.0);
}

#[test]
fn stop_in_the_middle_of_a_piece() {
    let mut s = StopStrings::new(&["<|end|>"]);
    assert_eq!(s.push("Hello"), ("Hello".to_string(), false));
    assert_eq!(s.push(" world<|end|> trailing"), (" world".to_string(), true));
    assert!(s.stopped());
    assert_eq!(s.text(), "Hello world");
    assert_eq!(s.push("more"), (String::new(), true));
    assert_eq!(s.finish(), "");
}

#[test]
fn stop_split_across_pieces() {
    let mut s = StopStrings::new(&["STOP", "###"]);
    assert_eq!(s.push("abc ST"), ("abc ".to_string(), false));
    assert_eq!(s.push("O"), (String::new(), false));
    assert_eq!(s.push("P and on"), (String::new(), true));
    assert_eq!(s.text(), "abc ");
    // The earliest stop string wins, even if another completes in the same piece.
    let mut s = StopStrings::new(&["STOP", "###"]);
    assert_eq!(s.push("x #"), ("x ".to_string(), false));
    assert_eq!(s.push("## STOP"), (String::new(), true));
    assert_eq!(s.text(), "x ");
}

#[test]
fn hold_back_is_released_when_it_stops_matching() {
    let mut s = StopStrings::new(&["\nUser:"]);
    assert_eq!(s.push("Sure.\nUs"), ("Sure.".to_string(), false));
    assert_eq!(s.push("ually yes"), ("\nUsually yes".to_string(), false));
    assert_eq!(s.push("\n"), (String::new(), false));
    // Generation ended (eos / length): the held-back text is released.
    assert_eq!(s.finish(), "\n");
    assert_eq!(s.text(), "Sure.\nUsually yes\n");
    // Multi-byte characters and no stop strings at all.
    let mut s = StopStrings::new(&["ß!"]);
    assert_eq!(s.push("groß"), ("gro".to_string(), false));
    assert_eq!(s.push("e"), ("ße".to_string(), false));
    let mut s = StopStrings::new::<String>(&[]);
    assert_eq!(s.push("anything"), ("anything".to_string(), false));
}
