//! Verified export: the GGUF file just written is loaded back and run against the model in
//! memory on a few prompts. Float files must give the same logits up to the dtype's rounding;
//! quantized ones a mean KL divergence under the type's bound and the same top-1 token at
//! nearly every position; all must give the same greedy text except where the in-memory
//! model's lead over its runner-up is within the type's tie band. A failure is an error naming
//! the first diverging token.

use crate::model::gguf_write::Quantization;
use crate::model::{LoadOptions, Model};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::Path;

/// Greedy tokens generated per prompt.
pub const GREEDY_TOKENS: usize = 16;

/// What a file of one type may differ by. Measured (3 prompts, 16 greedy tokens each) on
/// SmolLM2-135M-Instruct (the default model; its weights come from a Q4_1 file, which makes
/// it touchy to requantize) and the golden peft tiny model, then given headroom (×3-20):
///
/// | type | max rel. logit error | mean KL (nats) | top-1 | measured: rel / KL / top-1 |
/// | f32 | 1e-5 | 1e-8 | 100% | 0 / 0 / 100% |
/// | f16 | 5e-3 | 5e-5 | 98% | 1.1e-3 / 2.9e-6 / 100% |
/// | bf16 | 3e-2 | 1e-3 | 95% | 7.3e-3 / 1.1e-4 / 100% |
/// | q8_0 | — | 1e-2 | 93% | 3.5e-2 / 2.2e-3 / 97.5% |
/// | q6_k | — | 4e-2 | 90% | 7.4e-2 / 1.2e-2 / 98.2% |
/// | q5_k_m | — | 0.3 | 75% | 2.7e-1 / 1.2e-1 / 84.7% |
/// | q4_k_m | — | 0.25 | 75% | 2.1e-1 / 7.6e-2 / 89.0% (tiny: 84.5%) |
///
/// A wrong q/k permutation, norm offset or tokenizer gives KL of several nats and top-1 near
/// 0: far outside every bound.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Max |Δlogit| / max |logit| over a prompt (float types only).
    pub rel_logit: Option<f32>,
    /// Mean KL(model ‖ file) over positions, nats.
    pub mean_kl: f64,
    /// Share of positions whose top-1 token agrees.
    pub top1: f64,
    /// A greedy divergence is a tie (accepted) when the model's lead is at most this, in logits.
    pub tie: f32,
}

pub fn bounds(q: Quantization) -> Bounds {
    let b = |rel: Option<f32>, kl: f64, top1: f64, tie: f32| Bounds { rel_logit: rel, mean_kl: kl, top1, tie };
    match q {
        Quantization::F32 => b(Some(1e-5), 1e-8, 1.0, 1e-3),
        Quantization::F16 => b(Some(5e-3), 5e-5, 0.98, 0.1),
        Quantization::BF16 => b(Some(3e-2), 1e-3, 0.95, 0.5),
        Quantization::Q8_0 => b(None, 1e-2, 0.93, 1.0),
        Quantization::Q6K => b(None, 4e-2, 0.90, 1.5),
        Quantization::Q5KM => b(None, 0.3, 0.75, 2.5),
        Quantization::Q4KM => b(None, 0.25, 0.75, 2.5),
    }
}

/// What the comparison measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub prompts: usize,
    /// Positions compared (teacher-forced on the model's greedy continuation).
    pub positions: usize,
    pub max_rel_logit: f32,
    pub mean_kl: f64,
    pub max_kl: f64,
    pub top1: f64,
    /// Greedy tokens that agreed, of those generated.
    pub greedy_agree: usize,
    pub greedy_total: usize,
    /// Prompts whose greedy texts part at a near-tie (accepted).
    pub greedy_ties: usize,
}

impl Report {
    pub fn describe(&self) -> String {
        format!(
            "{} prompts, {} positions: max |Δlogit|/max|logit| {:.2e}, KL mean {:.2e} max {:.2e} nats, top-1 {:.1}%, greedy {}/{} tokens identical{}",
            self.prompts, self.positions, self.max_rel_logit, self.mean_kl, self.max_kl, 100.0 * self.top1, self.greedy_agree, self.greedy_total,
            if self.greedy_ties > 0 { format!(" (parted at {} near-tie{})", self.greedy_ties, if self.greedy_ties == 1 { "" } else { "s" }) } else { String::new() }
        )
    }
}

/// One prompt: its ids, and its text when it has one (for messages).
pub struct Prompt {
    pub text: Option<String>,
    pub ids: Vec<u32>,
}

