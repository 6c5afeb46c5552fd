//! Crash cases of issue 17 outside the model code, each a one-line error (or a quiet, defined
//! exit) now: deeply nested values, a closed stdout pipe, an unwritable stderr, an unexpected
//! panic, a FIFO and a symlink loop as datasets, and loops that grow values without bound.

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
