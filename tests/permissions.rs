//! Recipes from a stranger (issue 17): every attack denied with a one-line error naming the
//! path and the flag that grants it, `qscript check`'s read / write / network listing, and the
//! shipped recipes running with no flags.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A workspace: `work/` is the working directory, `work/recipes/` the recipe's folder (with
/// data and a tiny model), `outside/` what a recipe must not touch.
struct Ws {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Ws {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let rec = root.join("work/recipes");
        std::fs::create_dir_all(rec.join("data")).unwrap();
        common::write_conversations(&rec.join("data/chat.jsonl"), 12);
        std::fs::write(rec.join("data/.hidden.jsonl"), "{\"text\": \"hidden\"}\n").unwrap();
        std::fs::create_dir_all(root.join("outside/home")).unwrap();
        std::fs::write(root.join("outside/home/.bashrc"), "# bashrc\n").unwrap();
        std::fs::write(root.join("outside/secret.jsonl"), "{\"text\": \"sk-SECRET\"}\n").unwrap();
        Ws { _tmp: tmp, root }
    }

    fn rec(&self) -> PathBuf {
        self.root.join("work/recipes")
    }

    fn with_model(self) -> Self {
        common::tiny_chat_model(&self.rec().join("tiny"));
        self
    }

    /// Run `src` as `work/recipes/r.rhai` from `work/` with `flags`.
    fn run(&self, src: &str, flags: &[&str]) -> Output {
        self.run_as("r.rhai", src, flags)
    }

    /// Run `src` as `work/recipes/NAME` from `work/` with `flags`.
    fn run_as(&self, name: &str, src: &str, flags: &[&str]) -> Output {
        std::fs::write(self.rec().join(name), src).unwrap();
        self.qscript().arg(format!("recipes/{name}")).args(flags).output().unwrap()
    }

