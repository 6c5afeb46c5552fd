//! Crash cases of issue 17, each a one-line error (or a quiet, defined exit) now: sizes from
//! config.json, GGUF metadata and recipe arguments checked before allocating, a 60 MB text to
//! tokenize, GGUF `general.alignment = 0`, deeply nested values, a closed stdout pipe, an
//! unwritable stderr, an unexpected panic, a FIFO and a symlink loop as datasets; and the
//! exhaustion cases (growing loops, datasets, a template loop, 100,000 new tokens, deep folder
//! walks), each stopped by a limit within seconds.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn recipe(dir: &Path, src: &str) -> PathBuf {
    let p = dir.join("r.rhai");
    std::fs::write(&p, src).unwrap();
    p
}

fn qscript(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
    c.current_dir(dir).env("QSCRIPT_QUIET", "1").env_remove("RUST_BACKTRACE");
    c
}

/// Run with a deadline (a hang is a failure, not a stuck test).
fn run_within(mut c: Command, secs: u64) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(secs) {
            child.kill().unwrap();
            panic!("still running after {secs}s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), t.elapsed())
}

fn one_line_error(o: &Output, want: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
    assert!(e.starts_with("error: ") && e.contains(want) && !e.contains("panicked") && !e.contains("overflow"), "want {want}: {e}");
}

#[test]
fn deeply_nested_values_print_and_serialise_as_an_error() {
    let t = tempfile::tempdir().unwrap();
    let build = "let a = []; for i in 0..10000 { a = [a]; }\n";
    for (line, want) in [("print(a);", "print: the value is nested deeper than 256"), ("to_json(a);", "to_json: the value is nested deeper"), ("debug(a);", "nested deeper"), ("a.to_string();", "nested deeper")] {
        let (o, _) = run_within(qscript(t.path()).arg(recipe(t.path(), &format!("{build}{line}"))).to_owned_cmd(), 60);
        one_line_error(&o, want);
    }
    // Rhai's own formatting (interpolation, `+`) runs on the engine thread's large stack.
    for line in ["let s = `${a}`; print(s.len());", "let s = \"\" + a; print(s.len());"] {
        let (o, _) = run_within(qscript(t.path()).arg(recipe(t.path(), &format!("{build}{line}"))).to_owned_cmd(), 60);
        assert!(o.status.success(), "{line}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "20002"); // 10,001 levels of `[]`
    }
    // Shallow values print as Rhai prints them.
    let (o, _) = run_within(qscript(t.path()).arg(recipe(t.path(), "print([1, \"a\", #{b: [2.5, ()]}]); print(to_json([[1]]));")).to_owned_cmd(), 60);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "[1, \"a\", #{\"b\": [2.5, ()]}]\n[[1]]\n");
}

#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    let t = tempfile::tempdir().unwrap();
    let p = recipe(t.path(), "for i in 0..1000000 { print(`line ${i}`); }");
    let mut child = qscript(t.path()).arg(&p).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "line 0\n");
    drop(out); // as `head -1` does
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[cfg(target_os = "linux")]
#[test]
fn an_unwritable_stderr_is_a_defined_exit_not_a_crash() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("d.jsonl"), "{\"text\": \"a\"}\n").unwrap();
    // Not quiet: loading prints its summary on stderr, which is /dev/full.
    let p = recipe(t.path(), "load_dataset(\"d.jsonl\"); print(\"after\");");
    let o = Command::new(env!("CARGO_BIN_EXE_qscript")).current_dir(t.path()).arg(&p)
        .stderr(std::fs::File::options().write(true).open("/dev/full").unwrap()).output().unwrap();
    assert_eq!(o.status.code(), Some(74));
    assert!(o.stdout.is_empty());
}

#[test]
fn an_unexpected_panic_is_one_line_with_exit_70() {
    let t = tempfile::tempdir().unwrap();
    let o = qscript(t.path()).arg(recipe(t.path(), "print(1);")).env("QSCRIPT_DEBUG_PANIC", "1").output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(70), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.starts_with("error: internal error: ") && e.contains("please report it") && !e.contains("panicked at"), "{e}");
}

