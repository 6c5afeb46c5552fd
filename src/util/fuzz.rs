//! Entry points for fuzzing: each takes arbitrary bytes, feeds them to one parser of
//! untrusted input the way qscript uses it, and returns its error. A panic, a hang or an
//! allocation sized from the input is a bug. The libFuzzer targets in `fuzz/` call these, and
//! `tests/fuzz_seeds.rs` runs every committed seed through them on stable Rust.

use anyhow::Result;
use std::path::PathBuf;

/// The fuzz targets by name, with their entry points.
pub const TARGETS: &[(&str, fn(&[u8]) -> Result<()>)] = &[
    ("safetensors", safetensors),
    ("gguf", gguf),
    ("configs", configs),
    ("dataset", dataset),
    ("chat_template", chat_template),
    ("recipe", recipe),
];

/// A scratch folder of this process for inputs that are read from files (the fuzz binaries
/// and the seed test run one input at a time).
fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("qscript-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn file_with(name: &str, data: &[u8]) -> Result<PathBuf> {
    let p = scratch().join(name);
    std::fs::write(&p, data)?;
    Ok(p)
}

/// A safetensors file: header, then every tensor (small ones) loaded as f32.
pub fn safetensors(data: &[u8]) -> Result<()> {
    use crate::model::weights::WeightFiles;
    let p = file_with("model.safetensors", data)?;
    let w = WeightFiles::open(&[p])?;
    let names: Vec<String> = w.names().map(String::from).collect();
    for n in names {
        let (shape, _) = w.info(&n)?;
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some_and(|e| e <= 1 << 20) {
            let _ = w.load(&n, None, candle_core::DType::F32, &candle_core::Device::Cpu);
        }
    }
    Ok(())
}

/// A GGUF file: its config, its tokenizer, then the whole model.
pub fn gguf(data: &[u8]) -> Result<()> {
    use crate::model::gguf;
    let p = file_with("model.gguf", data)?;
    let cfg = gguf::read_config_json(&p);
    let _ = gguf::read_tokenizer(&p);
    cfg?;
    gguf::read_gguf(&p)?;
    Ok(())
}

/// config.json and adapter_config.json parsing on the same input; the error of the one it
/// looks like (an adapter config has `peft_type` or `r`).
pub fn configs(data: &[u8]) -> Result<()> {
    let model = model_config(data);
    let adapter = adapter_config(data);
    let v: serde_json::Value = serde_json::from_slice(data)?;
    if v.get("peft_type").is_some() || v.get("r").is_some() {
        adapter
    } else {
        model
    }
}

/// config.json: parsed, then the sizes derived from it.
pub fn model_config(data: &[u8]) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(data)?;
    let c = crate::model::config::Config::from_json(&v)?;
    let _ = c.num_parameters();
    let _ = c.rope_inv_freq();
    Ok(())
}

/// adapter_config.json: parsed and validated, and every module's rank and scaling.
pub fn adapter_config(data: &[u8]) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(data)?;
    let (cfg, _) = crate::model::adapter::config_from_json(&v, "adapter_config.json")?;
    for path in ["model.layers.0.self_attn.q_proj", "model.layers.7.mlp.down_proj", "lm_head"] {
        let _ = cfg.targets(path);
        let _ = cfg.rank_and_scaling(path);
    }
    Ok(())
}

/// A dataset file; the first byte picks its kind (jsonl, json, csv, tsv).
pub fn dataset(data: &[u8]) -> Result<()> {
    use crate::data::load::{load_dataset, LoadOptions};
    let Some((&kind, rest)) = data.split_first() else { return Ok(()) };
    let ext = ["jsonl", "json", "csv", "tsv"][kind as usize % 4];
    let p = file_with(&format!("data.{ext}"), rest)?;
    let (ds, report) = load_dataset(&p.to_string_lossy(), &LoadOptions::default())?;
    let _ = report.summary();
    let _ = ds.len();
    Ok(())
}

/// A chat template (the input up to the first NUL byte) rendering a few conversations (the
/// rest of the input, as JSON, when it is a list of messages).
pub fn chat_template(data: &[u8]) -> Result<()> {
    use crate::data::chat_template::ChatTemplate;
    let (src, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let t = ChatTemplate::new(&String::from_utf8_lossy(src), "<s>", "</s>")?;
    let fixed = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}
    ]);
    let mut convs = vec![fixed];
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
        convs.push(v);
    }
    for c in convs {
        if let Some(messages) = c.as_array() {
            for gen in [false, true] {
                let _ = t.render(messages, gen, &serde_json::Map::new());
            }
        }
    }
    Ok(())
}

/// A recipe, compiled and run with the whole qscript API under the default permissions, in
/// a scratch working directory with empty model caches, offline, with a small operation
/// budget. On a thread with the command line's stack size.
pub fn recipe(data: &[u8]) -> Result<()> {
    let src = String::from_utf8_lossy(data).into_owned();
    match std::thread::Builder::new().stack_size(crate::cli::STACK_SIZE).spawn(move || run_recipe(&src))?.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic), // a crash: the fuzzer must see it
    }
}

fn run_recipe(src: &str) -> Result<()> {
    use crate::script::{Host, Limits};
    use crate::util::permissions::{Grants, Policy};
    let dir = scratch();
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("recipes"))?;
    // Relative paths of the recipe are the process's: the scratch folder is its working
    // directory (the fuzz binaries and the seed test run one input at a time).
    std::env::set_current_dir(&work)?;
    // Offline, and no `python3` to fetch the default model with: nothing leaves the machine.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    std::env::set_var("PATH", "");
    std::env::set_var("HF_HOME", dir.join("hf"));
    std::env::set_var("QSCRIPT_CACHE", dir.join("qcache"));
    std::env::set_var("QSCRIPT_QUIET", "1");
    let recipe = work.join("recipes/r.rhai");
    std::fs::write(&recipe, src)?;
    let mut host = Host::new(recipe.parent(), &Limits { max_operations: 20_000 });
    let roots = [(work.join("recipes"), "the recipe's folder")];
    host.policy = Some(std::rc::Rc::new(Policy::new(&Grants::default(), &roots)));
    // `qscript check`'s static pass (and its read / write listing), then the run.
    let _ = host.check_file(&recipe, &[]);
    host.run_file(&recipe, &[])
}