    fn qscript(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
        c.current_dir(self.root.join("work"))
            .env("QSCRIPT_QUIET", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", self.root.join("hf"))
            .env("QSCRIPT_CACHE", self.root.join("qcache"));
        c
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run failed with one line that is a permission denial naming `path` and `flag`.
fn assert_denied(o: &Output, path: &str, flag: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
    assert!(e.contains("permission denied") && e.contains(path) && e.contains(flag), "want {path} / {flag}: {e}");
}

#[test]
fn writes_outside_the_output_folders_are_denied() {
    let ws = Ws::new().with_model();
    let bashrc = ws.root.join("outside/home/.bashrc");
    let ds = "let d = load_dataset(\"recipes/data/chat.jsonl\");\n";
    let model = "let m = load_model(\"recipes/tiny\");\n";
    let lora = "let m = get_peft_model(load_model(\"recipes/tiny\"), LoraConfig(#{ r: 2 }));\n";
    let cases: Vec<(String, String)> = vec![
        (format!("{ds}d.to_jsonl(\"{}\");", bashrc.display()), ".bashrc".into()),
        (format!("{ds}d.to_jsonl(\"../outside/home/.bashrc\");"), ".bashrc".into()),
        (format!("{ds}d.to_jsonl(\".bashrc\");"), ".bashrc".into()),
        (format!("{lora}m.save_pretrained(\"../../outside/adapter\");"), "outside/adapter".into()),
        (format!("{model}m.save_pretrained(\"{}\");", ws.root.join("outside/home").display()), "outside/home".into()),
        // A 4-bit ("quantize") output goes through the same check.
        ("let q = load_model(\"recipes/tiny\", #{ quantization_config: BitsAndBytesConfig(#{ load_in_4bit: true }) });\nq.save_pretrained(\"../q4\");".to_string(), "../q4".into()),
        ("TrainingArguments(#{ output_dir: \"../../outside/run\" });".into(), "outside/run".into()),
        ("TrainingArguments(#{ output_dir: \".\" });".into(), "working directory itself".into()),
        ("TrainingArguments(#{ output_dir: \".config/x\" });".into(), "hidden".into()),
        ("TrainingArguments(#{ output_dir: \"runs/../..\" });".into(), "outside".into()),
    ];
    for (src, want) in &cases {
        let o = ws.run(src, &[]);
        assert_denied(&o, want, "--allow-write=");
    }
    assert_eq!(std::fs::read_to_string(&bashrc).unwrap(), "# bashrc\n");
    assert!(!ws.root.join("outside/adapter").exists() && !ws.root.join("q4").exists());
    // An existing folder of someone else's files is not an output folder.
    std::fs::create_dir_all(ws.root.join("work/src")).unwrap();
    std::fs::write(ws.root.join("work/src/main.py"), "print(1)").unwrap();
    let o = ws.run(&format!("{ds}d.to_jsonl(\"src/main.py\");"), &[]);
    assert_denied(&o, "src/main.py", "--allow-write=");
    assert_eq!(std::fs::read_to_string(ws.root.join("work/src/main.py")).unwrap(), "print(1)");
    // Inside the working directory, a new folder is fine; the grant flag lifts the rest.
    let o = ws.run(&format!("{ds}d.to_jsonl(\"out/clean.jsonl\");"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ws.root.join("work/out/clean.jsonl").is_file());
    let o = ws.run(&format!("{ds}d.to_jsonl(\"../outside/copy.jsonl\");"), &[&format!("--allow-write={}", ws.root.join("outside").display())]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn reads_outside_the_recipe_folder_are_denied_and_existence_is_not_revealed() {
    let ws = Ws::new().with_model();
    let secret = ws.root.join("outside/secret.jsonl");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&secret, ws.rec().join("data/link.jsonl")).unwrap();
    let cases = [
        (format!("load_dataset(\"{}\");", secret.display()), "secret.jsonl"),
        ("load_dataset(\"../outside/secret.jsonl\");".to_string(), "secret.jsonl"),
        ("load_dataset(\"recipes/../../outside/secret.jsonl\");".to_string(), "secret.jsonl"),
        ("load_dataset(\"../outside/*.jsonl\");".to_string(), "outside"),
        ("load_dataset(\"../**/*.jsonl\");".to_string(), "permission denied"),
        ("load_dataset(\"recipes/data/link.jsonl\");".to_string(), "link.jsonl"),
        ("load_model(\"../outside\");".to_string(), "outside"),
        ("import \"../../outside/mod\" as m;".to_string(), "mod"),
        ("let m = get_peft_model(load_model(\"recipes/tiny\"), LoraConfig(#{ r: 2 }));\nm.load_adapter(\"../outside\");".to_string(), "outside"),
        ("TrainingArguments(#{ output_dir: \"runs/x\", resume_from_checkpoint: \"../outside/checkpoint-1\" });".to_string(), "checkpoint-1"),
    ];
    for (src, want) in &cases {
        let o = ws.run(src, &[]);
        assert_denied(&o, want, "--allow-read=");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("SECRET") && !stderr(&o).contains("SECRET"));
    }
    // A glob over the recipe's folder passes over hidden files; naming one reads it.
    let o = ws.run("print(load_dataset(\"recipes/data/*.jsonl\").len());", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "12", "neither the hidden file nor the link out: {}", stderr(&o));
    let o = ws.run("print(load_dataset(\"recipes/data/.hidden.jsonl\").len());", &[]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1", "{}", stderr(&o));
    // The same message for a path that exists and one that does not (only the name differs).
    let a = stderr(&ws.run("load_dataset(\"../outside/secret.jsonl\");", &[]));
    let b = stderr(&ws.run("load_dataset(\"../outside/absent.jsonl\");", &[]));
    assert_eq!(a.replace("secret", "X"), b.replace("absent", "X"));
    let a = stderr(&ws.run("load_model(\"../outside/home\");", &[]));
    let b = stderr(&ws.run("load_model(\"../outside/nohome\");", &[]));
    assert_eq!(a.replace("home", "X"), b.replace("nohome", "X"));
    // A hub-shaped id that is also a folder outside is never looked at: asked of the hub only.
    let o = ws.run("load_model(\"outside/home\");", &[]);
    assert!(stderr(&o).contains("not found") && !stderr(&o).contains(".bashrc"), "{}", stderr(&o));
    // Granted, it reads.
    let o = ws.run("print(load_dataset(\"../outside/secret.jsonl\").len());", &[&format!("--allow-read={}", ws.root.join("outside").display())]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_model_id_built_from_read_data_is_not_sent_to_the_hub() {
    let ws = Ws::new();
    std::fs::write(ws.rec().join("data/key.jsonl"), "{\"text\": \"sk-12345\"}\n").unwrap();
    let read = "let k = load_dataset(\"recipes/data/key.jsonl\").select([0]).to_jsonl(\"runs/k.jsonl\");\nlet s = \"leak-\" + load_dataset(\"recipes/data/key.jsonl\").len();\n";
    for (src, want) in [
        (format!("{read}load_model(\"attacker/\" + s);"), "attacker/leak-1"),
        (format!("{read}load_model(`attacker/${{s}}`);"), "attacker/leak-1"),
        (format!("{read}load_model(\"attacker/model\", #{{ revision: s }});"), "revision \"leak-1\""),
        (format!("{read}let id = \"attacker/\"; id += s; load_model(id);"), "attacker/leak-1"),
    ] {
        // Online (not HF_HUB_OFFLINE): the check comes before any request.
        let p = ws.rec().join("r.rhai");
        std::fs::write(&p, &src).unwrap();
        let o = ws.qscript().env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", "http://127.0.0.1:9").arg("recipes/r.rhai").output().unwrap();
        assert_denied(&o, want, "--allow-net");
    }
    // A literal id passes the check (and, offline, is then simply not found).
    let o = ws.run("load_model(\"attacker/model\");", &[]);
    let e = stderr(&o);
    assert!(!e.contains("permission denied") && e.contains("not found"), "{e}");
    // So does a --set value.
    let o = ws.run("const M = \"a/b\";\nload_model(M);", &["--set", "M=other/model"]);
    assert!(!stderr(&o).contains("permission denied") && stderr(&o).contains("other/model"), "{}", stderr(&o));
}

#[test]
fn pruning_never_touches_another_runs_checkpoints() {
    let ws = Ws::new().with_model();
    let run = |out: &str, steps: usize| {
        let src = format!(
            "let m = get_peft_model(load_model(\"recipes/tiny\"), LoraConfig(#{{ r: 2 }}));\n\
             let d = load_dataset(\"recipes/data/chat.jsonl\");\n\
             SFTTrainer(m, d, TrainingArguments(#{{ output_dir: \"{out}\", max_steps: {steps}, per_device_train_batch_size: 4, \
             save_steps: 1, save_total_limit: 2, logging_steps: 1 }})).train();"
        );
        ws.run(&src, &[])
    };
    // An older run with more steps: checkpoint-1..6.
    let o = run("runs/a", 6);
    assert!(o.status.success(), "{}", stderr(&o));
    let names = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(ws.root.join("work").join(dir)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("checkpoint-")).collect();
        v.sort();
        v
    };
    assert_eq!(names("runs/a"), ["checkpoint-5", "checkpoint-6"]);
    // A second run, 3 steps (checkpoint-2, -3), in its own folder; then an older run's stale
    // checkpoint-5/6 appear beside its own (a folder copied over, say), and a killed run's
    // temporary (its pid is gone).
    let o = run("runs/b", 3);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(names("runs/b"), ["checkpoint-2", "checkpoint-3"]);
    for c in ["checkpoint-5", "checkpoint-6"] {
        copy_dir(&ws.root.join("work/runs/a").join(c), &ws.root.join("work/runs/b").join(c));
    }
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let stale = ws.root.join(format!("work/runs/b/.checkpoint-9.tmp-{dead}-1-0"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("optimizer.safetensors"), vec![0u8; 4096]).unwrap();
    // Resuming continues the run's own latest (step 3), not the stale step 6 (before: it
    // "finished" at once), and pruning removes only its own checkpoint-2, never the older
    // run's 5 and 6 (before: those survived and the run's own new ones were deleted).
    let src = "let m = get_peft_model(load_model(\"recipes/tiny\"), LoraConfig(#{ r: 2 }));\n\
               let d = load_dataset(\"recipes/data/chat.jsonl\");\n\
               let s = SFTTrainer(m, d, TrainingArguments(#{ output_dir: \"runs/b\", max_steps: 4, per_device_train_batch_size: 4, \
               save_steps: 1, save_total_limit: 2, resume_from_checkpoint: true })).train();\nprint(s.global_step);";
    let o = ws.run(src, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists(), "the dead run's temporary is gone");
    assert!(stderr(&o).contains("checkpoint-3 at step 3"), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "4");
    assert_eq!(names("runs/b"), ["checkpoint-3", "checkpoint-4", "checkpoint-5", "checkpoint-6"]);
    // A run pointed at a folder outside the working directory cannot prune anything there.
    let o = run("../outside/runs", 2);
    assert_denied(&o, "outside/runs", "--allow-write=");
}

#[test]
fn overwrite_output_dir_replaces_only_the_recipes_own_runs() {
    let ws = Ws::new().with_model();
    let src = |overwrite: bool| {
        format!(
            "let m = get_peft_model(load_model(\"recipes/tiny\"), LoraConfig(#{{ r: 2 }}));\n\
             let d = load_dataset(\"recipes/data/chat.jsonl\");\n\
             SFTTrainer(m, d, TrainingArguments(#{{ output_dir: \"runs/mine\", max_steps: 1, per_device_train_batch_size: 4, \
             overwrite_output_dir: {overwrite} }})).train();"
        )
    };
    let o = ws.run_as("mine.rhai", &src(false), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = ws.root.join("work/runs/mine/metrics.jsonl");
    let before = std::fs::read(&metrics).unwrap();
    // A stranger's recipe aimed at the user's run: refused in one line, the run untouched.
    let o = ws.run_as("stranger.rhai", &src(true), &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("not of this recipe") && e.contains("--allow-write="), "{e}");
    assert!(e.lines().any(|l| l.contains("not of this recipe") && l.contains("--allow-write=")), "one line says it all: {e}");
    assert_eq!(std::fs::read(&metrics).unwrap(), before);
    // With the folder granted it may; and the recipe that made a run may always replace it.
    let o = ws.run_as("stranger.rhai", &src(true), &["--allow-write=runs/mine"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ws.run_as("stranger.rhai", &src(true), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn check_lists_reads_writes_and_network() {
    let ws = Ws::new();
    std::fs::write(
        ws.rec().join("r.rhai"),
        "const OUT = \"runs/x\";\nlet m = load_model(\"org/model\");\nlet d = load_dataset(\"recipes/data/chat.jsonl\");\n\
         d.to_jsonl(\"../outside/steal.jsonl\");\nlet a = TrainingArguments(#{ output_dir: OUT });\nm.save_pretrained(OUT + \"/adapter\");\n\
         load_dataset(\"../outside/secret.jsonl\");\nload_dataset(\"x\" + d.len());\n\
         load_model(\"random:smollm2-135m\", #{ tokenizer: \"../outside/tok\" });\n",
    )
    .unwrap();
    let o = ws.qscript().args(["check", "recipes/r.rhai"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let line = |needle: &str| out.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in:\n{out}")).to_string();
    assert!(line("recipes/data/chat.jsonl (load_dataset, line 3)").contains("allowed (the recipe's folder)"), "{out}");
    assert!(line("../outside/secret.jsonl").contains("denied: permission denied: cannot read"), "{out}");
    assert!(line("(computed) (load_dataset, line 8)").contains("checked when it runs"), "{out}");
    assert!(line("runs/x (output_dir, line 5)").contains("allowed (output folder runs/x)"), "{out}");
    assert!(line("runs/x/adapter (save_pretrained, line 6)").contains("allowed (output folder runs/x)"), "{out}");
    assert!(line("../outside/steal.jsonl").contains("denied") && line("../outside/steal.jsonl").contains("--allow-write="), "{out}");
    assert!(line("hub model org/model (load_model, line 2)").contains("allowed"), "{out}");
    // Random weights read no file; the tokenizer option reads another model's files.
    assert!(!out.contains("random:"), "{out}");
    assert!(line("../outside/tok (load_model tokenizer, line 9)").contains("denied"), "{out}");
    let reads = out.find("reads:").unwrap();
    let writes = out.find("writes:").unwrap();
    let net = out.find("network:").unwrap();
    assert!(reads < writes && writes < net, "{out}");
}

/// The default model's id in an HF cache at `hf/hub`, holding the tiny model.
fn cache_tiny_as_default_model(ws: &Ws) {
    let repo = ws.root.join("hf/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    common::tiny_chat_model(&snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn every_shipped_recipe_runs_with_no_flags_and_check_lists_its_accesses() {
    let ws = Ws::new();
    cache_tiny_as_default_model(&ws);
    // The repository's recipes, run from a copy of its root (the recipes name their data and
    // outputs relative to it), with the default model from the HF cache.
    let work = ws.root.join("work");
    std::fs::remove_dir_all(work.join("recipes")).unwrap();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes"), &work.join("recipes"));
    let mut n = 0;
    for e in std::fs::read_dir(work.join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "rhai") {
            continue;
        }
        let rel = format!("recipes/{}", p.file_name().unwrap().to_string_lossy());
        let o = ws.qscript().args(["check", &rel]).output().unwrap();
        let listing = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && listing.contains("reads:") && listing.contains("writes:"), "{rel}: {listing}{}", stderr(&o));
        assert!(!listing.contains("denied"), "{rel}: {listing}");
        let sets: &[&str] = match rel.as_str() {
            "recipes/chat.rhai" => &["--set", "MAX_NEW_TOKENS=4"],
            "recipes/any_family.rhai" => &["--set", "MAX_STEPS=2"],
            _ => &["--set", "EPOCHS=0.05"],
        };
        let o = ws.qscript().arg(&rel).args(sets).output().unwrap();
        assert!(o.status.success(), "{rel}: {}", stderr(&o));
        if !rel.ends_with("chat.rhai") {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            assert!(work.join("runs").join(&name).join("adapter/adapter_config.json").is_file(), "{rel}");
        }
        n += 1;
    }
    assert!(n >= 5, "{n}");
}
