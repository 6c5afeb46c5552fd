//! Model sources: sharded safetensors, the HF hub cache layout, GGUF files.

use qscript::model::{hub, LoadOptions, Model};
use std::path::Path;
use std::process::Command;

fn golden(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(p)
}

/// Split the golden base checkpoint into two shards with an index, as transformers does.
fn write_sharded(dir: &Path) {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(golden("peft/1/base/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part
            .iter()
            .map(|n| {
                let t = st.tensor(n).unwrap();
                (n.clone(), TensorView::new(t.dtype(), t.shape().to_vec(), t.data()).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part.iter() {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(golden("peft/1/base").join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded(tmp.path());
    let ids = [5u32, 17, 200, 3, 99, 42];
    let single = Model::load(golden("peft/1/base").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let sharded = Model::load(tmp.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(single.forward_ids(&ids).unwrap(), sharded.forward_ids(&ids).unwrap());
}

#[test]
fn missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded(tmp.path());
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = format!("{:#}", Model::load(tmp.path().to_str().unwrap(), &LoadOptions::default()).err().unwrap());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn hub_id_is_found_in_the_hf_cache() {
    // The layout huggingface_hub writes: hub/models--owner--name/{refs/main, snapshots/<commit>/}.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--tiny-org--tiny-llama");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(golden("peft/1/base").join(f), snap.join(f)).unwrap();
    }
    let recipe = home.path().join("r.rhai");
    std::fs::write(&recipe, "let m = load_model(\"tiny-org/tiny-llama\");\nprint(m.config().hidden_size);\nload_model(\"tiny-org/not-cached\");").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qscript"))
        .arg(&recipe)
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("QSCRIPT_QUIET", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.trim(), "64", "{stderr}");
    // Not cached and offline: one line saying where it looked.
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("r.rhai:3:") && stderr.contains("tiny-org/not-cached") && stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
    assert!(stderr.contains(&home.path().join("hub").display().to_string()), "{stderr}");
}

#[test]
fn gguf_file_loads_directly_with_the_same_weights_as_the_conversion() {
    let gguf = hub::default_model_gguf().unwrap();
    let converted = match hub::resolve(hub::DEFAULT_MODEL, None).unwrap() {
        hub::ModelSource::HfDir(d) => d,
        other => panic!("{other:?}"),
    };
    let a = Model::load(gguf.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let b = Model::load(converted.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let ids = a.tokenizer().unwrap().encode("The capital of France is", false).unwrap();
    assert_eq!(ids, b.tokenizer().unwrap().encode("The capital of France is", false).unwrap());
    let (la, lb) = (a.forward_ids(&ids).unwrap(), b.forward_ids(&ids).unwrap());
    assert_eq!(la, lb, "GGUF and converted checkpoint must hold identical f32 weights");
    assert_eq!(a.eos_token_ids(), b.eos_token_ids());
}
