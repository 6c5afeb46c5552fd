//! Next-token selection: greedy, or sampling with temperature / top-k / top-p / min-p and a
//! repetition penalty, in the order transformers applies its logits processors.

use anyhow::{bail, ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or `do_sample: false`) means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding, no penalty.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, min_p: None, repetition_penalty: None, seed: 0 }
    }

    /// The ranges transformers enforces.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.temperature >= 0.0 && self.temperature.is_finite(), "temperature must be >= 0 (0 = greedy), got {}", self.temperature);
        if let Some(p) = self.top_p {
            ensure!((0.0..=1.0).contains(&p), "top_p must be in [0, 1], got {p}");
        }
        if let Some(p) = self.min_p {
            ensure!((0.0..=1.0).contains(&p), "min_p must be in [0, 1], got {p}");
        }
        if let Some(p) = self.repetition_penalty {
            ensure!(p > 0.0 && p.is_finite(), "repetition_penalty must be > 0, got {p}");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: StdRng,
    /// Surviving (logit, token id) pairs; reused across calls so a step allocates nothing.
    cand: Vec<(f32, u32)>,
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng, cand: Vec::new(), seen: Vec::new() }
    }

    /// Pick the next token from `logits` (f32, one row of vocab size) given the tokens so far
    /// (prompt + generated, for the repetition penalty).
    pub fn sample(&mut self, logits: &mut [f32], previous: &[u32]) -> Result<u32> {
        self.params.validate()?;
        ensure!(!logits.is_empty(), "sample: empty logits");
        if logits.iter().any(|x| x.is_nan()) {
            bail!("sample: logits contain NaN");
        }
        if let Some(p) = self.params.repetition_penalty.filter(|&p| p != 1.0) {
            self.seen.clear();
            self.seen.extend_from_slice(previous);
            apply_repetition_penalty(logits, &mut self.seen, p as f32)?;
        }
        if self.params.is_greedy() {
            return Ok(argmax(logits));
        }
        self.filter(logits);
        self.draw()
    }

    /// Temperature, top-k, top-p, min-p (no penalty) in place: removed tokens become -inf,
    /// kept ones hold their temperature-scaled logit. Exposed to test the filtering.
    pub fn warp(&mut self, logits: &mut [f32]) {
        self.filter(logits);
        logits.fill(f32::NEG_INFINITY);
        for &(l, id) in &self.cand {
            logits[id as usize] = l;
        }
    }

    /// Fills `self.cand` with the tokens the warpers keep (transformers' order: temperature,
    /// top_k, top_p, min_p), each with its scaled logit.
    fn filter(&mut self, logits: &[f32]) {
        let p = &self.params;
        let cand = &mut self.cand;
        cand.clear();
        // -inf tokens have zero probability under every warper: drop them up front.
        let t = if p.temperature > 0.0 && p.temperature != 1.0 { p.temperature as f32 } else { 1.0 };
        cand.extend(logits.iter().enumerate().filter(|(_, l)| **l > f32::NEG_INFINITY).map(|(i, &l)| (l / t, i as u32)));
        if cand.is_empty() {
            return;
        }
        // TopKLogitsWarper: remove scores < the k-th highest (ties with it stay).
        if let Some(k) = p.top_k.filter(|&k| k > 0 && k < cand.len()) {
            let (_, kth, _) = cand.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let kth = kth.0;
            cand.retain(|c| c.0 >= kth);
        }
        // TopPLogitsWarper: sort ascending, drop the prefix whose cumulative probability is
        // <= 1 - top_p; the most likely token always stays.
        if let Some(top_p) = p.top_p.filter(|&x| x < 1.0) {
            let max = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = cand.iter().map(|c| ((c.0 - max) as f64).exp()).sum();
            // Tokens with prob <= (1 - top_p) / n are removed whatever the rest looks like (all
            // of them together hold <= 1 - top_p), so drop them before the sort and start the
            // cumulative sum at their mass. The top token always survives this.
            let thr = (1.0 - top_p) / cand.len() as f64;
            let mut cum = 0.0;
            cand.retain(|c| {
                let q = ((c.0 - max) as f64).exp() / total;
                if q <= thr {
                    cum += q;
                }
                q > thr
            });
            // Ties in id order, as a stable ascending torch.sort leaves them.
            cand.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut cut = 0;
            while cut + 1 < cand.len() {
                cum += ((cand[cut].0 - max) as f64).exp() / total;
                if cum > 1.0 - top_p {
                    break;
                }
                cut += 1;
            }
            cand.drain(..cut);
        }
        // MinPLogitsWarper: keep tokens with prob >= min_p * max_prob, i.e.
        // exp(l - l_max) >= min_p; the top token always stays.
        if let Some(min_p) = p.min_p {
            let max = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
            cand.retain(|c| c.0 == max || ((c.0 - max) as f64).exp() >= min_p);
        }
    }

    /// Draw from the softmax over the candidates.
    fn draw(&mut self) -> Result<u32> {
        let cand = &self.cand;
        ensure!(!cand.is_empty(), "sample: every logit is -inf");
        let max = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::INFINITY {
            // Limit of the softmax: all mass on the +inf token(s); take the first.
            return Ok(cand.iter().filter(|c| c.0 == max).map(|c| c.1).min().unwrap());
        }
        let total: f64 = cand.iter().map(|c| ((c.0 - max) as f64).exp()).sum();
        let target = self.rng.random::<f64>() * total;
        let mut acc = 0.0;
        for c in cand {
            acc += ((c.0 - max) as f64).exp();
            if acc > target {
                return Ok(c.1);
            }
        }
        Ok(cand[cand.len() - 1].1)
    }
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// HF `RepetitionPenaltyLogitsProcessor`: every distinct id in `previous` gets
/// `score * penalty` if negative, else `score / penalty`. `previous` is sorted and deduplicated
/// in place (it is scratch).
pub fn apply_repetition_penalty(logits: &mut [f32], previous: &mut Vec<u32>, penalty: f32) -> Result<()> {
    previous.sort_unstable();
    previous.dedup();
    for &id in previous.iter() {
        let Some(s) = logits.get_mut(id as usize) else {
            bail!("repetition penalty: token id {id} is outside the vocabulary ({})", logits.len());
        };
        *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
    }
    Ok(())
}

