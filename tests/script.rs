//! The Rhai host: error positions, strict config maps, overrides, static checks, stdlib, limits.

use qscript::script::{Host, Limits};
use std::path::{Path, PathBuf};

fn write_recipe(dir: &Path, name: &str, src: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, src).unwrap();
    p
}

fn run(src: &str) -> Result<(), String> {
    run_with(src, &[])
}

fn run_with(src: &str, sets: &[(&str, &str)]) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(tmp.path(), "recipe.rhai", src);
    let host = Host::for_recipe(&p, &Limits::default());
    let sets: Vec<(String, String)> = sets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    host.run_file(&p, &sets).map_err(|e| {
        // Errors name the file by its full path; tests compare from the file name on.
        format!("{e:#}").replace(&format!("{}/", tmp.path().display()), "")
    })
}

fn check(src: &str) -> Result<usize, String> {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(tmp.path(), "recipe.rhai", src);
    let host = Host::for_recipe(&p, &Limits::default());
    host.check_file(&p, &[])
        .map(|r| r.maps_checked)
        .map_err(|e| format!("{e:#}").replace(&format!("{}/", tmp.path().display()), ""))
}

fn golden_base() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base").display().to_string()
}

#[test]
fn syntax_error_has_line_and_column() {
    let e = run("let x = 1;\nlet y = (2 + ;\n").unwrap_err();
    assert!(e.starts_with("recipe.rhai:2:"), "{e}");
    assert!(e.contains("syntax error"), "{e}");
    assert_eq!(e.lines().count(), 1);
}

#[test]
fn runtime_error_points_at_the_call() {
    let e = run("let a = 1;\n\n   let m = load_model(\"/no/such/model\");\n").unwrap_err();
    assert!(e.starts_with("recipe.rhai:3:12: "), "{e}");
    assert!(e.contains("/no/such/model"), "{e}");
}

#[test]
fn error_inside_script_function_points_inside_it() {
    let e = run("fn f(x) {\n  x + undefined_var\n}\nf(1);\n").unwrap_err();
    assert!(e.starts_with("recipe.rhai:2:"), "{e}");
    assert!(e.contains("undefined_var"), "{e}");
}

#[test]
fn unknown_config_key_names_nearest() {
    let e = run(&format!("let m = load_model(\"{}\", #{{ dtpye: \"float32\" }});", golden_base())).unwrap_err();
    assert!(e.starts_with("recipe.rhai:1:"), "{e}");
    assert!(e.contains("unknown key `dtpye`") && e.contains("did you mean `dtype`"), "{e}");
}

#[test]
fn check_looks_inside_gradient_checkpointing_kwargs() {
    let ok = "let a = TrainingArguments(#{ output_dir: \"o\", gradient_checkpointing: true, gradient_checkpointing_kwargs: #{ offload: false } });";
    assert_eq!(check(ok), Ok(1));
    let bad = "let a = TrainingArguments(#{ output_dir: \"o\",\n  gradient_checkpointing_kwargs: #{ offlaod: false } });";
    let e = check(bad).unwrap_err();
    assert!(e.starts_with("recipe.rhai:2:") && e.contains("TrainingArguments: gradient_checkpointing_kwargs: unknown key `offlaod`; did you mean `offload`?"), "{e}");
    let e = check("let a = SFTConfig(#{ output_dir: \"o\", gradient_checkpointing_kwargs: #{ offload: 1 } });").unwrap_err();
    assert!(e.contains("gradient_checkpointing_kwargs: `offload` must be true or false, got an integer"), "{e}");
}

#[test]
fn wrong_value_type_names_expected_type() {
    let e = run(&format!("let m = load_model(\"{}\", #{{ dtype: 32 }});", golden_base())).unwrap_err();
    assert!(e.contains("`dtype` must be one of") && e.contains("the integer 32"), "{e}");
}

#[test]
fn wrong_argument_type_is_clear() {
    let e = run("let m = load_model(42);").unwrap_err();
    assert!(e.starts_with("recipe.rhai:1:"), "{e}");
    assert!(e.contains("load_model"), "{e}");
}

#[test]
fn model_forward_and_config_from_script() {
    run(&format!(
        r#"
        let m = load_model("{}");
        let logits = m.forward([1, 2, 3]);
        if logits.len() != 3 || logits[0].len() != 256 {{ throw "bad logits shape"; }}
        let c = m.config();
        if c.hidden_size != 64 {{ throw "bad config"; }}
        let s = m.summary();
        if !s.contains("parameters") {{ throw "bad summary: " + s; }}
        "#,
        golden_base()
    ))
    .unwrap();
}

