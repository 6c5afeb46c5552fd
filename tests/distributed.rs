//! Data-parallel training on the CPU: ranks on threads of this process, met over the loopback
//! (the same rendezvous and reductions as processes), against one process with the same global
//! batch; the sharding of batches; resume on another number of ranks.

mod common;

use qscript::data::{load_dataset, BatchIterator, BatchOptions, LoadOptions as DataLoadOptions};
use qscript::model::lora::{self, LoraConfig, TargetModules};
use qscript::model::{LoadOptions, Model};
use qscript::train::args::{Resume, Schedule, Strategy};
use qscript::train::distributed::{tcp, Collective};
use qscript::train::{NoCallbacks, SftTrainer, TrainSummary, TrainingArguments};
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct Setup {
    model: PathBuf,
    data: PathBuf,
    per_device: usize,
    accum: usize,
    max_steps: usize,
    resume: bool,
}

/// Adapters after training (every A and B, flattened, in walk order) and the summary.
fn train(s: &Setup, out: &Path, comm: Option<Arc<dyn Collective>>) -> (Vec<f32>, TrainSummary) {
    let mut m = Model::load_hf_dir("tiny", &s.model, &LoadOptions::default()).unwrap();
    // Random B: every adapter has a gradient at step 1. No dropout: its draws are per rank.
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.0, target_modules: TargetModules::AllLinear, init_lora_weights: lora::InitLoraWeights::Random, ..Default::default() };
    lora::attach(&mut m.llama, &cfg, 0).unwrap();
    m.lora_config = Some(cfg);
    let (ds, _) = load_dataset(s.data.to_str().unwrap(), &DataLoadOptions::default()).unwrap();
    let mut a = TrainingArguments::new(out);
    a.per_device_train_batch_size = s.per_device;
    a.per_device_eval_batch_size = 3;
    a.gradient_accumulation_steps = s.accum;
    a.max_steps = Some(s.max_steps);
    a.learning_rate = 1e-3;
    a.lr_scheduler_type = Schedule::Constant;
    a.logging_steps = 1;
    a.save_steps = 2;
    a.eval_strategy = Strategy::Steps;
    a.eval_steps = Some(2);
    if s.resume {
        a.resume_from_checkpoint = Resume::Latest;
    }
    let mut t = SftTrainer::new(&m, &ds, Some(&ds), a, None, Box::new(|_, _| Ok(()))).unwrap();
    if let Some(c) = comm {
        t.comm = c;
    }
    let summary = t.train(&mut m, &mut NoCallbacks).unwrap();
    let mut w = Vec::new();
    for (_, lo) in m.llama.adapters() {
        w.extend(lo.a.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        w.extend(lo.b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    (w, summary)
}

/// `world` ranks on threads, rank 0 writing into `out`, the others into `out-rank<r>` (which
/// must stay unwritten); rank 0's result.
fn train_ranks(s: &Setup, world: usize, out: &Path) -> (Vec<f32>, TrainSummary) {
    let s = Setup { model: s.model.clone(), data: s.data.clone(), ..*s };
    let out = out.to_path_buf();
    let mut all = tcp::run_threads(world, move |r, g| {
        let dir = if r == 0 { out.clone() } else { PathBuf::from(format!("{}-rank{r}", out.display())) };
        Ok(train(&s, &dir, Some(Arc::new(g) as Arc<dyn Collective>)))
    })
    .unwrap();
    for (r, (w, _)) in all.iter().enumerate() {
        assert!(w == &all[0].0, "rank {r} ended with other adapters than rank 0");
    }
    all.swap_remove(0)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max)
}

/// Every entry's numbers equal to `tol` (relative), timing aside.
fn assert_metrics_close(a: &Path, b: &Path, tol: f64) {
    let (ma, mb) = (common::metrics_without_timing(a), common::metrics_without_timing(b));
    assert_eq!(ma.len(), mb.len(), "{ma:?}\n{mb:?}");
    for (x, y) in ma.iter().zip(&mb) {
        let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (k, v) in x {
            let (p, q) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((p - q).abs() <= tol * q.abs().max(1.0), "{k}: {p} vs {q}");
        }
    }
}

/// 25 conversations: a global batch of 4 leaves a last batch of one row (rank 1's share: none).
fn fixture() -> (tempfile::TempDir, Setup) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_chat_model(&model);
    let data = tmp.path().join("data.jsonl");
    common::write_conversations(&data, 25);
    (tmp, Setup { model, data, per_device: 4, accum: 2, max_steps: 4, resume: false })
}