#[cfg(unix)]
#[test]
fn a_fifo_and_a_symlink_loop_as_datasets_do_not_hang() {
    let t = tempfile::tempdir().unwrap();
    assert!(Command::new("mkfifo").arg(t.path().join("data.jsonl")).status().unwrap().success());
    let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), "load_dataset(\"data.jsonl\");")).to_owned_cmd(), 20);
    one_line_error(&o, "data.jsonl: not a regular file");
    assert!(took < Duration::from_secs(10));
    let d = t.path().join("ds");
    std::fs::create_dir_all(d.join("a")).unwrap();
    std::fs::write(d.join("a/x.jsonl"), "{\"text\": \"a\"}\n").unwrap();
    std::os::unix::fs::symlink(&d, d.join("a/loop")).unwrap();
    std::os::unix::fs::symlink("b", d.join("b")).unwrap(); // a link to itself
    let (o, _) = run_within(qscript(t.path()).arg(recipe(t.path(), "print(load_dataset(\"ds\").len());")).to_owned_cmd(), 20);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1");
}

#[test]
fn growing_values_in_a_loop_reach_the_memory_limit_in_seconds() {
    let t = tempfile::tempdir().unwrap();
    for src in [
        "let a = []; loop { a.push(1); }",
        "let a = []; loop { a += [1, 2, 3, 4]; }",
        "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }",
        "let s = \"xxxxxxxx\"; loop { s += s; }",
        "let s = \"xxxxxxxx\"; loop { s = s + s; }",
        "let a = [\"x\"]; loop { a.pad(a.len() * 2, a[0]); }",
    ] {
        let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), src)).arg("--max-memory=256M").to_owned_cmd(), 120);
        // Strings built by `+` stop at their own 64 MiB bound, the rest at the memory limit.
        one_line_error(&o, if src.contains("s + s") || src.contains("s += s") { "Length of string" } else { "memory limit reached" });
        assert!(took < Duration::from_secs(60), "{src}: {took:?}");
    }
}

/// A config.json of the tiny test model with `field` set to `value`.
fn tiny_config(field: &str, value: serde_json::Value) -> String {
    let mut c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 1024, "torch_dtype": "float32"
    });
    c[field] = value;
    c.to_string()
}

#[test]
fn sizes_from_model_files_are_checked_before_allocating() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("m")).unwrap();
    for (field, value) in [("num_hidden_layers", 1_000_000_000_000u64), ("max_position_embeddings", 100_000_000), ("vocab_size", 1 << 40), ("hidden_size", 1 << 40)] {
        std::fs::write(t.path().join("m/config.json"), tiny_config(field, value.into())).unwrap();
        let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), "load_model(\"m\");")).to_owned_cmd(), 30);
        one_line_error(&o, &format!("config.json: field `{field}` = {value} is larger than qscript supports"));
        assert!(took < Duration::from_secs(10));
    }
    // GGUF metadata: the block count, and an alignment of 0 (candle divided by it).
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf");
    for (seed, want) in [("seed-block-count-1e12", "`num_hidden_layers` = 1000000000000 is larger"), ("seed-alignment-0", "`general.alignment` = 0 is not a power of two")] {
        std::fs::copy(seeds.join(seed), t.path().join("m.gguf")).unwrap();
        let (o, _) = run_within(qscript(t.path()).arg(recipe(t.path(), "load_model(\"m.gguf\");")).to_owned_cmd(), 30);
        one_line_error(&o, want);
        assert!(String::from_utf8_lossy(&o.stderr).contains("m.gguf"));
    }
    // The same GGUF with a sane header loads (the checks refuse only what is wrong).
    std::fs::copy(seeds.join("seed-tiny-llama"), t.path().join("m.gguf")).unwrap();
    let (o, _) = run_within(qscript(t.path()).arg(recipe(t.path(), "print(load_model(\"m.gguf\").config().num_hidden_layers);")).to_owned_cmd(), 60);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1");
}

