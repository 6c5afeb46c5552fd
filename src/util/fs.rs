//! The one home of file writing. Whatever qscript writes appears whole or not at all: it is
//! written under a temporary name next to its final place (same filesystem, so a rename moves
//! it), fsynced, and renamed in. A crash leaves at most a `.<name>.tmp-…` entry beside the
//! target, never a half-written file or directory; an error leaves the target untouched and
//! removes the temporary.
//!
//! - [`write`] / [`write_with`]: a file from bytes or from a writer of a [`File`].
//! - [`install_file`]: a file from a writer that wants a path (safetensors, image encoders).
//! - [`install_dir`]: a directory built by a closure, then swapped or merged into place.
//! - [`Temp`]: a temporary file or directory removed on drop.
//! - [`remove_entry`]: a file or directory removed without a half-removed state.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What an install does when its target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Put the new one in its place whole: a file by one rename; a directory (or a file over
    /// a directory) by moving the old one aside, renaming the new one in, removing the old one.
    Replace,
    /// Directories: the new entries replace those of the same name, other entries stay; the
    /// result is installed whole as with `Replace` (the kept entries are hard-linked into the
    /// new directory first), so a kill never leaves new weights beside an old config. Where the
    /// directory cannot be swapped (a mount point), each entry is renamed in (data first,
    /// `.json` last). A file behaves as with `Replace`.
    Merge,
    /// Keep what is there (another writer finished first) and drop the new one.
    Keep,
    /// Fail with `<path>: already exists`.
    Refuse,
}

/// Write `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| f.write_all(bytes).with_context(|| format!("{}: write failed", path.display())))
}

/// Stream into `path` atomically: `write` fills a fresh temp file; its error is returned as is
/// and leaves `path` untouched.
pub fn write_with(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    install_file(path, Existing::Replace, |tmp| {
        let mut f = File::create(tmp).with_context(|| format!("{}: cannot create", path.display()))?;
        write(&mut f)
    })
}

/// A file at `path` from a writer that wants a path: `write` creates the file at the path it
/// is given (a fresh name next to `path`, ending in `path`'s extension so writers that pick a
/// format from it work); it is fsynced and moved in per `existing`. The parent must exist.
pub fn install_file(path: &Path, existing: Existing, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check(path, existing, false)?;
    let tmp = Temp::next_to(path, "tmp")?;
    write(tmp.path())?;
    File::open(tmp.path()).and_then(|f| f.sync_all()).with_context(|| format!("{}: fsync failed", path.display()))?;
    put_in_place(tmp, path, existing)
}

/// A directory at `dir` built by `write` in a fresh temp directory next to it (parents are
/// created), then fsynced with every file made 0644 (readable whatever the umask; safetensors'
/// writer makes 0600 files) and moved in per `existing`.
pub fn install_dir(dir: &Path, existing: Existing, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = resolve(dir, existing)?;
    check(&dir, existing, true)?;
    let (parent, name) = split(&dir)?;
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create directory", parent.display()))?;
    remove_stale_temps(&dir, STALE_AGE);
    let tmp = Temp::dir_in(parent, &name)?;
    write(tmp.path())?;
    seal(tmp.path())?;
    put_in_place(tmp, &dir, existing)
}

/// Temporaries of a live process are left alone this long (another host may share the folder).
pub const STALE_AGE: Duration = Duration::from_secs(24 * 3600);

/// Clean up after writers that died next to `target`: their `.<name>.tmp-…` / `.del-…`
/// entries are removed, and a swap cut short (the old one moved aside, the new one not yet in)
/// is finished — the complete new one (`.<name>.new-…`) goes in, else the old one comes back.
/// A writer is dead when its process is gone (the pid is in the name), or after `age`.
pub fn remove_stale_temps(target: &Path, age: Duration) {
    let Ok((parent, name)) = split(target) else { return };
    sweep(parent, Some(&name), age);
}

/// [`remove_stale_temps`] for every target in `dir` (an output folder at the start of a run).
pub fn remove_dead_temps(dir: &Path) {
    sweep(dir, None, STALE_AGE);
}

