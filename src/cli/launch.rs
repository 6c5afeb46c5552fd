//! `qscript RECIPE --nproc-per-node N`: torchrun's job for this binary. Starts N copies of the
//! same command (without the launcher's flags), each with torchrun's environment (`RANK`,
//! `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; NVLink multicast
//! off: `NCCL_NVLS_ENABLE=0`), and watches them: the first rank that fails makes the launcher stop
//! the others and exit with an error naming it. After Ctrl-C (which the terminal sends every rank)
//! the ranks are left to write their checkpoint, within a bound.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// torchrun's flags (single node: `--nproc-per-node` alone; several: every node runs the launcher
/// with its `--node-rank` and the same `--nnodes`, `--master-addr`, `--master-port`).
#[derive(clap::Args, Clone, Default, Debug)]
pub struct LaunchArgs {
    /// Start N processes of this run on this machine (one per GPU: cuda:LOCAL_RANK), data-parallel
    #[arg(long = "nproc-per-node", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub nproc_per_node: Option<u32>,
    /// Machines in the run (with --nproc-per-node)
    #[arg(long, value_name = "M", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub nnodes: u32,
    /// This machine's index among --nnodes
    #[arg(long = "node-rank", value_name = "K", default_value_t = 0)]
    pub node_rank: u32,
    /// Rank 0's machine: where the ranks meet (default 127.0.0.1)
    #[arg(long = "master-addr", value_name = "HOST")]
    pub master_addr: Option<String>,
    /// The port ranks meet on (default: a free one on a single machine, 29500 with --nnodes)
    #[arg(long = "master-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub master_port: Option<u16>,
}

/// The launcher's own command line, passed to its ranks (fields split by U+001F).
pub const LAUNCHER_ARGV: &str = "QSCRIPT_LAUNCHER_ARGV";

/// The command line a run records: the launcher's for a rank it started, else this process's.
pub fn recorded_argv() -> Vec<String> {
    match std::env::var(LAUNCHER_ARGV) {
        Ok(s) if std::env::var_os("RANK").is_some() => s.split('\u{1f}').map(String::from).collect(),
        _ => std::env::args().collect(),
    }
}

/// Flags the children do not get (they are the ranks, not launchers).
const LAUNCHER_FLAGS: [&str; 5] = ["--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"];

/// `argv` without the launcher's flags (`--flag V` and `--flag=V`), program name dropped.
pub fn child_args(argv: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in argv.iter().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        let s = a.to_string_lossy();
        if LAUNCHER_FLAGS.contains(&s.as_ref()) {
            skip = true;
        } else if !LAUNCHER_FLAGS.iter().any(|f| s.starts_with(&format!("{f}="))) {
            out.push(a.clone());
        }
    }
    out
}

/// How long ranks get to finish after Ctrl-C (their own grace is 2 s, plus the checkpoint).
const AFTER_CTRL_C: Duration = Duration::from_secs(60);
/// After a rank fails, how long the others get to fail in turn (a lost peer is seen at once)
/// before they are killed: the launcher then names the rank that failed first, not one that
/// failed because of it (exit status [`EXIT_PEER_LOST`]).
const AFTER_FAILURE: Duration = Duration::from_secs(1);
use crate::train::distributed::EXIT_PEER_LOST;

/// Runs the ranks of this machine to the end; an error names the first rank that failed.
pub fn run(l: &LaunchArgs, cancelled: &dyn Fn() -> bool) -> Result<()> {
    let n = l.nproc_per_node.context("--nproc-per-node")? as usize;
    if std::env::var_os("RANK").is_some() && std::env::var_os("WORLD_SIZE").is_some() {
        bail!("--nproc-per-node: this process is already rank {} of a launched run (RANK is set)", std::env::var("RANK").unwrap_or_default());
    }
    let (nnodes, node) = (l.nnodes as usize, l.node_rank as usize);
    if node >= nnodes {
        bail!("--node-rank {node} is not below --nnodes {nnodes}");
    }
    let addr = l.master_addr.clone().unwrap_or_else(|| crate::train::distributed::DEFAULT_MASTER_ADDR.into());
    let port = match l.master_port {
        Some(p) => p,
        None if nnodes == 1 => crate::train::distributed::tcp::free_port()?,
        None => crate::train::distributed::DEFAULT_MASTER_PORT,
    };
    let exe = std::env::current_exe().context("--nproc-per-node: cannot find this executable")?;
    let args = child_args(&std::env::args_os().collect::<Vec<_>>());
    let world = n * nnodes;
    eprintln!("launching {n} rank(s) on this machine (WORLD_SIZE {world}, ranks {}..{}, rendezvous {addr}:{port})", node * n, node * n + n - 1);
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for local in 0..n {
        let rank = node * n + local;
        let mut c = Command::new(&exe);
        c.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("GROUP_RANK", node.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string())
            // What the run records as its command (and repeats in the command that resumes it).
            .env(LAUNCHER_ARGV, std::env::args().collect::<Vec<_>>().join("\u{1f}"));
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            c.env("NCCL_NVLS_ENABLE", "0");
        }
        match c.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                stop(&mut children);
                bail!("--nproc-per-node: cannot start rank {rank}: {e}");
            }
        }
    }
    watch(children, cancelled)
}

