//! A process on a pseudo-terminal, as a user's shell would run it: its stdin, stdout and stderr
//! are the terminal, it leads its own session, so Ctrl-C (byte 0x03) reaches it as SIGINT when
//! the terminal is in cooked mode and as a key when rustyline reads. Answers the terminal's
//! cursor-position query (rustyline asks at each prompt) as a terminal would.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub struct Pty {
    master: std::fs::File,
    pub child: Child,
    rx: Receiver<Vec<u8>>,
    raw: Vec<u8>,
    /// Everything the process wrote, escape sequences removed.
    pub transcript: String,
    /// How much of the transcript `expect` has consumed.
    seen: usize,
}

/// Text without ANSI escape sequences and carriage returns.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\x1b' => match it.next() {
                Some('[') => {
                    for d in it.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    for d in it.by_ref() {
                        if d == '\x07' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

impl Pty {
    pub fn spawn(mut cmd: Command) -> Pty {
        let (mut m, mut s) = (0, 0);
        let size = libc::winsize { ws_row: 40, ws_col: 200, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: out-pointers to two ints and a valid winsize; no name buffer.
        let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(r, 0, "openpty failed");
        // SAFETY: openpty returned two fresh descriptors we now own.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .env("TERM", "xterm");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd); // closes our copies of the slave side
        let master = std::fs::File::from(master);
        let (mut reader, mut answer) = (master.try_clone().unwrap(), master.try_clone().unwrap());
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if buf[..n].windows(4).any(|w| w == b"\x1b[6n") {
                    let _ = answer.write_all(b"\x1b[1;1R");
                }
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Pty { master, child, rx, raw: Vec::new(), transcript: String::new(), seen: 0 }
    }

    fn pump(&mut self, wait: Duration) -> bool {
        match self.rx.recv_timeout(wait) {
            Ok(bytes) => {
                self.raw.extend_from_slice(&bytes);
                self.transcript = strip_ansi(&String::from_utf8_lossy(&self.raw));
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until `needle` appears after what was consumed; returns the text up to and
    /// including it. Panics with the transcript after `secs`.
    pub fn expect(&mut self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(i) = self.transcript[self.seen..].find(needle) {
                let end = self.seen + i + needle.len();
                let got = self.transcript[self.seen..end].to_string();
                self.seen = end;
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("timed out waiting for {needle:?}; transcript:\n{}", self.transcript);
            }
            self.pump(left.min(Duration::from_millis(200)));
        }
    }

    /// Waits until the transcript holds `n` more characters than what `expect` consumed (output
    /// still coming); false if it did not within `secs`.
    pub fn output_beyond(&mut self, n: usize, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.transcript.len() < self.seen + n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.pump(left.min(Duration::from_millis(200)));
        }
        true
    }

    /// Types `s` (a line needs its own "\r", as the Enter key sends).
    pub fn send(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
        self.master.flush().unwrap();
    }

    pub fn line(&mut self, s: &str) {
        self.send(&format!("{s}\r"));
    }

    /// Waits for the process to end; its exit status.
    pub fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                while self.pump(Duration::from_millis(50)) {}
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("process did not exit; transcript:\n{}", self.transcript);
            }
            self.pump(Duration::from_millis(50));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