fn sweep(parent: &Path, only: Option<&str>, age: Duration) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let mut left: Vec<(String, String, PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some((target, tag, pid)) = parse_temp(&file) else { continue };
        if only.is_some_and(|n| n != target) {
            continue;
        }
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a > age);
        if old || pid.is_some_and(is_dead) {
            left.push((target.to_string(), tag.to_string(), e.path()));
        }
    }
    // Finish interrupted swaps first (new over old), then remove the rest.
    left.sort_by_key(|(_, tag, _)| match tag.as_str() { "new" => 0, "old" => 1, _ => 2 });
    for (target, tag, path) in left {
        let to = parent.join(&target);
        if (tag == "new" || tag == "old") && to.symlink_metadata().is_err() && std::fs::rename(&path, &to).is_ok() {
            continue;
        }
        remove(&path);
    }
}

/// `.<target>.<tag>-<pid>-…` → (target, tag, pid) for qscript's temporary names.
fn parse_temp(file: &str) -> Option<(&str, &str, Option<u32>)> {
    let rest = file.strip_prefix('.')?;
    for tag in ["tmp", "old", "new", "del"] {
        if let Some(i) = rest.rfind(&format!(".{tag}-")) {
            let pid = rest[i + tag.len() + 2..].split('-').next().and_then(|p| p.parse().ok());
            return Some((&rest[..i], tag, pid));
        }
    }
    None
}

/// A process that no longer runs on this host (unknowable without `/proc`: then alive).
fn is_dead(pid: u32) -> bool {
    pid != std::process::id() && Path::new("/proc/self").exists() && !Path::new("/proc").join(pid.to_string()).exists()
}

/// Remove a directory so that no reader ever sees part of it: renamed to a temporary name
/// first (one atomic step), then deleted; a kill in between leaves only the temporary, which
/// the next run in that folder removes.
pub fn remove_dir(dir: &Path) -> Result<()> {
    let doomed = Temp::next_to(dir, "del")?;
    std::fs::rename(dir, doomed.path()).with_context(|| format!("{}: cannot remove", dir.display()))?;
    sync_parent(dir);
    drop(doomed);
    Ok(())
}

/// A temporary file or directory next to where its content will end up; removed on drop
/// unless it was moved into place.
pub struct Temp {
    path: PathBuf,
    keep: bool,
}

impl Temp {
    /// A fresh, empty directory `parent/.<name>.tmp-<unique>`.
    pub fn dir_in(parent: &Path, name: &str) -> Result<Self> {
        let t = Temp { path: parent.join(format!(".{name}.tmp-{}", unique_suffix())), keep: false };
        std::fs::create_dir(&t.path).with_context(|| format!("{}: cannot create directory", t.path.display()))?;
        Ok(t)
    }