/// Kills (SIGKILL) and reaps every child still running.
fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

fn describe(s: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({s})"),
    }
}

fn first_failure_message(rank: usize, status: &ExitStatus) -> String {
    format!("rank {rank} {} (the first rank to fail); the other ranks stopped too", describe(status))
}

/// Polls the ranks: all succeed → Ok; the first failure stops the others at once (or, after
/// Ctrl-C, lets them finish their checkpoint first, bounded by [`AFTER_CTRL_C`]).
pub fn watch(mut children: Vec<(usize, Child)>, cancelled: &dyn Fn() -> bool) -> Result<()> {
    let mut failed: Option<(usize, ExitStatus)> = None;
    let mut first_failure: Option<Instant> = None;
    let mut ctrl_c: Option<Instant> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.remove(i);
                    let root = |s: &ExitStatus| s.code() != Some(EXIT_PEER_LOST);
                    if !status.success() && failed.as_ref().is_none_or(|(_, f)| !root(f) && root(&status)) {
                        failed = Some((rank, status));
                    }
                    if !status.success() {
                        first_failure.get_or_insert_with(Instant::now);
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    let rank = children[i].0;
                    stop(&mut children);
                    bail!("rank {rank}: cannot watch it: {e}");
                }
            }
        }
        if ctrl_c.is_none() && cancelled() {
            ctrl_c = Some(Instant::now());
        }
        let waited_out = ctrl_c.is_some_and(|t| t.elapsed() > AFTER_CTRL_C);
        let failure_due = first_failure.is_some_and(|t| t.elapsed() > AFTER_FAILURE) && ctrl_c.is_none();
        if failure_due || waited_out {
            let left = children.len();
            stop(&mut children);
            if let Some((rank, status)) = failed {
                bail!("{}", first_failure_message(rank, &status));
            }
            bail!("interrupted: {left} rank(s) had not stopped {}s after Ctrl-C and were killed", AFTER_CTRL_C.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match failed {
        Some((rank, status)) => bail!("{}", first_failure_message(rank, &status)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_children_run_the_same_command_without_the_launcher_flags() {
        let argv = os(&["qscript", "r.rhai", "--nproc-per-node", "2", "--set", "A=1", "--master-port=7", "--nnodes=1", "--resume"]);
        assert_eq!(child_args(&argv), os(&["r.rhai", "--set", "A=1", "--resume"]));
        let argv = os(&["qscript", "run", "--nproc-per-node=4", "r.rhai", "--node-rank", "0", "--master-addr", "h", "--device", "cpu"]);
        assert_eq!(child_args(&argv), os(&["run", "r.rhai", "--device", "cpu"]));
    }

    fn sh(script: &str) -> Child {
        Command::new("sh").arg("-c").arg(script).spawn().unwrap()
    }

    #[test]
    fn a_rank_that_fails_stops_the_others_and_is_named() {
        let t0 = Instant::now();
        let e = watch(vec![(0, sh("sleep 30")), (1, sh("sleep 0.2; exit 3")), (2, sh("sleep 30"))], &|| false).unwrap_err().to_string();
        assert_eq!(e, "rank 1 exited with status 3 (the first rank to fail); the other ranks stopped too");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // Ranks that failed because another did (status 75) are not the one named.
        let e = watch(vec![(0, sh("sleep 0.2; exit 75")), (1, sh("sleep 0.2; kill -9 $$")), (2, sh("sleep 0.3; exit 75"))], &|| false);
        assert_eq!(e.unwrap_err().to_string(), "rank 1 was killed by signal 9 (the first rank to fail); the other ranks stopped too");
        let e = watch(vec![(0, sh("kill -9 $$")), (1, sh("sleep 30"))], &|| false).unwrap_err().to_string();
        assert!(e.starts_with("rank 0 was killed by signal 9"), "{e}");
        watch(vec![(0, sh("true")), (1, sh("sleep 0.1"))], &|| false).unwrap();
    }

    #[test]
    fn after_ctrl_c_the_ranks_finish_before_the_failure_is_reported() {
        // rank 1 fails at once, rank 0 still writes its checkpoint (0.5 s): it is not killed.
        let done = std::env::temp_dir().join(format!("qscript-launch-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&done);
        let script = format!("sleep 0.5; touch {}", done.display());
        let e = watch(vec![(0, sh(&script)), (1, sh("exit 130"))], &|| true).unwrap_err().to_string();
        assert_eq!(e, "rank 1 exited with status 130 (the first rank to fail); the other ranks stopped too");
        assert!(done.exists());
        let _ = std::fs::remove_file(&done);
    }
}