#[test]
fn two_ranks_equal_one_process_with_the_same_global_batch() {
    let (tmp, s) = fixture();
    // 4 steps × 2 micro-batches of 4 rows: 8 global batches, the 7th the epoch's one-row tail.
    let (one, s1) = train(&s, &tmp.path().join("one"), None);
    let (two, s2) = train_ranks(&Setup { per_device: 2, ..s }, 2, &tmp.path().join("two"));
    let d = max_diff(&two, &one);
    eprintln!("2 ranks vs 1 process: max adapter difference {d:e}");
    assert!(d < 1e-6, "2 ranks differ from 1 process by {d}");
    assert!((s1.train_loss - s2.train_loss).abs() < 1e-6 * s1.train_loss.abs(), "{} vs {}", s1.train_loss, s2.train_loss);
    assert_eq!((s2.global_step, s2.tokens), (s1.global_step, s1.tokens), "tokens count over every rank");
    assert_metrics_close(&tmp.path().join("two"), &tmp.path().join("one"), 1e-6);
    // Rank 0 wrote the checkpoints, rank 1 nothing.
    assert!(tmp.path().join("two/checkpoint-4/trainer_state.json").is_file());
    assert!(!tmp.path().join("two-rank1").exists());
    // The comparison is not vacuous: a global batch of 2 trains to other adapters.
    let (half, _) = train_ranks(&Setup { per_device: 1, ..s_of(&tmp) }, 2, &tmp.path().join("half"));
    assert!(max_diff(&half, &one) > 1e-4);
    // 3 ranks × 2 rows: 4 global batches of 6, then the one-row tail (shares 0, 0, 1).
    let (three, _) = train_ranks(&Setup { per_device: 2, accum: 1, max_steps: 5, ..s_of(&tmp) }, 3, &tmp.path().join("three"));
    let (six, _) = train(&Setup { per_device: 6, accum: 1, max_steps: 5, ..s_of(&tmp) }, &tmp.path().join("six"), None);
    let d = max_diff(&three, &six);
    eprintln!("3 ranks vs 1 process: max adapter difference {d:e}");
    assert!(d < 1e-6, "3 ranks differ from 1 process by {d}");
}

fn s_of(tmp: &tempfile::TempDir) -> Setup {
    Setup { model: tmp.path().join("tiny"), data: tmp.path().join("data.jsonl"), per_device: 4, accum: 2, max_steps: 4, resume: false }
}

#[test]
fn a_checkpoint_of_two_ranks_resumes_in_one_process_keeping_the_global_batch() {
    let (tmp, s) = fixture();
    let (full, _) = train(&Setup { accum: 1, ..s_of(&tmp) }, &tmp.path().join("full"), None);
    // 2 ranks × 2 rows for 2 steps (constant schedule: the first 2 steps of a 4-step run) …
    let out = tmp.path().join("run");
    train_ranks(&Setup { per_device: 2, accum: 1, max_steps: 2, ..s }, 2, &out);
    assert!(out.join("checkpoint-2").is_dir());
    // … resumed by one process whose recipe still says 2 rows per device: it keeps 4.
    let (resumed, sum) = train(&Setup { per_device: 2, accum: 1, max_steps: 4, resume: true, ..s_of(&tmp) }, &out, None);
    assert_eq!(sum.global_step, 4);
    let d = max_diff(&resumed, &full);
    assert!(d < 1e-6, "resumed on 1 process differs by {d}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-4/trainer_state.json")).unwrap()).unwrap();
    assert_eq!((state["global_batch_size"].as_u64(), state["world_size"].as_u64()), (Some(4), Some(1)));
}

