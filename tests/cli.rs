//! The binary: exit codes, one-line errors, help with examples, check, REPL on piped input.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn qscript() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
    c.env("QSCRIPT_QUIET", "1");
    c
}

fn golden_base() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base").display().to_string()
}

fn run_recipe(src: &str) -> (i32, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.rhai");
    std::fs::write(&p, src).unwrap();
    // Error formatting, not permissions (tests/permissions.rs): every access granted.
    let out = qscript().arg(&p).arg("--allow-all").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_recipes_give_one_line_errors_and_nonzero_exit() {
    let cases = [
        ("let x = ;", "bad.rhai:1:"),
        ("let m = load_model(\"/no/such/model\");", "model path not found"),
        (&format!("let m = load_model(\"{}\", #{{ dtyp: \"f32\" }});", golden_base()), "did you mean `dtype`"),
        (&format!("let m = load_model(\"{}\");\nm.generate(\"x\");", golden_base()), "bad.rhai:2:"),
        ("load_model(1, 2, 3);", "bad.rhai:1:"),
    ];
    for (src, want) in cases {
        let (code, _, err) = run_recipe(src);
        assert_eq!(code, 1, "{src}: {err}");
        assert!(err.contains(want), "{src}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{src}: not one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn missing_recipe_file_is_named() {
    let out = qscript().arg("no_such_recipe.rhai").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_recipe.rhai"));
}

#[test]
fn help_of_every_command_has_examples() {
    for args in [vec!["--help"], vec!["run", "--help"], vec!["check", "--help"], vec!["repl", "--help"], vec!["bench", "--help"]] {
        let out = qscript().args(&args).output().unwrap();
        assert!(out.status.success());
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("Examples:"), "{args:?}: {s}");
    }
}

/// `bench train` runs the trainer's step with checkpointing, offloaded by default and on the GPU
/// with `--no-offload`; its JSON says whether the inputs did go to host memory (never on the CPU).
#[test]
fn bench_train_says_whether_checkpoints_were_offloaded() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
    let mut losses = Vec::new();
    for extra in [&[][..], &["--no-offload"][..]] {
        let out = qscript()
            .args(["bench", "train", "--quant", "none", "--device", "cpu", "--batch", "1", "--seq", "8", "--steps", "1", "--gradient-checkpointing", "--model"])
            .arg(&base)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["gradient_checkpointing"], true, "{line}");
        assert_eq!(v["offload_checkpoints"], false, "the CPU has nothing to offload: {line}");
        losses.push(v["loss_last"].clone());
    }
    assert_eq!(losses[0], losses[1]);
    let out = qscript().args(["bench", "train", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--no-offload"));
}

#[test]
fn check_reports_ok_and_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = qscript().args(["check"]).arg(root.join("recipes/chat.rhai")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    let out = qscript().args(["check"]).arg(root.join("recipes/chat.rhai")).args(["--set", "NOPE=1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no top-level constant `NOPE`"));
}

#[test]
fn repl_keeps_variables_functions_and_imports_between_lines() {
    let mut child = qscript()
        .arg("repl")
        .env("HOME", tempfile::tempdir().unwrap().path()) // history goes to a throwaway dir
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = "let x = 40;\nfn add2(v) { v + 2 }\nadd2(x)\nimport \"chat\" as chat;\nchat::user(\"hi\").role + \"-role\"\nlet f = if true {\n  \"multi\"\n} else { \"no\" };\nf + \"-line\"\n:help load_model\nundefined_thing\n:quit\n";
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("42"), "{stdout}");
    assert!(stdout.contains("multi-line"), "{stdout}");
    assert!(stdout.contains("user-role"), "imports persist: {stdout}");
    assert!(stdout.contains("load_model(id_or_path"), "{stdout}");
    assert!(stderr.contains("undefined_thing"), "{stderr}");
}

#[test]
fn ctrl_c_cancels_a_running_recipe_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("long.rhai");
    std::fs::write(&p, "print(\"started\");\nlet i = 0;\nloop { i += 1; }\n").unwrap();
    let mut child = qscript().arg(&p).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until the recipe runs, then send SIGINT as a terminal's Ctrl-C would.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 8];
    std::io::Read::read(&mut stdout, &mut buf).unwrap();
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    // Named by file, line and column; which statement the signal lands in (line 2 or the loop on
    // line 3) depends on timing.
    let named = ["long.rhai:2:", "long.rhai:3:"].iter().any(|at| stderr.contains(at));
    assert!(named && stderr.contains("interrupted"), "{stderr}");
}

#[test]
fn every_shipped_recipe_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rhai") {
            let out = qscript().arg("check").arg(&p).output().unwrap();
            assert!(out.status.success(), "{}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
            n += 1;
        }
    }
    assert!(n >= 5, "chat + four training recipes, found {n}");
}

/// `qscript ARGS` in `cwd` with `home` as HOME, `input` typed into it: its output.
fn typed(cwd: &Path, home: &Path, args: &[String], input: &str) -> std::process::Output {
    let mut child = qscript()
        .current_dir(cwd)
        .args(args)
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `qscript repl` takes the permission flags of a recipe run: a dataset outside the working
/// directory is denied by default and readable with `--allow-read=DIR`.
#[test]
fn repl_takes_the_permission_flags() {
    let (cwd, outside, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let data = outside.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n{\"text\": \"world\"}\n").unwrap();
    let repl = |extra: &[String]| {
        let args: Vec<String> = std::iter::once("repl".to_string()).chain(extra.iter().cloned()).collect();
        let input = format!("\"N=\" + load_dataset(\"{}\").len()\n:quit\n", data.display());
        let out = typed(cwd.path(), home.path(), &args, &input);
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (stdout, stderr) = repl(&[]);
    assert!(!stdout.contains("N=2"), "{stdout}");
    assert!(stderr.contains("--allow-read"), "the denial names the flag: {stderr}");
    let (stdout, stderr) = repl(&[format!("--allow-read={}", outside.path().display())]);
    assert!(stdout.contains("N=2"), "{stdout}\n{stderr}");
}

/// Flags before the subcommand (`qscript -A repl`) reach the subcommand, not a recipe named `repl`.
#[test]
fn flags_before_a_subcommand_go_to_it() {
    let (cwd, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out = typed(cwd.path(), home.path(), &["--allow-all".into(), "repl".into()], "\"sum=\" + (40 + 2)\n:quit\n");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("sum=42"), "{stdout}\n{stderr}");
    assert!(!stderr.contains("cannot read recipe"), "{stderr}");
    // A file named like a subcommand is still a recipe.
    std::fs::write(cwd.path().join("check"), "print(\"recipe named check\");").unwrap();
    let out = qscript().current_dir(cwd.path()).env("HOME", home.path()).args(["--allow-all", "check"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("recipe named check"), "{}", String::from_utf8_lossy(&out.stderr));
}