/// Stop strings for streaming: feed decoded pieces in; get back the text that is safe to show
/// now. Text that could be the start of a stop string is held back until it is decided; when a
/// stop string appears, the text is cut just before it.
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Where the first stop string starts, once found.
    cut: Option<usize>,
}

impl StopStrings {
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        let stops = stops.iter().map(|s| s.as_ref().to_string()).filter(|s| !s.is_empty()).collect();
        Self { stops, text: String::new(), emitted: 0, cut: None }
    }

    /// Append a piece; returns (text newly safe to stream, whether a stop string was hit).
    /// After a hit, further pieces are ignored.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.cut.is_some() {
            return (String::new(), true);
        }
        let old = self.text.len();
        self.text.push_str(piece);
        // A new match must end inside the new piece, so it starts at most (len - 1) bytes back.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = old.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.cut = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        let safe = match self.cut {
            Some(c) => c,
            None => self.text.len() - self.held_back(),
        };
        let out = self.take_until(safe);
        (out, self.cut.is_some())
    }

    /// Generation ended without a stop string: release what was held back.
    pub fn finish(&mut self) -> String {
        let end = self.cut.unwrap_or(self.text.len());
        self.take_until(end)
    }

    /// All text so far (cut before the stop string, if one was hit).
    pub fn text(&self) -> &str {
        &self.text[..self.cut.unwrap_or(self.text.len())]
    }

    pub fn stopped(&self) -> bool {
        self.cut.is_some()
    }

    /// Longest suffix of the text that is a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        hold
    }

    fn take_until(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}