#[test]
fn shards_are_disjoint_and_their_union_is_the_global_batch_in_order() {
    let (_tmp, s) = fixture();
    let m = Model::load_hf_dir("tiny", &s.model, &LoadOptions::default()).unwrap();
    let (ds, _) = load_dataset(s.data.to_str().unwrap(), &DataLoadOptions::default()).unwrap();
    let t = Arc::new(qscript::data::tokenize_for_model(&ds, &m, &Default::default()).unwrap());
    for (packing, group_by_length) in [(false, false), (false, true), (true, false)] {
        let opts = BatchOptions { batch_size: 6, seed: 7, packing, group_by_length, max_seq_length: Some(512), ..Default::default() };
        let mut global = BatchIterator::new(t.clone(), opts.clone()).unwrap();
        let mut ranks: Vec<BatchIterator> = (0..3).map(|r| BatchIterator::new(t.clone(), opts.clone()).unwrap().with_shard(r, 3)).collect();
        let per_epoch = global.batches_per_epoch();
        for _ in 0..per_epoch * 2 + 1 {
            let g = global.next_batch();
            let parts: Vec<_> = ranks.iter_mut().map(|it| it.next_batch()).collect();
            let union: Vec<Vec<usize>> = parts.iter().flat_map(|p| p.examples.clone()).collect();
            assert_eq!(union, g.examples, "packing {packing} group {group_by_length}");
            for (p, it) in parts.iter().zip(&ranks) {
                assert_eq!(it.position(), global.position());
                // Each share holds the same rows as the global batch, padded to its own longest.
                for (row, ex) in p.examples.iter().enumerate() {
                    let at = g.examples.iter().position(|e| e == ex).unwrap();
                    let (gs, ps) = (g.seq, p.seq);
                    let real = p.attention_mask[row * ps..(row + 1) * ps].iter().filter(|&&x| x == 1).count();
                    assert_eq!(p.input_ids[row * ps..row * ps + real], g.input_ids[at * gs..at * gs + real]);
                    assert_eq!(p.labels[row * ps..row * ps + real], g.labels[at * gs..at * gs + real]);
                }
            }
            assert_eq!(parts.iter().map(|p| p.num_trained()).sum::<usize>(), g.num_trained());
        }
    }
}

// ---- the command line: `--nproc-per-node`, torchrun's environment, a rank that dies ----

fn qscript() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_qscript"));
    c.env("QSCRIPT_QUIET", "1");
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"] {
        c.env_remove(k);
    }
    c
}

fn cli_recipe(tmp: &Path) -> PathBuf {
    let src = format!(
        r#"
const OUT = "{out}";
const PER_DEVICE = 4;
const MAX_STEPS = 4;
let model = load_model("{model}");
let model = get_peft_model(model, LoraConfig(#{{ r: 4, lora_alpha: 8, target_modules: "all-linear", init_lora_weights: false }}));
let data = load_dataset("{data}");
let args = TrainingArguments(#{{ output_dir: OUT, max_steps: MAX_STEPS, per_device_train_batch_size: PER_DEVICE,
    learning_rate: 1e-3, logging_steps: 1, save_steps: 2, save_total_limit: 2, ddp_timeout: 60 }});
let trainer = SFTTrainer(model, data, args);
let s = trainer.train();
print("STEP:" + s.global_step);
model.save_pretrained(OUT + "/adapter");
"#,
        out = tmp.join("runs/out").display(),
        model = tmp.join("tiny").display(),
        data = tmp.join("data.jsonl").display()
    );
    let r = tmp.join("train.rhai");
    std::fs::write(&r, src).unwrap();
    r
}

