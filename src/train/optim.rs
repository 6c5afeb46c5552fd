//! AdamW with PyTorch's semantics (decoupled weight decay applied first, bias correction, eps
//! added outside the square root) over the LoRA adapters, with f32 master copies and moments,
//! and global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use crate::model::engine::LoraGrad;
use crate::model::llama::Llama;
use crate::model::names::{LoraHalf, ModuleId, ParamId, Proj};
use rayon::prelude::*;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' TrainingArguments defaults.
    fn default() -> Self {
        Self { lr: 5e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable tensor: where it lives in the model, its f32 master value and moments.
#[derive(Debug, Clone)]
pub struct ParamState {
    pub layer: usize,
    pub proj: Proj,
    /// false = LoRA A, true = LoRA B.
    pub is_b: bool,
    pub shape: (usize, usize),
    pub master: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl ParamState {
    /// Fresh state (zero moments) for the tensor `id` holding `master`.
    pub fn new(id: ParamId, shape: (usize, usize), master: Vec<f32>) -> Self {
        let n = master.len();
        Self { layer: id.module.layer, proj: id.module.proj, is_b: id.half == LoraHalf::B, shape, master, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n] }
    }

    /// The adapter this tensor belongs to.
    pub fn module(&self) -> ModuleId {
        ModuleId { layer: self.layer, proj: self.proj }
    }

    pub fn id(&self) -> ParamId {
        ParamId { module: self.module(), half: if self.is_b { LoraHalf::B } else { LoraHalf::A } }
    }
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    /// The host copy of the state: the source of truth for checkpoints. While the update runs
    /// on the device ([`AdamW::uses_device_state`]) it lags behind until [`AdamW::sync_to_host`].
    pub params: Vec<ParamState>,
    /// Test hook: run the flat-tensor update (used automatically when the adapters are on a
    /// non-CPU device) even on the CPU.
    pub force_tensor_path: bool,
    /// The state as flat f32 tensors on the adapters' device (`params` order), when the update
    /// runs there; `None` until the first such step, and after the host copy was replaced.
    dev: Option<DeviceState>,
}

/// The optimizer state concatenated in `params` order, on the adapters' device.
#[derive(Debug, Clone)]
struct DeviceState {
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The device state has steps the host `params` do not have yet.
    host_stale: bool,
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl AdamW {
    /// Track every adapter of `model`, in [`Llama::adapters`] order, A then B.
    pub fn new(model: &Llama, cfg: AdamWConfig) -> Result<Self> {
        let mut params = Vec::new();
        for (module, l) in model.adapters() {
            for half in LoraHalf::BOTH {
                let t = half.tensor(l);
                params.push(ParamState::new(ParamId { module, half }, t.dims2()?, to_f32(t)?));
            }
        }
        if params.is_empty() {
            bail!("the model has no LoRA adapters to train (call get_peft_model first)");
        }
        Ok(Self { cfg, step: 0, params, force_tensor_path: false, dev: None })
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.master.len()).sum()
    }

    /// One update with learning rate `lr` from `grads` (one entry per adapter), written back
    /// into the model's adapters in their compute dtype. On the CPU the update runs over the
    /// host `params`; with the adapters on another device it runs there on flat tensors, with
    /// no host round trip (see [`AdamW::sync_to_host`]).
    pub fn step(&mut self, model: &mut Llama, grads: &[LoraGrad], lr: f64) -> Result<()> {
        let dev = self.adapter_device(model);
        if !dev.is_cpu() || self.force_tensor_path {
            return self.step_tensor(model, grads, lr, &dev);
        }
        // Host path: bring back (and drop) device state if an earlier step ran there.
        self.sync_to_host()?;
        self.dev = None;
        self.step_host(model, grads, lr)
    }

    /// The gradients of all params, flattened to f32 and concatenated in `params` order (on the
    /// gradients' device).
    fn flat_grads(&self, grads: &[LoraGrad]) -> Result<Tensor> {
        let mut flat = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let g = grads
                .iter()
                .find(|g| g.id() == p.module())
                .ok_or_else(|| anyhow::anyhow!("no gradient for layer {} {:?}", p.layer, p.proj))?;
            let g = if p.is_b { &g.db } else { &g.da };
            anyhow::ensure!(g.elem_count() == p.master.len(), "gradient size mismatch for layer {} {:?}", p.layer, p.proj);
            flat.push(g.to_dtype(DType::F32)?.flatten_all()?);
        }
        Ok(Tensor::cat(&flat, 0)?)
    }

    fn step_host(&mut self, model: &mut Llama, grads: &[LoraGrad], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.coeffs(lr, self.step);
        // All gradients in one host copy and all updated weights in one upload.
        let all = self.flat_grads(grads)?.to_vec1::<f32>()?;
        let mut offsets = Vec::with_capacity(self.params.len());
        let mut at = 0;
        for p in &self.params {
            offsets.push(at);
            at += p.master.len();
        }
        self.params.par_iter_mut().zip(offsets.par_iter()).for_each(|(p, &off)| {
            let g = &all[off..off + p.master.len()];
            crate::kernels::adamw::cpu::update(&mut p.master, &mut p.exp_avg, &mut p.exp_avg_sq, g, &c);
        });
        let dev = self.adapter_device(model);
        let all: Vec<f32> = self.params.iter().flat_map(|p| p.master.iter().copied()).collect();
        let all = Tensor::from_vec(all, self.num_parameters(), &dev)?;
        self.write_flat(model, &all)
    }

    /// The same update as [`AdamW::step_host`] over the flat device state (the same f32
    /// operations in the same order): on CUDA one fused kernel, elsewhere candle tensor ops.
    fn step_tensor(&mut self, model: &mut Llama, grads: &[LoraGrad], lr: f64, dev: &Device) -> Result<()> {
        if self.dev.as_ref().is_some_and(|d| !d.master.device().same_device(dev)) {
            self.sync_to_host()?;
            self.dev = None;
        }
        if self.dev.is_none() {
            self.dev = Some(self.upload_state(dev)?);
        }
        let state = self.dev.as_ref().expect("device state was just created");
        let g = self.flat_grads(grads)?.to_device(dev)?;
        let n = self.num_parameters();
        anyhow::ensure!(g.elem_count() == n && state.master.elem_count() == n, "optimizer state size mismatch");
        let step = self.step + 1;
        let (w, m, v) = crate::kernels::adamw::step(&state.master, &state.exp_avg, &state.exp_avg_sq, &g, &self.coeffs(lr, step))?;
        self.write_flat(model, &w)?;
        self.step = step;
        self.dev = Some(DeviceState { master: w, exp_avg: m, exp_avg_sq: v, host_stale: true });
        Ok(())
    }

    /// The update's constants for (1-based) step `step` at learning rate `lr`.
    fn coeffs(&self, lr: f64, step: u64) -> crate::kernels::adamw::Coeffs {
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.cfg;
        crate::kernels::adamw::Coeffs::new(lr, beta1, beta2, eps, weight_decay, step)
    }

    fn upload_state(&self, dev: &Device) -> Result<DeviceState> {
        let n = self.num_parameters();
        let flat = |f: fn(&ParamState) -> &Vec<f32>| -> Result<Tensor> {
            let all: Vec<f32> = self.params.iter().flat_map(|p| f(p).iter().copied()).collect();
            Ok(Tensor::from_vec(all, n, dev)?)
        };
        Ok(DeviceState {
            master: flat(|p| &p.master)?,
            exp_avg: flat(|p| &p.exp_avg)?,
            exp_avg_sq: flat(|p| &p.exp_avg_sq)?,
            host_stale: false,
        })
    }

    /// Whether the update runs on flat device tensors (so `params` may lag behind).
    pub fn uses_device_state(&self) -> bool {
        self.dev.is_some()
    }

    /// Whether `params` lacks steps that the device state has (call [`AdamW::sync_to_host`]).
    pub fn host_stale(&self) -> bool {
        self.dev.as_ref().is_some_and(|d| d.host_stale)
    }

    /// Copy the device state (if any) into `params[*].master/exp_avg/exp_avg_sq`, e.g. before a
    /// checkpoint reads them. The device state stays valid.
    pub fn sync_to_host(&mut self) -> Result<()> {
        let Some(d) = self.dev.as_mut() else { return Ok(()) };
        if !d.host_stale {
            return Ok(());
        }
        let (w, m, v) = (d.master.to_vec1::<f32>()?, d.exp_avg.to_vec1::<f32>()?, d.exp_avg_sq.to_vec1::<f32>()?);
        anyhow::ensure!(w.len() == self.params.iter().map(|p| p.master.len()).sum::<usize>(), "optimizer state size mismatch");
        let mut at = 0;
        for p in &mut self.params {
            let len = p.master.len();
            p.master.copy_from_slice(&w[at..at + len]);
            p.exp_avg.copy_from_slice(&m[at..at + len]);
            p.exp_avg_sq.copy_from_slice(&v[at..at + len]);
            at += len;
        }
        d.host_stale = false;
        Ok(())
    }

    /// Drop the device state, so that the next step rebuilds it from `params` (after `params`
    /// was replaced, e.g. restored from a checkpoint). Unsynced device steps are lost.
    pub fn reset_device_state(&mut self) {
        self.dev = None;
    }

    fn adapter_device(&self, model: &Llama) -> Device {
        self.params
            .first()
            .and_then(|p| model.linear(p.module())?.lora.as_ref())
            .map_or(Device::Cpu, |l| l.a.device().clone())
    }
}

impl AdamW {
    /// Write the host master weights into the model's adapters (after restoring a checkpoint);
    /// any device state is dropped, to be rebuilt from `params` at the next step.
    pub fn write_back(&mut self, model: &mut Llama) -> Result<()> {
        self.dev = None;
        let dev = self.adapter_device(model);
        let all: Vec<f32> = self.params.iter().flat_map(|p| p.master.iter().copied()).collect();
        let all = Tensor::from_vec(all, self.num_parameters(), &dev)?;
        self.write_flat(model, &all)
    }

    /// Set each adapter to its view of the flat f32 `all` (in `params` order), in its dtype:
    /// one cast of the whole vector per dtype, then views (not one cast per adapter).
    fn write_flat(&self, model: &mut Llama, all: &Tensor) -> Result<()> {
        let mut cast: Vec<Tensor> = Vec::new();
        let mut at = 0;
        for p in &self.params {
            let lin = model.linear_mut(p.module()).ok_or_else(|| anyhow::anyhow!("no layer {}", p.layer))?;
            let lora = lin.lora.as_mut().ok_or_else(|| anyhow::anyhow!("layer {} {:?} has no adapter", p.layer, p.proj))?;
            let target = p.id().half.tensor_mut(lora);
            let src = match cast.iter().find(|c| c.dtype() == target.dtype()) {
                Some(c) => c.clone(),
                None => {
                    cast.push(all.to_dtype(target.dtype())?);
                    cast[cast.len() - 1].clone()
                }
            };
            *target = src.narrow(0, at, p.master.len())?.reshape(p.shape)?;
            at += p.master.len();
        }
        Ok(())
    }
}

/// Global L2 norm of all gradients.
pub fn grad_norm(grads: &[LoraGrad]) -> Result<f64> {
    if let Some(n) = host_f32_norm(grads) {
        return Ok(n);
    }
    Ok(match flat(grads)? {
        Some(all) => norm_of(&all)?,
        None => 0.0,
    })
}

/// f32 on the CPU: summed in f64 straight from the buffers (no f64 copies of every tensor).
fn host_f32_norm(grads: &[LoraGrad]) -> Option<f64> {
    let views: Vec<_> = grads.iter().flat_map(|g| [&g.da, &g.db]).map(crate::kernels::f32_view).collect::<Option<_>>()?;
    let sq: f64 = views.par_iter().map(|v| v.slice().iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum();
    Some(sq.sqrt())
}

/// Elsewhere (a GPU) the gradients go into one vector on their device (in their dtype, f32 if
/// they differ), so the norm and the clipping are a few kernels, not a few per gradient (784
/// gradients on the 3B shape).
fn flat(grads: &[LoraGrad]) -> Result<Option<Tensor>> {
    let all: Vec<&Tensor> = grads.iter().flat_map(|g| [&g.da, &g.db]).collect();
    let Some(first) = all.first() else { return Ok(None) };
    let dtype = if all.iter().all(|t| t.dtype() == first.dtype()) { first.dtype() } else { DType::F32 };
    let parts = all.iter().map(|t| Ok(t.to_dtype(dtype)?.flatten_all()?)).collect::<Result<Vec<_>>>()?;
    Ok(Some(Tensor::cat(&parts, 0)?))
}

/// L2 norm of a flat vector, squares summed in f64 (as on the host); one scalar comes back.
fn norm_of(all: &Tensor) -> Result<f64> {
    Ok(all.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm`; returns the norm before. Off the
/// CPU the scaled gradients come back as views of one vector (see [`flat`]).
pub fn clip_grad_norm(grads: &mut [LoraGrad], max_norm: f64) -> Result<f64> {
    if let Some(norm) = host_f32_norm(grads) {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                g.da = (&g.da * coef)?;
                g.db = (&g.db * coef)?;
            }
        }
        return Ok(norm);
    }
    let Some(all) = flat(grads)? else { return Ok(0.0) };
    let norm = norm_of(&all)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let all = (all * coef)?;
        let mut at = 0;
        for g in grads.iter_mut() {
            for t in [&mut g.da, &mut g.db] {
                let (n, shape) = (t.elem_count(), t.shape().clone());
                *t = all.narrow(0, at, n)?.reshape(shape)?;
                at += n;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
    use crate::model::{LoadOptions, Model};
    use candle_core::Device;

    fn tiny_with_adapters() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
        let mut m = Model::load_hf_dir("tiny", &dir, &LoadOptions::default()).unwrap();
        let cfg = LoraConfig { r: 4, lora_alpha: 8.0, target_modules: TargetModules::AllLinear, init_lora_weights: InitLoraWeights::Random, ..Default::default() };
        lora::attach(&mut m.llama, &cfg, 0).unwrap();
        m
    }

    /// Deterministic gradients of varied sign and magnitude for step `t`.
    fn grads(opt: &AdamW, t: usize) -> Vec<LoraGrad> {
        let mut out: Vec<LoraGrad> = Vec::new();
        let mut k = 0u64;
        let mut gen = |s: (usize, usize)| {
            let v: Vec<f32> = (0..s.0 * s.1)
                .map(|i| {
                    k += 1;
                    let x = ((k * 2654435761 + (t as u64) * 40503 + i as u64 * 97) % 10007) as f32 / 10007.0 - 0.5;
                    x * 10f32.powi(((k + t as u64) % 5) as i32 - 3)
                })
                .collect();
            Tensor::from_vec(v, s, &Device::Cpu).unwrap()
        };
        for p in opt.params.iter().filter(|p| !p.is_b) {
            let b = opt.params.iter().find(|q| q.is_b && q.layer == p.layer && q.proj == p.proj).unwrap();
            out.push(LoraGrad { layer: p.layer, proj: p.proj, da: gen(p.shape), db: gen(b.shape) });
        }
        out
    }

    fn assert_close(host: &AdamW, dev: &AdamW) {
        let mut max_rel = 0f64;
        for (p, q) in host.params.iter().zip(&dev.params) {
            for (what, a, b) in [("master", &p.master, &q.master), ("exp_avg", &p.exp_avg, &q.exp_avg), ("exp_avg_sq", &p.exp_avg_sq, &q.exp_avg_sq)] {
                for (x, y) in a.iter().zip(b) {
                    let rel = (*x as f64 - *y as f64).abs() / (x.abs() as f64).max(1e-30);
                    max_rel = max_rel.max(rel);
                    assert!(rel <= 1e-6, "layer {} {:?} {what}: host {x} vs tensor path {y}", p.layer, p.proj);
                }
            }
        }
        eprintln!("tensor path vs host loop: max relative difference {max_rel:e}");
    }

    fn adapters(m: &Model, opt: &AdamW) -> Vec<Vec<f32>> {
        opt.params
            .iter()
            .map(|p| {
                let l = m.llama.linear(p.module()).unwrap().lora.as_ref().unwrap();
                let t = p.id().half.tensor(l);
                t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    }

    #[test]
    fn tensor_path_matches_host_loop() {
        let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
        let (mut mh, mut md) = (tiny_with_adapters(), tiny_with_adapters());
        let mut host = AdamW::new(&mh.llama, cfg.clone()).unwrap();
        let mut dev = AdamW::new(&md.llama, cfg.clone()).unwrap();
        dev.force_tensor_path = true;
        assert_eq!(host.num_parameters(), dev.num_parameters());
        for t in 0..5 {
            let lr = 1e-2 * (1.0 - t as f64 / 10.0);
            host.step(&mut mh.llama, &grads(&host, t), lr).unwrap();
            dev.step(&mut md.llama, &grads(&dev, t), lr).unwrap();
        }
        assert!(!host.uses_device_state());
        assert!(dev.uses_device_state() && dev.host_stale());
        assert_eq!(dev.step, 5);
        dev.sync_to_host().unwrap();
        assert!(!dev.host_stale());
        assert_close(&host, &dev);
        // The adapters are views of the master weights.
        for (a, p) in adapters(&md, &dev).iter().zip(&dev.params) {
            assert_eq!(a, &p.master);
        }

        // Save/restore round trip: a fresh optimizer from the synced host state (as resume
        // builds it) continues on the tensor path exactly like the host loop; so does the
        // original one after syncing.
        let mut restored = AdamW::new(&md.llama, cfg.clone()).unwrap();
        restored.force_tensor_path = true;
        restored.params = dev.params.clone();
        restored.step = dev.step;
        let mut mr = tiny_with_adapters();
        restored.write_back(&mut mr.llama).unwrap();
        assert!(!restored.uses_device_state());
        for t in 5..8 {
            host.step(&mut mh.llama, &grads(&host, t), 1e-2).unwrap();
            dev.step(&mut md.llama, &grads(&dev, t), 1e-2).unwrap();
            restored.step(&mut mr.llama, &grads(&restored, t), 1e-2).unwrap();
        }
        dev.sync_to_host().unwrap();
        restored.sync_to_host().unwrap();
        assert_close(&host, &dev);
        assert_close(&host, &restored);
        assert_eq!(adapters(&md, &dev), adapters(&mr, &restored));

        // Switching back to the host loop brings the device state home first.
        dev.force_tensor_path = false;
        dev.step(&mut md.llama, &grads(&dev, 8), 1e-2).unwrap();
        host.step(&mut mh.llama, &grads(&host, 8), 1e-2).unwrap();
        assert!(!dev.uses_device_state());
        assert_close(&host, &dev);
    }
}