    /// An unused name `.<name>.<tag>-<unique>[.<ext>]` beside `target` (nothing created).
    fn next_to(target: &Path, tag: &str) -> Result<Self> {
        let (parent, name) = split(target)?;
        let ext = target.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
        Ok(Temp { path: parent.join(format!(".{name}.{tag}-{}{ext}", unique_suffix())), keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn persist(mut self) {
        self.keep = true;
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.keep {
            remove(&self.path);
        }
    }
}

fn remove(path: &Path) {
    let dir = path.symlink_metadata().is_ok_and(|m| m.is_dir());
    let _ = if dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
}

/// Process-unique suffix for temp names (threads of one process write in parallel in tests).
fn unique_suffix() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// `path`'s directory (`.` when it has none) and file name.
fn split(path: &Path) -> Result<(&Path, String)> {
    let name = path.file_name().with_context(|| format!("{}: path has no file name", path.display()))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((parent, name.to_string_lossy().into_owned()))
}

/// `dir` with a parent and a name (`.` or `a/..` resolved). A directory merged into is resolved
/// to its real place, so the temp directory lands on its filesystem even behind a symlink.
fn resolve(dir: &Path, existing: Existing) -> Result<PathBuf> {
    let real = dir.file_name().is_none() || (existing == Existing::Merge && dir.is_dir());
    if real && dir.exists() {
        return dir.canonicalize().with_context(|| format!("{}: cannot resolve", dir.display()));
    }
    Ok(dir.to_path_buf())
}

/// Refuse before writing what would be refused when moving in.
fn check(path: &Path, existing: Existing, dir: bool) -> Result<()> {
    match existing {
        Existing::Refuse if path.symlink_metadata().is_ok() => bail!("{}: already exists", path.display()),
        Existing::Merge if dir && path.exists() && !path.is_dir() => bail!("{}: exists and is not a directory", path.display()),
        _ => Ok(()),
    }
}

/// Files 0644 and fsynced, directories fsynced, all the way down.
fn seal(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let entry = entry?;
        let p = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            seal(&p)?;
        } else if kind.is_file() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
            }
            File::open(&p).and_then(|f| f.sync_all()).with_context(|| format!("{}: fsync failed", p.display()))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Best effort: not every filesystem can fsync a directory.
fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

fn sync_parent(path: &Path) {
    if let Ok((parent, _)) = split(path) {
        sync_dir(parent);
    }
}

/// Move the finished `tmp` to `target` per `existing`.
fn put_in_place(tmp: Temp, target: &Path, existing: Existing) -> Result<()> {
    let there = target.symlink_metadata().is_ok();
    if there {
        let tmp_dir = tmp.path().is_dir();
        match existing {
            Existing::Refuse => bail!("{}: already exists", target.display()),
            Existing::Keep => return Ok(()),
            Existing::Merge if tmp_dir => return merge(tmp, target),
            _ if tmp_dir || target.is_dir() => return swap(tmp, target),
            _ => {} // a file over a file: the rename replaces it atomically
        }
    }
    match std::fs::rename(tmp.path(), target) {
        Ok(()) => {
            tmp.persist();
            sync_parent(target);
            Ok(())
        }
        // Another writer created it meanwhile: decide again, now that it is there.
        Err(_) if !there && target.symlink_metadata().is_ok() => put_in_place(tmp, target, existing),
        Err(e) => bail!("{}: cannot move into place: {e}", target.display()),
    }
}

/// Merge `tmp` into the directory `dir`: the entries of `dir` that `tmp` lacks are hard-linked
/// (copied where links fail) into `tmp`, which then replaces `dir` whole.
fn merge(tmp: Temp, dir: &Path) -> Result<()> {
    link_missing(dir, tmp.path())?;
    sync_dir(tmp.path());
    match swap_dir(&tmp, dir) {
        Ok(()) => {
            tmp.persist();
            Ok(())
        }
        // A directory that cannot be renamed (a mount point): entry by entry.
        Err(_) if dir.is_dir() => merge_entries(tmp, dir),
        Err(e) => Err(e),
    }
}

/// Hard-link (or copy) into `to` every entry of `from` that `to` does not have, recursively.
fn link_missing(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot list", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type()?;
        if parse_temp(&e.file_name().to_string_lossy()).is_some() {
            continue; // another writer's temporary
        }
        if kind.is_dir() {
            if dst.symlink_metadata().is_err() {
                std::fs::create_dir(&dst)?;
            }
            if dst.is_dir() {
                link_missing(&src, &dst)?;
            }
        } else if dst.symlink_metadata().is_err() {
            if kind.is_symlink() {
                #[cfg(unix)]
                std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            } else if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst).with_context(|| format!("{}: cannot copy", src.display()))?;
            }
        }
    }
    Ok(())
}

/// Rename every entry of `tmp` into the directory `dir`, data files first and `.json` last.
fn merge_entries(tmp: Temp, dir: &Path) -> Result<()> {
    let mut names = std::fs::read_dir(tmp.path())?.map(|e| e.map(|e| e.file_name())).collect::<std::io::Result<Vec<_>>>()?;
    names.sort_by_key(|f| (f.to_string_lossy().ends_with(".json"), f.clone()));
    for f in names {
        let to = dir.join(&f);
        std::fs::rename(tmp.path().join(&f), &to).with_context(|| format!("{}: cannot replace", to.display()))?;
    }
    sync_dir(dir);
    Ok(())
}

/// Replace `target` whole with `tmp`.
fn swap(tmp: Temp, target: &Path) -> Result<()> {
    swap_dir(&tmp, target)?;
    tmp.persist();
    Ok(())
}

