//! The REPL's pause as a user lives it, on a pseudo-terminal (tests/common/pty.rs): Ctrl-C (the
//! byte 0x03, which the terminal turns into SIGINT) during `trainer.train()` pauses the run;
//! the user evaluates, chats, previews data, changes the callbacks, presses Ctrl-C at the
//! prompt, tries `train()` again by mistake; `trainer.resume()` then ends with the adapter
//! bytes and the metrics of a run that was never paused (trained in the same session).

mod common;

use common::pty::Pty;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Sends `line` followed by an expression printing `MARK<n>` (typed as `"MA" + "RK<n>"`, so
/// the echo of the typed line never matches), waits for that mark; the output before it.
fn step(p: &mut Pty, n: &mut usize, line: &str, secs: u64) -> String {
    *n += 1;
    p.line(&format!("{line} \"MA\" + \"RK{n}\""));
    let out = p.expect(&format!("MARK{n}"), secs);
    // The next prompt: rustyline reads keys again (typed-ahead input is not at risk).
    p.expect(">> ", 30);
    out
}

/// The loss entries in `out/metrics.jsonl`.
fn logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count()).unwrap_or(0)
}

/// A model, a trainer writing into `out` (logs every step, evaluates every 4, saves every 5; a
/// slow on_step_end so a Ctrl-C lands mid-run), under names suffixed with `k`.
fn setup(p: &mut Pty, n: &mut usize, k: &str, model: &Path, out: &Path) {
    step(
        p,
        n,
        &format!("let m{k} = get_peft_model(load_model(\"{}\"), LoraConfig(#{{ r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: \"all-linear\" }}));", model.display()),
        120,
    );
    step(
        p,
        n,
        &format!(
            "let t{k} = SFTTrainer(m{k}, data, TrainingArguments(#{{ output_dir: \"{}\", max_steps: 12, per_device_train_batch_size: 4, learning_rate: 1e-3, \
             logging_steps: 1, eval_strategy: \"steps\", eval_steps: 4, save_steps: 5, lr_scheduler_type: \"cosine\", warmup_steps: 2 }}), \
             #{{ eval_dataset: data, callbacks: #{{ on_step_end: |s| {{ let i = 0; while i < 200000 {{ i += 1; }} }} }} }});",
            out.display()
        ),
        120,
    );
}

#[test]
fn ctrl_c_pauses_training_in_the_repl_and_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_chat_model(&model);
    let data = tmp.path().join("data.jsonl");
    common::write_conversations(&data, 24);
    let (ref_out, out) = (tmp.path().join("ref"), tmp.path().join("run"));

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qscript"));
    // Run in the temp folder: the REPL reads and writes inside its working directory (issue 17).
    cmd.current_dir(tmp.path()).arg("repl").env("XDG_DATA_HOME", tmp.path().join("xdg")).env("QSCRIPT_QUIET", "1");
    let mut p = Pty::spawn(cmd);
    let n = &mut 0;
    p.expect(">> ", 60);
    step(&mut p, n, &format!("let data = load_dataset(\"{}\");", data.display()), 60);

    // The reference: the same run, never paused.
    setup(&mut p, n, "0", &model, &ref_out);
    step(&mut p, n, &format!("let r0 = t0.train(); m0.save_pretrained(\"{}/adapter\");", ref_out.display()), 300);
    let want = std::fs::read(ref_out.join("adapter/adapter_model.safetensors")).unwrap();
    let want_metrics = common::metrics_without_timing(&ref_out);
    assert_eq!(want_metrics.iter().filter(|e| e.get("eval_loss").is_some()).count(), 3);

    // Ctrl-C once three steps are logged.
    setup(&mut p, n, "1", &model, &out);
    p.line("let r1 = t1.train(); print(`PAUSED ${r1.paused} AT ${r1.global_step} END`);");
    let t = Instant::now();
    while logged(&out) < 3 {
        assert!(t.elapsed() < Duration::from_secs(300), "training did not log 3 steps; transcript:\n{}", p.transcript);
        std::thread::sleep(Duration::from_millis(5));
    }
    p.send("\x03");
    let said = p.expect("PAUSED true AT ", 120);
    assert!(said.contains("paused at step") && said.contains("trainer.resume()"), "{said}");
    let at: usize = p.expect(" END", 10).trim_end_matches(" END").trim().parse().unwrap();
    p.expect(">> ", 30);
    assert!((3..12).contains(&at), "paused at {at}");
    assert!(p.child.try_wait().unwrap().is_none(), "the REPL is still there");
    let adapter_at_pause = {
        step(&mut p, n, &format!("m1.save_pretrained(\"{}/at_pause\");", tmp.path().display()), 60);
        std::fs::read(tmp.path().join("at_pause/adapter_model.safetensors")).unwrap()
    };
    assert!(adapter_at_pause != want, "the run really stopped early");

    // While paused: where it stopped, evaluate, chat, preview data, new callbacks.
    assert!(step(&mut p, n, "print(`AT=${t1.paused_at()}`);", 30).contains(&format!("AT={at}")));
    let ev = step(&mut p, n, "print(`EVAL=${t1.evaluate().eval_loss}`);", 60);
    let ev: f64 = ev[ev.rfind("EVAL=").unwrap() + 5..].lines().next().unwrap().trim().parse().unwrap();
    assert!(ev.is_finite());
    step(&mut p, n, "m1.chat(\"hi\", #{ max_new_tokens: 4 });", 60);
    step(&mut p, n, "data.preview(m1, 0);", 60);
    step(&mut p, n, "t1.set_callbacks(#{ on_log: |e| print(`LOGGED ${e.step}`) });", 30);
    // Ctrl-C at the prompt only clears the line; train() by mistake is refused.
    p.send("\x03");
    p.expect(">> ", 30);
    p.line("t1.train();");
    let refused = p.expect("continues it", 30);
    p.expect(">> ", 30);
    assert!(refused.contains(&format!("paused at step {at}")) && refused.contains("trainer.resume()"), "{refused}");
    assert!(step(&mut p, n, "print(`AT=${t1.paused_at()}`);", 30).contains(&format!("AT={at}")));

    // Resume: to the end, with the new callbacks.
    let done = step(&mut p, n, &format!("let r = t1.resume(); print(`DONE ${{r.global_step}} ${{r.paused}}`); m1.save_pretrained(\"{}/adapter\");", out.display()), 300);
    assert!(done.contains("DONE 12 false"), "{done}");
    assert!(done.contains("LOGGED 12") && done.contains(&format!("LOGGED {}", at + 1)), "the new on_log ran: {done}");
    let got = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(got == want, "adapter after pause + resume differs from the uninterrupted run");
    assert_eq!(common::metrics_without_timing(&out), want_metrics, "losses, learning rates, gradient norms and evaluations of every step");
    for s in [5, 10, 12] {
        let a = std::fs::read(out.join(format!("checkpoint-{s}/adapter_model.safetensors"))).unwrap();
        assert!(a == std::fs::read(ref_out.join(format!("checkpoint-{s}/adapter_model.safetensors"))).unwrap(), "checkpoint-{s}");
    }

    p.line(":quit");
    assert!(p.wait(30).success(), "{}", p.transcript);
}