/// Load `file` and compare it with `model` on `prompts`.
pub fn verify(model: &Model, file: &Path, q: Quantization, prompts: &[Prompt]) -> Result<Report> {
    let loaded = Model::load_gguf(&file.display().to_string(), file, &LoadOptions::default())?;
    check_tokenizer(model, &loaded, prompts)?;
    let bounds = bounds(q);
    let mut r = Report { prompts: prompts.len(), ..Report::default() };
    let (mut kl_sum, mut agree) = (0.0, 0usize);
    for (i, p) in prompts.iter().enumerate() {
        let what = |pos: usize| match &p.text {
            Some(t) => format!("prompt {} ({:?}), position {pos}", i + 1, short(t)),
            None => format!("prompt {}, position {pos}", i + 1),
        };
        let ours = greedy(model, &p.ids)?;
        let theirs = greedy(&loaded, &p.ids)?;
        let full: Vec<u32> = p.ids.iter().chain(&ours).copied().collect();
        let a = model.forward_ids(&full)?;
        let b = loaded.forward_ids(&full)?;
        let scale = a.iter().flatten().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (pos, (ra, rb)) in a.iter().zip(&b).enumerate() {
            let d = ra.iter().zip(rb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            r.max_rel_logit = r.max_rel_logit.max(d / scale);
            let kl = kl(ra, rb);
            kl_sum += kl;
            r.max_kl = r.max_kl.max(kl);
            agree += usize::from(argmax(ra) == argmax(rb));
            r.positions += 1;
            if let Some(bound) = bounds.rel_logit.filter(|&b| d / scale > b) {
                bail!("{}: {} logits differ from the model's by {:.3e} (of max |logit| {scale:.3}), more than {} allows ({bound:.0e})", file.display(), what(pos), d, q.name());
            }
        }
        // The first greedy token where the file goes another way, unless it is a near-tie.
        let n = p.ids.len();
        let k = ours.iter().zip(&theirs).take_while(|(x, y)| x == y).count();
        r.greedy_total += ours.len();
        r.greedy_agree += k;
        if k < ours.len().min(theirs.len()) {
            let row = &a[n - 1 + k];
            let lead = row[ours[k] as usize] - row[theirs[k] as usize];
            if lead > bounds.tie {
                let tok = |id: u32| token_text(model, id);
                bail!(
                    "{}: greedy text diverges at {}, generated token {}: the model says {} (id {}), the file {} (id {}); the model's lead {lead:.3} logits is beyond {}'s tie band {}",
                    file.display(), what(n + k), k + 1, tok(ours[k]), ours[k], tok(theirs[k]), theirs[k], q.name(), bounds.tie
                );
            }
            r.greedy_ties += 1;
        }
    }
    r.mean_kl = kl_sum / r.positions.max(1) as f64;
    r.top1 = agree as f64 / r.positions.max(1) as f64;
    if r.mean_kl > bounds.mean_kl {
        bail!("{}: mean KL divergence {:.3e} nats over {} positions exceeds {}'s bound {:.0e}", file.display(), r.mean_kl, r.positions, q.name(), bounds.mean_kl);
    }
    if r.top1 < bounds.top1 {
        bail!("{}: top-1 tokens agree at {:.1}% of {} positions, below {}'s bound {:.0}%", file.display(), 100.0 * r.top1, r.positions, q.name(), 100.0 * bounds.top1);
    }
    Ok(r)
}

/// The reloaded tokenizer must give the same ids for the prompts' texts and keep the template.
fn check_tokenizer(model: &Model, loaded: &Model, prompts: &[Prompt]) -> Result<()> {
    let (Some(a), Some(b)) = (&model.tokenizer, &loaded.tokenizer) else {
        if model.tokenizer.is_some() {
            bail!("the file has no tokenizer, the model has one");
        }
        return Ok(());
    };
    if a.chat_template != b.chat_template {
        bail!("the file's chat template differs from the model's");
    }
    for p in prompts {
        let Some(text) = &p.text else { continue };
        let (x, y) = (a.encode(text, false)?, b.encode(text, false)?);
        if let Some(i) = (0..x.len().max(y.len())).find(|&i| x.get(i) != y.get(i)) {
            bail!("the file's tokenizer splits {:?} differently at token {}: {:?} vs {:?}", short(text), i + 1, x.get(i), y.get(i));
        }
    }
    Ok(())
}

fn short(t: &str) -> String {
    let s: String = t.chars().take(40).collect();
    if s.len() < t.len() { s + "…" } else { s }
}

fn token_text(model: &Model, id: u32) -> String {
    match model.tokenizer.as_ref().and_then(|t| t.decode(&[id], false).ok()) {
        Some(s) => format!("{s:?}"),
        None => format!("token {id}"),
    }
}

/// `GREEDY_TOKENS` greedy tokens after `ids` (KV cache; stops at none: eos ids are compared too).
fn greedy(model: &Model, ids: &[u32]) -> Result<Vec<u32>> {
    model.check_ids(ids)?;
    let llama = &model.llama;
    let room = model.config().max_position_embeddings.saturating_sub(ids.len());
    let mut cache = llama.new_cache();
    let mut input = Tensor::new(ids, &llama.device)?.unsqueeze(0)?;
    let mut out = Vec::new();
    for _ in 0..GREEDY_TOKENS.min(room) {
        crate::check_cancel()?;
        let row = llama.forward(&input, Some(&mut cache), true)?.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let next = argmax(&row) as u32;
        out.push(next);
        input = Tensor::new(&[next], &llama.device)?.unsqueeze(0)?;
    }
    Ok(out)
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bx), (i, &x)| if x > bx { (i, x) } else { (bi, bx) }).0
}

/// KL(softmax(a) ‖ softmax(b)) in nats, computed in f64.
fn kl(a: &[f32], b: &[f32]) -> f64 {
    let lse = |v: &[f32]| {
        let m = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (la, lb) = (lse(a), lse(b));
    a.iter().zip(b).map(|(&x, &y)| {
        let lp = x as f64 - la;
        lp.exp() * (lp - (y as f64 - lb))
    }).sum::<f64>().max(0.0)
}
