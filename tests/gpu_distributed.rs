//! Data-parallel training over NCCL on two GPUs of one machine (feature `cuda`): two ranks on
//! threads of this process (cuda:0 and cuda:1, met over the loopback, the gradient bucket summed by
//! NCCL) against one process on cuda:0 with the same global batch. Prints a skip line and passes
//! with fewer than two GPUs or without `libnccl.so.2` (`QSCRIPT_NCCL_LIBRARY` names another).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device};
use qscript::data::{load_dataset, LoadOptions as DataLoadOptions};
use qscript::model::lora::{self, LoraConfig, TargetModules};
use qscript::model::{LoadOptions, Model};
use qscript::train::args::Schedule;
use qscript::train::distributed::{tcp, Collective, ProcessGroup};
use qscript::train::{NoCallbacks, SftTrainer, TrainingArguments};
use std::path::Path;
use std::sync::Arc;

fn train(model: &Path, data: &Path, out: &Path, dev: Device, dtype: DType, per_device: usize, comm: Option<Arc<dyn Collective>>) -> (Vec<f32>, Vec<f64>) {
    let mut m = Model::load_hf_dir("tiny", model, &LoadOptions { dtype, device: dev, ..Default::default() }).unwrap();
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, target_modules: TargetModules::AllLinear, init_lora_weights: lora::InitLoraWeights::Random, ..Default::default() };
    lora::attach(&mut m.llama, &cfg, 0).unwrap();
    m.lora_config = Some(cfg);
    let (ds, _) = load_dataset(data.to_str().unwrap(), &DataLoadOptions::default()).unwrap();
    let mut a = TrainingArguments::new(out);
    a.per_device_train_batch_size = per_device;
    a.max_steps = Some(6);
    a.learning_rate = 1e-3;
    a.lr_scheduler_type = Schedule::Constant;
    a.logging_steps = 1;
    a.save_strategy = qscript::train::args::Strategy::No;
    let mut t = SftTrainer::new(&m, &ds, None, a, None, Box::new(|_, _| Ok(()))).unwrap();
    if let Some(c) = comm {
        t.comm = c;
    }
    t.train(&mut m, &mut NoCallbacks).unwrap();
    let mut w = Vec::new();
    for (_, lo) in m.llama.adapters() {
        w.extend(lo.a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        w.extend(lo.b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let losses = if out.join("metrics.jsonl").is_file() { common::metrics(out).iter().filter_map(|e| e["loss"].as_f64()).collect() } else { vec![] };
    (w, losses)
}

#[test]
fn two_gpus_over_nccl_equal_one_gpu_with_the_same_global_batch() {
    let (Ok(_), Ok(_)) = (qscript::device::open_cuda(0), qscript::device::open_cuda(1)) else {
        eprintln!("two_gpus_over_nccl: skipped (fewer than two CUDA devices)");
        return;
    };
    let nccl = std::env::var("QSCRIPT_NCCL_LIBRARY").unwrap_or_else(|_| "libnccl.so.2".into());
    if unsafe { libloading::Library::new(&nccl) }.is_err() {
        eprintln!("two_gpus_over_nccl: skipped ({nccl} cannot be loaded)");
        return;
    }
    std::env::set_var("NCCL_NVLS_ENABLE", "0");
    let (tmp, model, data) = common::chat_fixture();
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2e-2)] {
        let one = tmp.path().join(format!("one-{dtype:?}"));
        let (want, want_loss) = train(&model, &data, &one, qscript::device::open_cuda(0).unwrap(), dtype, 4, None);
        let (m2, d2, two) = (model.clone(), data.clone(), tmp.path().join(format!("two-{dtype:?}")));
        let ranks = tcp::run_threads(2, move |r, g| {
            let dev = qscript::device::open_cuda(r)?;
            let out = if r == 0 { two.clone() } else { two.with_extension("rank1") };
            Ok(train(&m2, &d2, &out, dev, dtype, 2, Some(Arc::new(ProcessGroup::new(g)) as Arc<dyn Collective>)))
        })
        .unwrap();
        assert!(ranks[0].0 == ranks[1].0, "{dtype:?}: the ranks' adapters differ");
        let d = ranks[0].0.iter().zip(&want).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max);
        let dl = ranks[0].1.iter().zip(&want_loss).map(|(x, y)| (x - y).abs() / y.abs()).fold(0f64, f64::max);
        eprintln!("{dtype:?}: 2 GPUs vs 1 GPU: adapters max difference {d:e}, losses max relative difference {dl:e}");
        assert_eq!(ranks[0].1.len(), want_loss.len());
        assert!(d < tol && dl < tol as f64, "{dtype:?}: {d} / {dl}");
    }
}