fn cli(tmp: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let r = cli_recipe(tmp);
    let t = tmp.display();
    let mut c = qscript();
    c.arg(&r).arg(format!("--allow-read={t}")).arg(format!("--allow-write={t}")).args(extra).current_dir(tmp);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn adapter_values(path: &Path) -> Vec<f32> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut keys: Vec<_> = t.keys().cloned().collect();
    keys.sort();
    keys.iter().flat_map(|k| t[k].to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn launched_cpu_ranks_equal_one_process_and_world_size_1_is_the_plain_run() {
    let (tmp, _) = fixture();
    let t = tmp.path();
    let out = t.join("runs/out");
    let (code, o, e) = cli(t, &[], &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    let plain = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let plain_metrics = t.join("plain");
    std::fs::rename(&out, &plain_metrics).unwrap();
    // torchrun's environment for one process: the same run, bit for bit.
    let (code, o, e) = cli(t, &[], &[("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")]);
    assert_eq!(code, 0, "{o}\n{e}");
    assert!(std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap() == plain, "WORLD_SIZE=1 changed the adapter");
    std::fs::remove_dir_all(&out).unwrap();
    // Two ranks of 2 rows: the run of one process with 4 (the TCP reduction on the CPU build).
    let (code, o, e) = cli(t, &["--nproc-per-node", "2", "--set", "PER_DEVICE=2"], &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    assert!(e.contains("launching 2 rank(s) on this machine (WORLD_SIZE 2"), "{e}");
    assert_eq!(o.matches("STEP:4").count(), 2, "{o}");
    let two = adapter_values(&out.join("adapter/adapter_model.safetensors"));
    let d = max_diff(&two, &adapter_values(&plain_metrics.join("adapter/adapter_model.safetensors")));
    eprintln!("--nproc-per-node 2 vs 1 process: max adapter difference {d:e}");
    assert!(d < 1e-6, "{d}");
    assert_metrics_close(&out, &plain_metrics, 1e-6);
    // Bad environments are one line naming the variable.
    let (code, _, e) = cli(t, &[], &[("WORLD_SIZE", "2"), ("RANK", "2")]);
    assert_eq!((code, e.trim()), (1, "error: RANK=2 is not below WORLD_SIZE=2"));
}

/// The pid of the launcher's child that has `RANK=rank` (its parent in /proc/PID/stat).
fn rank_pid(launcher: u32, rank: usize) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the comm may hold spaces, so split after its ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == format!("RANK={rank}").as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_rank_that_dies_stops_the_launch_naming_it_and_the_last_checkpoint_resumes() {
    let (tmp, _) = fixture();
    let t = tmp.path();
    let r = cli_recipe(t);
    let out = t.join("runs/out");
    let mut c = qscript();
    c.arg(&r).arg(format!("--allow-read={}", t.display())).arg(format!("--allow-write={}", t.display()));
    c.args(["--nproc-per-node", "2", "--set", "PER_DEVICE=2", "--set", "MAX_STEPS=100000"]).current_dir(t);
    let mut launcher = c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("checkpoint-2").is_dir() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint-2 after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = rank_pid(launcher.id(), 1).expect("rank 1's process");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = std::time::Instant::now();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        assert!(killed.elapsed().as_secs() < 20, "the launcher did not stop within 20 s of rank 1's death");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut launcher.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("error: rank 1 was killed by signal 9 (the first rank to fail); the other ranks stopped too"), "{err}");
    // Rank 0 saw it go, naming it, and exited with 75 (failed because of another rank).
    assert!(err.contains("distributed: rank 1 left the group"), "{err}");
    // The latest checkpoint resumes, in one process (keeping the global batch of 4).
    let latest = qscript::train::checkpoint::latest(&out).unwrap();
    let step: usize = latest.file_name().unwrap().to_string_lossy()["checkpoint-".len()..].parse().unwrap();
    let (code, o, e) = cli(t, &["--resume", "--set", "PER_DEVICE=2", "--set", &format!("MAX_STEPS={}", step + 2)], &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    assert!(e.contains("resumed from") && e.contains("the global batch stays 4 rows"), "{e}");
    assert!(o.contains(&format!("STEP:{}", step + 2)), "{o}");
}

#[test]
fn ctrl_c_to_a_launched_run_leaves_a_checkpoint_that_resumes_to_the_same_adapter() {
    use std::os::unix::process::CommandExt;
    let (tmp, _) = fixture();
    let t = tmp.path();
    let steps = "MAX_STEPS=200";
    // The reference: one process, the same global batch of 4.
    let (code, o, e) = cli(t, &["--set", steps], &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    let want = adapter_values(&t.join("runs/out/adapter/adapter_model.safetensors"));
    std::fs::remove_dir_all(t.join("runs/out")).unwrap();
    let r = cli_recipe(t);
    let out = t.join("runs/out");
    let mut c = qscript();
    c.arg(&r).arg(format!("--allow-read={}", t.display())).arg(format!("--allow-write={}", t.display()));
    c.args(["--nproc-per-node", "2", "--set", "PER_DEVICE=2", "--set", steps]).current_dir(t);
    // Its own process group, as a terminal's foreground job: Ctrl-C reaches the launcher and every rank.
    let mut launcher = c.process_group(0).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("checkpoint-4").is_dir() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint-4 after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(unsafe { libc::kill(-(launcher.id() as i32), libc::SIGINT) }, 0);
    let status = launcher.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut launcher.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("resume with: ") && err.contains("--nproc-per-node 2"), "{err}");
    let (code, o, e) = cli(t, &["--nproc-per-node", "2", "--resume", "--set", "PER_DEVICE=2", "--set", steps], &[]);
    assert_eq!(code, 0, "{o}\n{e}");
    assert!(e.contains("resumed from"), "{e}");
    let got = adapter_values(&out.join("adapter/adapter_model.safetensors"));
    let d = max_diff(&got, &want);
    eprintln!("Ctrl-C + resume on 2 ranks vs 1 process: max adapter difference {d:e}");
    assert!(d < 1e-5, "{d}");
}