#[test]
fn out_of_range_token_id_is_an_error_not_a_panic() {
    let e = run(&format!("let m = load_model(\"{}\"); m.forward([1, 9999]);", golden_base())).unwrap_err();
    assert!(e.contains("9999") && e.contains("vocab_size 256"), "{e}");
}

#[test]
fn set_overrides_constants_with_their_type() {
    let src = "const N = 3;\nconst NAME = \"a\";\nif N != 7 { throw `N is ${N}`; }\nif NAME != \"zz\" { throw \"NAME\"; }\n";
    run_with(src, &[("N", "7"), ("NAME", "zz")]).unwrap();
    let e = run_with(src, &[("N", "seven")]).unwrap_err();
    assert!(e.contains("--set N=seven") && e.contains("integer"), "{e}");
    let e = run_with(src, &[("NN", "1")]).unwrap_err();
    assert!(e.contains("no top-level constant `NN`") && e.contains("did you mean `N`"), "{e}");
}

#[test]
fn check_validates_literal_maps_without_loading() {
    // The model path does not exist: check must not try to load it.
    let n = check("let m = load_model(\"/no/such\", #{ dtype: \"bf16\" });\nm.generate(\"hi\", #{ max_new_tokens: 5, stop: [\"\\n\"] });").unwrap();
    assert_eq!(n, 2);
    let e = check("let m = load_model(\"/no/such\");\nm.chat(\"hi\", #{\n  max_new_tokns: 5 });").unwrap_err();
    assert!(e.starts_with("recipe.rhai:3:3: ") && e.contains("did you mean `max_new_tokens`"), "{e}");
    let e = check("let m = load_model(\"x\");\nm.generate(\"hi\", #{ temperature: \"hot\" });").unwrap_err();
    assert!(e.contains("`temperature` must be a number"), "{e}");
    let e = check("fn f(m) { m.generate(\"x\", #{ topk: 1 }) }").unwrap_err();
    assert!(e.contains("unknown key `topk`") && e.contains("top_k"), "{e}");
}

#[test]
fn stdlib_module_is_importable() {
    run("import \"chat\" as chat;\nif type_of(chat::ask) == \"\" { throw \"x\"; }").unwrap_err(); // chat::ask is a function, not a value
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(tmp.path(), "r.rhai", "import \"chat\" as chat;\nlet x = 1;");
    Host::for_recipe(&p, &Limits::default()).run_file(&p, &[]).unwrap();
}

#[test]
fn local_module_import_resolves_next_to_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    write_recipe(tmp.path(), "helpers.rhai", "fn double(x) { x * 2 }");
    let p = write_recipe(tmp.path(), "main.rhai", "import \"helpers\" as h;\nif h::double(21) != 42 { throw \"bad\"; }");
    Host::for_recipe(&p, &Limits::default()).run_file(&p, &[]).unwrap();
}

#[test]
fn runaway_loop_stops_with_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_recipe(tmp.path(), "loop.rhai", "let i = 0;\nloop { i += 1; }");
    let host = Host::for_recipe(&p, &Limits { max_operations: 100_000 });
    let e = format!("{:#}", host.run_file(&p, &[]).unwrap_err());
    assert!(e.contains("loop.rhai:2:") && e.contains("--max-operations"), "{e}");
}

#[test]
fn huge_string_hits_the_size_limit() {
    let e = run("let s = \"x\";\nloop { s += s; }").unwrap_err();
    assert!(e.contains("recipe.rhai:2:") && e.to_lowercase().contains("length"), "{e}");
}

#[test]
fn deep_recursion_hits_the_call_limit() {
    let e = run("fn f(n) { f(n + 1) }\nf(0);").unwrap_err();
    assert!(e.contains("recipe.rhai:") && e.to_lowercase().contains("call"), "{e}");
}

#[test]
fn every_registered_function_is_documented() {
    let host = Host::new(None, &Limits::default());
    for d in &host.docs {
        assert!(!d.doc.is_empty() && d.signature.contains(&d.name), "{d:?}");
    }
    for f in ["load_model", "generate", "chat", "apply_chat_template", "set_chat_template", "tokenize", "decode", "forward", "config", "summary"] {
        assert!(host.docs.iter().any(|d| d.name == f), "{f} undocumented");
    }
}
