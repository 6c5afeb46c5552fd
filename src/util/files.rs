//! The files a path, a folder or a glob names (datasets): every path through the permission
//! checker, regular files only (a FIFO named `data.jsonl` would block a read forever), hidden
//! entries only when the pattern names them, symlinked folders followed once each (a loop
//! ends), and the walk bounded in entries and depth and stopped by Ctrl-C.

use super::permissions;
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Entries a walk looks at before it stops with an error.
pub const MAX_WALK_ENTRIES: usize = 200_000;
/// Folder depth of a walk.
pub const MAX_WALK_DEPTH: usize = 64;

/// A file, the files under a folder (name order, recursively) or those a glob matches; with
/// `keep` choosing which are wanted. Returns the files and how many others were passed over.
pub fn list(spec: &str, keep: &dyn Fn(&Path) -> bool) -> Result<(Vec<PathBuf>, usize)> {
    let p = Path::new(spec);
    let globbed = spec.contains(['*', '?', '[']);
    // The permission check comes before any look at the path.
    permissions::read(&if globbed { literal_prefix(spec) } else { p.to_path_buf() })?;
    // Hidden entries are walked only when the pattern names one.
    let hidden = globbed && spec.split('/').any(|c| c.starts_with('.') && c != "." && c != "..");
    if p.is_dir() {
        let mut w = Walk { hidden: false, ..Default::default() };
        w.dir(p, 0, &|_| true)?;
        return Ok(w.split(keep));
    }
    if p.symlink_metadata().is_ok() {
        if !p.is_file() {
            bail!("{spec}: not a regular file");
        }
        return Ok(if keep(p) { (vec![p.to_path_buf()], 0) } else { (vec![], 1) });
    }
    if !globbed {
        bail!("{spec}: no such file or directory");
    }
    let pattern = glob::Pattern::new(spec).map_err(|e| anyhow::anyhow!("{spec}: bad glob pattern: {e}"))?;
    let base = literal_prefix(spec);
    let opts = glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: true };
    let mut w = Walk { hidden, ..Default::default() };
    // A pattern without a folder part walks `.`; its matches are named without `./`.
    let bare = base == Path::new(".") && !spec.starts_with("./");
    let unbare = |f: &Path| if bare { f.strip_prefix(".").unwrap_or(f).to_path_buf() } else { f.to_path_buf() };
    if base.is_dir() {
        w.dir(&base, 0, &|f| pattern.matches_path_with(&unbare(f), opts))?;
    }
    if w.files.is_empty() {
        bail!("{spec}: no files match");
    }
    w.files = w.files.iter().map(|f| unbare(f)).collect();
    w.files.sort();
    Ok(w.split(keep))
}

/// The folder part of a glob before its first wildcard (`.` when it starts with one).
fn literal_prefix(spec: &str) -> PathBuf {
    let mut base = PathBuf::new();
    for c in Path::new(spec).components() {
        if c.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
            break;
        }
        base.push(c);
    }
    if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    }
}

#[derive(Default)]
struct Walk {
    /// Walk hidden entries too (the glob names one; its matcher still wants the dot literal).
    hidden: bool,
    files: Vec<PathBuf>,
    seen_dirs: HashSet<PathBuf>,
    entries: usize,
    others: usize,
}

impl Walk {
    /// The regular files under `dir` that `matches`, in name order; hidden entries passed over
    /// unless `hidden`; symlinks followed only where the recipe may read, each folder once.
    fn dir(&mut self, dir: &Path, depth: usize, matches: &dyn Fn(&Path) -> bool) -> Result<()> {
        crate::check_limits()?;
        if depth > MAX_WALK_DEPTH {
            bail!("{}: folders nested deeper than {MAX_WALK_DEPTH} levels", dir.display());
        }
        let real = dir.canonicalize().with_context(|| format!("{}: cannot read directory", dir.display()))?;
        if !self.seen_dirs.insert(real) {
            return Ok(()); // a symlink loop, or a folder linked twice
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot read directory", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| self.hidden || !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
            .collect();
        entries.sort();
        for e in entries {
            self.entries += 1;
            if self.entries > MAX_WALK_ENTRIES {
                bail!("{}: more than {MAX_WALK_ENTRIES} entries; name fewer files or a smaller folder", dir.display());
            }
            if e.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) && permissions::read(&e).is_err() {
                self.others += 1; // leads outside what the recipe may read: not followed
                continue;
            }
            if e.is_dir() {
                self.dir(&e, depth + 1, matches)?;
            } else if e.is_file() && matches(&e) {
                self.files.push(e);
            } else {
                self.others += 1;
            }
        }
        Ok(())
    }

    fn split(self, keep: &dyn Fn(&Path) -> bool) -> (Vec<PathBuf>, usize) {
        let total = self.files.len() + self.others;
        let files: Vec<PathBuf> = self.files.into_iter().filter(|f| keep(f)).collect();
        let n = files.len();
        (files, total - n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn symlink_loops_end_and_fifos_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("a.jsonl"), "{}").unwrap();
        std::fs::write(d.join(".hidden.jsonl"), "{}").unwrap();
        std::os::unix::fs::symlink(&d, d.join("sub/loop")).unwrap();
        let (files, _) = list(d.to_str().unwrap(), &|_| true).unwrap();
        assert_eq!(files, vec![d.join("a.jsonl")]);
        let fifo = t.path().join("data.jsonl");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = list(fifo.to_str().unwrap(), &|_| true).unwrap_err().to_string();
        assert!(e.ends_with("not a regular file"), "{e}");
        // A FIFO inside a folder is passed over, not opened.
        std::process::Command::new("mkfifo").arg(d.join("pipe.jsonl")).status().unwrap();
        let (files, others) = list(d.to_str().unwrap(), &|_| true).unwrap();
        assert_eq!((files.len(), others), (1, 1));
    }

    #[test]
    fn globs_skip_hidden_files_unless_named() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("x/.git")).unwrap();
        std::fs::write(t.path().join("x/a.jsonl"), "{}").unwrap();
        std::fs::write(t.path().join("x/.b.jsonl"), "{}").unwrap();
        std::fs::write(t.path().join("x/.git/c.jsonl"), "{}").unwrap();
        let g = format!("{}/**/*.jsonl", t.path().display());
        let (files, _) = list(&g, &|_| true).unwrap();
        assert_eq!(files, vec![t.path().join("x/a.jsonl")]);
        let named = format!("{}/x/.b.jsonl", t.path().display());
        assert_eq!(list(&named, &|_| true).unwrap().0.len(), 1);
        let named = format!("{}/x/.b*", t.path().display());
        assert_eq!(list(&named, &|_| true).unwrap().0, vec![t.path().join("x/.b.jsonl")]);
    }
}