#[test]
fn lora_ranks_from_a_recipe_are_bounded() {
    let t = tempfile::tempdir().unwrap();
    for (src, want) in [
        ("LoraConfig(#{ r: 1000000000000 });", "`r` = 1000000000000 is larger than 16384"),
        ("LoraConfig(#{ rank_pattern: #{ q_proj: 1e20 } });", "rank_pattern `q_proj` must be a whole number between 1 and 16384"),
        ("LoraConfig(#{ rank_pattern: #{ q_proj: 2.5 } });", "rank_pattern `q_proj`"),
    ] {
        let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), src)).to_owned_cmd(), 30);
        one_line_error(&o, want);
        assert!(took < Duration::from_secs(10));
    }
}

/// Builds `s`, a string of 60 MiB (under Rhai strings' 64 MiB bound).
const SIXTY_MB: &str = "let a = \"xxxxxxxx\"; for i in 0..19 { a += a; }\nlet s = a + a + a + a; let b = s; s += b; s += a + a + a + a + a + a + a;\n";

#[test]
fn model_work_is_bounded_a_60_mb_text_a_template_loop_and_100k_new_tokens() {
    let t = tempfile::tempdir().unwrap();
    common::tiny_chat_model(&t.path().join("tiny"));
    let load = "let m = load_model(\"tiny\");\n";
    for (src, want) in [
        (format!("{load}{SIXTY_MB}print(s.len()); m.tokenize(s);"), "tokenizer: the text is 60 MiB, more than the 16 MiB tokenized at once"),
        (format!("{load}m.generate(\"Hi\", #{{ max_new_tokens: 100000 }});"), "`max_new_tokens` = 100000 is more than 32768"),
        (
            format!("{load}m.set_chat_template(\"{{% for i in range(100000) %}}{{% for j in range(100000) %}}x{{% endfor %}}{{% endfor %}}\");\nm.apply_chat_template([#{{ role: \"user\", content: \"hi\" }}], #{{ tokenize: false }});"),
            "chat template stopped: more than 5000000 instructions in one render",
        ),
    ] {
        let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), &src)).to_owned_cmd(), 120);
        one_line_error(&o, want);
        assert!(took < Duration::from_secs(60), "{want}: {took:?}");
    }
    // A config's 16M positions do not build 16M-row RoPE tables at load time.
    let cfg = std::fs::read_to_string(t.path().join("tiny/config.json")).unwrap().replace("\"max_position_embeddings\":1024", "\"max_position_embeddings\":16000000");
    assert!(cfg.contains("16000000"), "{cfg}");
    std::fs::write(t.path().join("tiny/config.json"), cfg).unwrap();
    let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), &format!("{load}print(m.generate(\"Hi\", #{{ max_new_tokens: 2 }}).len() >= 0);"))).arg("--max-memory=1G").to_owned_cmd(), 120);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(took < Duration::from_secs(60));
}

#[test]
fn datasets_count_against_the_memory_limit_and_deep_walks_stop() {
    let t = tempfile::tempdir().unwrap();
    let src = "let d = Dataset([#{ text: \"a record of some length, repeated\" }]);\nloop { d = d.concat(d); }";
    let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), src)).arg("--max-memory=256M").to_owned_cmd(), 120);
    one_line_error(&o, "memory limit reached");
    assert!(took < Duration::from_secs(60), "{took:?}");
    // A folder nested 70 deep: the walk stops at its depth bound.
    let mut d = t.path().join("deep");
    for i in 0..70 {
        d = d.join(format!("d{i}"));
    }
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("x.jsonl"), "{\"text\": \"a\"}\n").unwrap();
    let (o, took) = run_within(qscript(t.path()).arg(recipe(t.path(), "load_dataset(\"deep\");")).to_owned_cmd(), 30);
    one_line_error(&o, "folders nested deeper than 64 levels");
    assert!(took < Duration::from_secs(10));
}

/// `Command` by value from a `&mut Command` chain.
trait Owned {
    fn to_owned_cmd(&mut self) -> Command;
}