/// Replace `target` with `tmp`'s content in one atomic exchange where the system has one
/// (Linux `renameat2(RENAME_EXCHANGE)`; the old content, now at `tmp`'s name, is removed).
/// Elsewhere: `tmp` is renamed `.<name>.new-…` (marking it complete), the old one moved aside,
/// the new one renamed in, the old one removed; a kill in between is finished by the next
/// [`remove_stale_temps`]. If the new one cannot go in, the old one is put back.
fn swap_dir(tmp: &Temp, target: &Path) -> Result<()> {
    if exchange(tmp.path(), target).is_ok() {
        sync_parent(target);
        remove(tmp.path());
        return Ok(());
    }
    let new = Temp::next_to(target, "new")?;
    std::fs::rename(tmp.path(), new.path()).with_context(|| format!("{}: cannot move into place", target.display()))?;
    let r = swap_renames(&new, target);
    if r.is_err() {
        let _ = std::fs::rename(new.path(), tmp.path());
    }
    new.persist();
    r
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    extern "C" {
        fn renameat2(olddirfd: i32, oldpath: *const std::ffi::c_char, newdirfd: i32, newpath: *const std::ffi::c_char, flags: u32) -> i32;
    }
    const AT_FDCWD: i32 = -100;
    const RENAME_EXCHANGE: u32 = 2;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
    if unsafe { renameat2(AT_FDCWD, a.as_ptr(), AT_FDCWD, b.as_ptr(), RENAME_EXCHANGE) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// The two-rename swap of a complete `new` into `target`.
fn swap_renames(new: &Temp, target: &Path) -> Result<()> {
    let old = Temp::next_to(target, "old")?;
    std::fs::rename(target, old.path()).with_context(|| format!("{}: cannot move the old one aside", target.display()))?;
    if let Err(e) = std::fs::rename(new.path(), target) {
        let restored = std::fs::rename(old.path(), target).is_ok();
        let aside = old.path().display().to_string();
        old.persist();
        if !restored {
            bail!("{}: cannot move into place: {e} (the old one is at {aside})", target.display());
        }
        bail!("{}: cannot move into place: {e}", target.display());
    }
    sync_parent(target);
    drop(old);
    Ok(())
}

/// Remove a file or a directory tree (an earlier run's output that a new run replaces): it is
/// renamed to a temporary name first, in one step, so nothing is ever left half-removed under
/// its own name. Absent: nothing to do.
pub fn remove_entry(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_err() {
        return Ok(());
    }
    let doomed = Temp::next_to(path, "del")?;
    std::fs::rename(path, doomed.path()).with_context(|| format!("{}: cannot remove", path.display()))?;
    sync_parent(path);
    drop(doomed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn make_dir(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (f, text) in files {
            std::fs::write(dir.join(f), text).unwrap();
        }
    }

    #[test]
    fn write_replaces_and_leaves_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.json");
        write(&p, b"one").unwrap();
        write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(t.path()), ["a.json"]);
    }

    #[test]
    fn failing_writer_leaves_the_target_untouched_and_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("data.bin");
        write(&p, b"old").unwrap();
        let e = write_with(&p, |f| {
            f.write_all(b"half")?;
            bail!("writer broke")
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "writer broke");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(t.path()), ["data.bin"]);
        // A path writer that fails after creating its file.
        let e = install_file(&p, Existing::Replace, |tmp| {
            std::fs::write(tmp, b"half")?;
            bail!("encoder broke")
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "encoder broke");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(t.path()), ["data.bin"]);
    }

    #[test]
    fn path_writers_get_the_targets_extension() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("loss.png");
        install_file(&p, Existing::Replace, |tmp| {
            assert_eq!(tmp.extension().unwrap(), "png");
            assert_eq!(tmp.parent().unwrap(), t.path());
            std::fs::write(tmp, b"png").map_err(Into::into)
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"png");
        assert_eq!(names(t.path()), ["loss.png"]);
    }

    #[test]
    fn errors_name_the_path() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("missing").join("x.json");
        let e = write(&p, b"x").unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains("cannot create"), "{e}");
        let e = write(Path::new("/"), b"x").unwrap_err().to_string();
        assert!(e.contains("no file name"), "{e}");
    }

    #[test]
    fn install_dir_replaces_an_existing_directory_whole() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("checkpoint-5");
        make_dir(&d, &[("stale.bin", "old"), ("state.json", "old")]);
        install_dir(&d, Existing::Replace, |tmp| {
            assert!(d.join("stale.bin").exists(), "the old directory stays until the new one is complete");
            write(&tmp.join("state.json"), b"new")
        })
        .unwrap();
        assert_eq!(names(&d), ["state.json"]);
        assert_eq!(std::fs::read_to_string(d.join("state.json")).unwrap(), "new");
        assert_eq!(names(t.path()), ["checkpoint-5"], "no temp or old directory left");
        // Over a file too.
        let f = t.path().join("out");
        std::fs::write(&f, "file").unwrap();
        install_dir(&f, Existing::Replace, |tmp| write(&tmp.join("x"), b"1")).unwrap();
        assert_eq!(names(&f), ["x"]);
    }

    #[test]
    fn failing_dir_writer_leaves_the_target_untouched_and_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("model");
        make_dir(&d, &[("config.json", "old")]);
        for existing in [Existing::Replace, Existing::Merge] {
            let e = install_dir(&d, existing, |tmp| {
                write(&tmp.join("config.json"), b"new")?;
                bail!("no weights")
            })
            .unwrap_err();
            assert_eq!(e.to_string(), "no weights");
            assert_eq!(names(&d), ["config.json"]);
            assert_eq!(std::fs::read_to_string(d.join("config.json")).unwrap(), "old");
            assert_eq!(names(t.path()), ["model"]);
        }
        // A new directory does not appear at all.
        let n = t.path().join("new");
        assert!(install_dir(&n, Existing::Replace, |_| bail!("no")).is_err());
        assert_eq!(names(t.path()), ["model"]);
    }

    #[test]
    fn merge_replaces_its_files_and_keeps_the_others() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("m");
        make_dir(&d, &[("notes.txt", "keep me"), ("config.json", "old")]);
        install_dir(&d, Existing::Merge, |tmp| {
            write(&tmp.join("config.json"), b"new")?;
            write(&tmp.join("model.safetensors"), b"w")
        })
        .unwrap();
        assert_eq!(names(&d), ["config.json", "model.safetensors", "notes.txt"]);
        assert_eq!(std::fs::read_to_string(d.join("config.json")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(d.join("notes.txt")).unwrap(), "keep me");
        assert_eq!(names(t.path()), ["m"]);
        // Into `.` of a directory (resolved to its real name).
        install_dir(&d.join("."), Existing::Merge, |tmp| write(&tmp.join("b"), b"b")).unwrap();
        assert!(d.join("b").is_file());
        let f = t.path().join("file");
        std::fs::write(&f, "x").unwrap();
        let e = install_dir(&f, Existing::Merge, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn refuse_and_keep_leave_the_existing_one() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("out");
        make_dir(&d, &[("a", "theirs")]);
        let e = install_dir(&d, Existing::Refuse, |_| panic!("refused before writing")).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = install_file(&d, Existing::Refuse, |_| panic!("refused before writing")).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        install_dir(&d, Existing::Keep, |tmp| write(&tmp.join("a"), b"ours")).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "theirs");
        assert_eq!(names(t.path()), ["out"]);
        // The target appearing while writing is refused at the end.
        let late = t.path().join("late");
        let e = install_dir(&late, Existing::Refuse, |_| Ok(std::fs::create_dir(&late)?)).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(names(t.path()), ["late", "out"]);
    }

    #[cfg(unix)]
    #[test]
    fn installed_files_are_0644() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("m");
        install_dir(&d, Existing::Replace, |tmp| {
            std::fs::create_dir(tmp.join("sub"))?;
            for p in [tmp.join("a"), tmp.join("sub").join("b")] {
                std::fs::write(&p, "x")?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(())
        })
        .unwrap();
        for p in [d.join("a"), d.join("sub").join("b")] {
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644, "{}", p.display());
        }
    }

    #[test]
    fn temp_dirs_are_removed_on_drop_and_stale_ones_swept() {
        let t = tempfile::tempdir().unwrap();
        let kept = {
            let tmp = Temp::dir_in(t.path(), "x").unwrap();
            std::fs::write(tmp.path().join("f"), "x").unwrap();
            assert!(tmp.path().file_name().unwrap().to_string_lossy().starts_with(".x.tmp-"));
            tmp.path().to_path_buf()
        };
        assert!(!kept.exists());
        // A crashed writer's temp (old) goes; a fresh one and other names stay.
        let stale = Temp::dir_in(t.path(), "m").unwrap().path().to_path_buf();
        std::mem::forget(Temp::dir_in(t.path(), "m").unwrap()); // keep it on disk
        std::fs::create_dir(&stale).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(7 * 3600);
        File::open(&stale).unwrap().set_modified(old).unwrap();
        std::fs::write(t.path().join(".other.tmp-1"), "x").unwrap();
        File::options().write(true).open(t.path().join(".other.tmp-1")).unwrap().set_modified(old).unwrap();
        remove_stale_temps(&t.path().join("m"), Duration::from_secs(6 * 3600));
        let left = names(t.path());
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(!stale.exists() && left.contains(&".other.tmp-1".to_string()), "{left:?}");
    }

    /// The pid of a process that has exited.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn merge_installs_the_whole_directory_in_one_step() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("adapter");
        make_dir(&d, &[("adapter_config.json", "alpha 8"), ("adapter_model.safetensors", "old"), ("README.md", "mine")]);
        let (dir_ino, readme_ino) = (std::fs::metadata(&d).unwrap().ino(), std::fs::metadata(d.join("README.md")).unwrap().ino());
        install_dir(&d, Existing::Merge, |tmp| {
            write(&tmp.join("adapter_model.safetensors"), b"new")?;
            // Until the swap, a reader sees the old pair only.
            assert_eq!(std::fs::read_to_string(d.join("adapter_model.safetensors")).unwrap(), "old");
            write(&tmp.join("adapter_config.json"), b"alpha 16")
        })
        .unwrap();
        assert_eq!(names(&d), ["README.md", "adapter_config.json", "adapter_model.safetensors"]);
        assert_eq!(std::fs::read_to_string(d.join("adapter_config.json")).unwrap(), "alpha 16");
        assert_eq!(std::fs::read_to_string(d.join("README.md")).unwrap(), "mine");
        assert_ne!(std::fs::metadata(&d).unwrap().ino(), dir_ino, "a new directory was swapped in (not renamed into file by file)");
        assert_eq!(std::fs::metadata(d.join("README.md")).unwrap().ino(), readme_ino, "kept files are linked, not copied");
        assert_eq!(names(t.path()), ["adapter"]);
    }

    /// A kill between the two renames of a swap (where the exchange is not available): the
    /// next sweep puts the complete new one in, or the old one back; never a mix.
    #[test]
    fn an_interrupted_swap_is_finished_by_the_next_sweep() {
        let t = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        let m = t.path().join("m");
        // Killed after moving the old one aside, with the new one complete.
        make_dir(&t.path().join(format!(".m.old-{pid}-1-0")), &[("config.json", "old"), ("w", "old")]);
        make_dir(&t.path().join(format!(".m.new-{pid}-1-1")), &[("config.json", "new"), ("w", "new")]);
        remove_stale_temps(&m, STALE_AGE);
        assert_eq!(names(t.path()), ["m"]);
        assert_eq!((std::fs::read_to_string(m.join("config.json")).unwrap(), std::fs::read_to_string(m.join("w")).unwrap()), ("new".into(), "new".into()));
        // Killed after moving the old one aside, before the new one was complete: old back.
        std::fs::rename(&m, t.path().join(format!(".m.old-{pid}-2-0"))).unwrap();
        make_dir(&t.path().join(format!(".m.tmp-{pid}-2-1")), &[("w", "half")]);
        remove_stale_temps(&m, STALE_AGE);
        assert_eq!(names(t.path()), ["m"]);
        assert_eq!(std::fs::read_to_string(m.join("w")).unwrap(), "new");
        // A live writer's temporaries (this process's) stay until they are old.
        let live = t.path().join(format!(".m.tmp-{}-3-0", std::process::id()));
        make_dir(&live, &[("w", "writing")]);
        remove_stale_temps(&m, STALE_AGE);
        assert!(live.exists());
        // A whole output folder is swept at a run's start.
        make_dir(&t.path().join(format!(".checkpoint-4.tmp-{pid}-4-0")), &[("x", "1")]);
        std::fs::write(t.path().join(format!(".metrics.jsonl.tmp-{pid}-4-1.jsonl")), "x").unwrap();
        remove_dead_temps(t.path());
        assert_eq!(names(t.path()).len(), 2, "{:?}", names(t.path()));
    }

    #[test]
    fn remove_dir_never_leaves_a_partial_directory_under_its_name() {
        let t = tempfile::tempdir().unwrap();
        let c = t.path().join("checkpoint-3");
        make_dir(&c, &[("trainer_state.json", "{}"), ("optimizer.safetensors", "x")]);
        remove_dir(&c).unwrap();
        assert_eq!(names(t.path()), Vec::<String>::new());
        // A kill during the deletion leaves only the renamed temporary, swept by the next run.
        let pid = dead_pid();
        make_dir(&t.path().join(format!(".checkpoint-3.del-{pid}-1-0")), &[("optimizer.safetensors", "x")]);
        remove_dead_temps(t.path());
        assert_eq!(names(t.path()), Vec::<String>::new());
    }
}