impl Owned for Command {
    fn to_owned_cmd(&mut self) -> Command {
        let mut c = Command::new(self.get_program());
        c.args(self.get_args());
        if let Some(d) = self.get_current_dir() {
            c.current_dir(d);
        }
        for (k, v) in self.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

/// Issue 17's atomicity hole: `save_pretrained` into an existing adapter folder, killed at
/// moments spread over the run, leaves the old pair (config + weights) or the new pair, never
/// new weights beside the old `adapter_config.json`.
#[cfg(unix)]
#[test]
fn save_pretrained_over_an_existing_adapter_survives_a_kill_at_any_moment() {
    let t = tempfile::tempdir().unwrap();
    common::tiny_chat_model(&t.path().join("tiny"));
    let save = |alpha: u32, out: &str| format!("set_seed(1);\nlet m = get_peft_model(load_model(\"tiny\"), LoraConfig(#{{ r: 2, lora_alpha: {alpha} }}));\nm.save_pretrained(\"{out}\");");
    let pair = |d: &str| ["adapter_config.json", "adapter_model.safetensors"].map(|f| std::fs::read(t.path().join(d).join(f)).unwrap_or_default());
    for (alpha, out) in [(8, "a8"), (16, "a16")] {
        let (o, _) = run_within(qscript(t.path()).arg(recipe(t.path(), &save(alpha, out))).to_owned_cmd(), 120);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (old, new) = (pair("a8"), pair("a16"));
    assert_ne!(old[0], new[0]);
    let reset = || {
        let _ = std::fs::remove_dir_all(t.path().join("ad"));
        std::fs::create_dir_all(t.path().join("ad")).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(t.path().join("a8").join(f), t.path().join("ad").join(f)).unwrap();
        }
    };
    // How long a whole save takes, then kills spread over it.
    reset();
    let src = recipe(t.path(), &save(16, "ad"));
    let (o, full) = run_within(qscript(t.path()).arg(&src).to_owned_cmd(), 120);
    assert!(o.status.success());
    assert_eq!(pair("ad"), new);
    let (mut saw_old, mut saw_new) = (0, 0);
    for i in 0..12 {
        reset();
        let mut child = qscript(t.path()).arg(&src).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(full.mul_f64(0.3 + 0.7 * i as f64 / 12.0));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        let got = pair("ad");
        if got == old {
            saw_old += 1;
        } else if got == new {
            saw_new += 1;
        } else {
            panic!("kill {i}: a mixed adapter folder (config {} bytes, weights {} bytes)", got[0].len(), got[1].len());
        }
    }
    eprintln!("after 12 kills: {saw_old} old, {saw_new} new");
    // The next run sweeps what a kill left and saves.
    let (o, _) = run_within(qscript(t.path()).arg(&src).to_owned_cmd(), 120);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pair("ad"), new);
    let left: Vec<String> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".ad")).collect();
    assert!(left.is_empty(), "temporaries left beside the folder: {left:?}");
}

/// Ctrl-C wins at the first press even inside one long native call (a `generate` of many
/// tokens is one Rhai operation): the generation loop checks it between tokens.
#[cfg(unix)]
#[test]
fn the_first_ctrl_c_stops_a_long_native_call() {
    let t = tempfile::tempdir().unwrap();
    common::tiny_chat_model(&t.path().join("tiny"));
    let cfg = std::fs::read_to_string(t.path().join("tiny/config.json")).unwrap().replace("\"max_position_embeddings\":1024", "\"max_position_embeddings\":40000");
    std::fs::write(t.path().join("tiny/config.json"), cfg).unwrap();
    let src = "let m = load_model(\"tiny\");\nprint(\"loaded\");\nm.generate(\"Hi\", #{ max_new_tokens: 32768, do_sample: true, seed: 1 });\nprint(\"finished\");";
    let mut child = qscript(t.path()).arg(recipe(t.path(), src)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "loaded\n");
    std::thread::sleep(Duration::from_millis(300)); // inside generate
    let t0 = Instant::now();
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    while child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "still running 10 s after Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{e}");
    assert!(e.contains("interrupted"), "{e}");
    // Stopped by the check between tokens, well before the 2 s grace period ends the process.
    assert!(took < Duration::from_millis(1500), "{took:?}: {e}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(!rest.contains("finished"));
}
