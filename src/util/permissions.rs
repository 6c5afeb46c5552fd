//! Deny-by-default permissions for recipes, in the style of Deno: the one checker every
//! path-taking host function, `import`, the dataset walker, checkpoint pruning and the hub
//! client go through.
//!
//! A recipe run from the command line may
//! - read its own folder, its imports' folders, the model caches (HF hub cache, qscript's
//!   cache), the output folders it declared, and what `--allow-read=PATH` grants;
//! - write only inside output folders it declares (`output_dir`, `save_pretrained(dir)`,
//!   `to_jsonl(path)`'s folder) that lie strictly inside the working directory, are not hidden
//!   and are new or hold only what qscript writes — or under `--allow-write=PATH`;
//! - reach the network only to fetch a model from the hub whose id (and revision) is a string
//!   literal of the recipe, of a module it imports or of a `--set` value: an id assembled at run
//!   time (from data it read, say) is refused, so the request URL cannot carry data out.
//!   `--allow-net` lifts that; `--allow-all` lifts everything.
//!
//! A path is judged after making it absolute and resolving its symlinks, but symlinks are only
//! followed (and the file system only looked at) inside the areas the recipe may read: a denied
//! path gets the same one-line error whether or not it exists.
//!
//! The policy in force is per thread ([`activate`]); with none (the library used from Rust,
//! tests) everything is allowed.

use anyhow::{bail, Result};
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

/// What the command line grants.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub read: Vec<PathBuf>,
    /// `--allow-read` without a path: any path.
    pub read_any: bool,
    pub write: Vec<PathBuf>,
    pub write_any: bool,
    pub net: bool,
    pub all: bool,
}

#[derive(Debug, Clone)]
struct Root {
    path: PathBuf,
    why: String,
}

/// The permissions of one recipe run (or REPL session).
#[derive(Debug)]
pub struct Policy {
    all: bool,
    read_any: bool,
    write_any: bool,
    net_any: bool,
    /// The working directory, resolved.
    cwd: PathBuf,
    read: RefCell<Vec<Root>>,
    write: RefCell<Vec<Root>>,
    /// String literals of the recipe, its modules and `--set` values: the model ids and
    /// revisions the hub may be asked for.
    literals: RefCell<HashSet<String>>,
}

/// Extensions of the files qscript writes: an existing folder holding only these (and
/// folders) may be declared an output folder.
const OUTPUT_EXTENSIONS: &[&str] = &["json", "jsonl", "safetensors", "png", "rhai", "jinja", "gguf", "csv", "tsv"];

impl Policy {
    /// Everything allowed (`--allow-all`).
    pub fn allow_all() -> Self {
        Self::new(&Grants { all: true, ..Default::default() }, &[])
    }

    /// A policy from the command line's grants; `read_roots` are the defaults (the recipe's
    /// folder, the model caches) with the reason each is readable.
    pub fn new(grants: &Grants, read_roots: &[(PathBuf, &str)]) -> Self {
        let cwd = std::env::current_dir().ok().and_then(|d| d.canonicalize().ok()).unwrap_or_else(|| PathBuf::from("/"));
        Self::new_in(grants, read_roots, cwd)
    }

    /// [`Policy::new`] with `cwd` standing for the working directory (fuzzing, tests).
    pub fn new_in(grants: &Grants, read_roots: &[(PathBuf, &str)], cwd: PathBuf) -> Self {
        let p = Policy {
            all: grants.all,
            read_any: grants.read_any,
            write_any: grants.write_any,
            net_any: grants.net,
            cwd,
            read: RefCell::new(Vec::new()),
            write: RefCell::new(Vec::new()),
            literals: RefCell::new(HashSet::new()),
        };
        for (path, why) in read_roots {
            p.add_root(&p.read, path, why);
        }
        for path in &grants.read {
            p.add_root(&p.read, path, "--allow-read");
        }
        for path in &grants.write {
            p.add_root(&p.write, path, "--allow-write");
        }
        p
    }

    /// A trusted root (given by the user or qscript): resolved with no restriction.
    fn add_root(&self, roots: &RefCell<Vec<Root>>, path: &Path, why: &str) {
        let real = self.resolve(path, &|_| true).unwrap_or_else(|_| self.cwd.join(path));
        roots.borrow_mut().push(Root { path: real, why: why.to_string() });
    }

    /// A folder the recipe may read from now on (an imported module's folder).
    pub fn add_read_root(&self, path: &Path, why: &str) {
        if !self.readable(path) || !self.read.borrow().iter().any(|r| r.path == path) {
            self.add_root(&self.read, path, why);
        }
    }

    /// Strings that may be sent to the hub as model ids or revisions.
    pub fn add_literals(&self, literals: impl IntoIterator<Item = String>) {
        self.literals.borrow_mut().extend(literals);
    }

    pub fn is_all(&self) -> bool {
        self.all
    }

    fn under(roots: &RefCell<Vec<Root>>, p: &Path) -> Option<String> {
        roots.borrow().iter().find(|r| p.starts_with(&r.path)).map(|r| r.why.clone())
    }

    fn readable(&self, p: &Path) -> bool {
        self.all || self.read_any || self.write_any || Self::under(&self.read, p).is_some() || Self::under(&self.write, p).is_some()
    }

    /// Why `path` may be read, or the one-line denial.
    pub fn check_read(&self, path: &Path) -> Result<String> {
        if self.all || self.read_any {
            return Ok("granted".into());
        }
        let real = self.resolve(path, &|p| self.readable(p))?;
        match Self::under(&self.read, &real).or_else(|| Self::under(&self.write, &real)) {
            Some(why) => Ok(why),
            None => bail!(
                "permission denied: cannot read {}: outside the recipe's folder, the model caches and the granted paths (grant it with --allow-read={})",
                path.display(),
                real.display()
            ),
        }
    }

    /// Why `path` may be written, or the one-line denial.
    pub fn check_write(&self, path: &Path) -> Result<String> {
        if self.all || self.write_any {
            return Ok("granted".into());
        }
        let real = self.resolve(path, &|p| self.readable(p))?;
        match Self::under(&self.write, &real) {
            Some(why) => Ok(why),
            None => bail!(
                "permission denied: cannot write {}: outside the recipe's output folders (grant it with --allow-write={})",
                path.display(),
                real.display()
            ),
        }
    }

    /// Declare `dir` an output folder of the recipe (`output_dir`, `save_pretrained(dir)`, the
    /// folder of `to_jsonl(path)`): allowed when it is already writable, or lies strictly
    /// inside the working directory, has no hidden component and is new, empty or holds only
    /// the kinds of files qscript writes. Returns why it is writable.
    pub fn declare_output(&self, dir: &Path) -> Result<String> {
        if self.all || self.write_any {
            return Ok("granted".into());
        }
        let real = self.resolve(dir, &|p| self.readable(p) || p.starts_with(&self.cwd))?;
        if let Some(why) = Self::under(&self.write, &real) {
            return Ok(why);
        }
        let deny = |why: &str| -> Result<String> {
            bail!("permission denied: cannot write {}: {why} (grant it with --allow-write={})", dir.display(), real.display())
        };
        let Ok(rel) = real.strip_prefix(&self.cwd) else { return deny("outside the working directory") };
        if rel.as_os_str().is_empty() {
            return deny("an output folder must be a folder inside the working directory, not the working directory itself");
        }
        if rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.')) {
            return deny("a hidden path");
        }
        if let Ok(m) = std::fs::symlink_metadata(&real) {
            if !m.is_dir() || !holds_only_outputs(&real) {
                return deny("an existing folder holding files qscript did not write");
            }
        }
        let why = format!("output folder {}", rel.display());
        self.write.borrow_mut().push(Root { path: real, why: why.clone() });
        Ok(why)
    }

    /// May the hub be asked for model `id` at `revision`?
    pub fn check_net(&self, id: &str, revision: Option<&str>) -> Result<()> {
        if self.all || self.net_any {
            return Ok(());
        }
        let lits = self.literals.borrow();
        if !lits.contains(id) {
            bail!("permission denied: network access for model id \"{id}\": the hub is only asked for ids written literally in the recipe or given with --set (grant it with --allow-net)");
        }
        if let Some(r) = revision.filter(|r| *r != "main" && !lits.contains(*r)) {
            bail!("permission denied: network access for revision \"{r}\" of {id}: not a literal of the recipe (grant it with --allow-net)");
        }
        Ok(())
    }

    /// `path` made absolute with its symlinks resolved — but only where `may_look` allows:
    /// outside those areas nothing is looked at and the rest of the path is taken as written.
    fn resolve(&self, path: &Path, may_look: &dyn Fn(&Path) -> bool) -> Result<PathBuf> {
        let mut todo: VecDeque<OsString> = VecDeque::new();
        push_components(&mut todo, &self.cwd.join(path), false);
        let mut cur = PathBuf::from("/");
        let (mut hops, mut looking) = (0, true);
        while let Some(c) = todo.pop_front() {
            match c.to_str() {
                Some("/") => cur = PathBuf::from("/"),
                Some(".") => {}
                Some("..") => {
                    cur.pop();
                }
                _ => {
                    cur.push(&c);
                    if !(looking && may_look(&cur)) {
                        continue;
                    }
                    match std::fs::symlink_metadata(&cur) {
                        Ok(m) if m.file_type().is_symlink() => {
                            hops += 1;
                            if hops > 40 {
                                bail!("{}: too many levels of symbolic links", path.display());
                            }
                            let target = std::fs::read_link(&cur)?;
                            cur.pop();
                            push_components(&mut todo, &target, true);
                        }
                        Ok(_) => {}
                        Err(_) => looking = false,
                    }
                }
            }
        }
        Ok(cur)
    }
}

/// The components of `p` (`/` for the root), appended or put in front of `todo`.
fn push_components(todo: &mut VecDeque<OsString>, p: &Path, front: bool) {
    let comps: Vec<OsString> = p
        .components()
        .filter_map(|c| match c {
            Component::RootDir => Some(OsString::from("/")),
            Component::CurDir => None,
            Component::ParentDir => Some(OsString::from("..")),
            Component::Normal(n) => Some(n.to_os_string()),
            Component::Prefix(_) => None,
        })
        .collect();
    if front {
        for c in comps.into_iter().rev() {
            todo.push_front(c);
        }
    } else {
        todo.extend(comps);
    }
}

/// A folder holding only folders, hidden entries (qscript's temporaries) and files with the
/// extensions qscript writes.
fn holds_only_outputs(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let ext = Path::new(&name).extension().map(|x| x.to_string_lossy().to_ascii_lowercase());
        is_dir && !name.starts_with('.') || name.starts_with(".") && name.contains(".tmp-") || ext.is_some_and(|x| OUTPUT_EXTENSIONS.contains(&x.as_str()))
    })
}

thread_local! {
    static ACTIVE: RefCell<Option<Rc<Policy>>> = const { RefCell::new(None) };
}

/// Puts `policy` in force on this thread until the guard is dropped (the previous one then
/// comes back).
pub fn activate(policy: Rc<Policy>) -> Active {
    Active(ACTIVE.with(|a| a.borrow_mut().replace(policy)))
}

pub struct Active(Option<Rc<Policy>>);

impl Drop for Active {
    fn drop(&mut self) {
        let prev = self.0.take();
        ACTIVE.with(|a| *a.borrow_mut() = prev);
    }
}

/// The policy in force on this thread, if any.
pub fn current() -> Option<Rc<Policy>> {
    ACTIVE.with(|a| a.borrow().clone())
}

/// Check a read of `path` against the policy in force (none: allowed).
pub fn read(path: &Path) -> Result<()> {
    current().map_or(Ok(()), |p| p.check_read(path).map(|_| ()))
}

/// Check a write (or removal) of `path`.
pub fn write(path: &Path) -> Result<()> {
    current().map_or(Ok(()), |p| p.check_write(path).map(|_| ()))
}

/// May a recipe replace what is already in `dir` — another run's files (`overwrite_output_dir`)?
/// Only with the user's say: no policy (Rust callers, tests), `--allow-all`, `--allow-write`
/// without a path, or an `--allow-write=PATH` covering `dir`; a declared output folder is not
/// enough (it may hold another run of the user's).
pub fn replace_granted(dir: &Path) -> bool {
    let Some(p) = current() else { return true };
    if p.all || p.write_any {
        return true;
    }
    let real = p.resolve(dir, &|q| p.readable(q)).unwrap_or_else(|_| dir.to_path_buf());
    let granted = p.write.borrow().iter().any(|r| r.why == "--allow-write" && real.starts_with(&r.path));
    granted
}

/// Declare `dir` an output folder (see [`Policy::declare_output`]).
pub fn output_dir(dir: &Path) -> Result<()> {
    current().map_or(Ok(()), |p| p.declare_output(dir).map(|_| ()))
}

/// A write into `dir` (a folder to be written whole): under an output folder already, or
/// `dir` itself becomes one.
pub fn write_dir(dir: &Path) -> Result<()> {
    match current() {
        Some(p) if p.check_write(dir).is_err() => p.declare_output(dir).map(|_| ()),
        _ => Ok(()),
    }
}

/// A file write: under an output folder already, or its folder becomes one.
pub fn write_file(path: &Path) -> Result<()> {
    let Some(p) = current() else { return Ok(()) };
    if p.check_write(path).is_ok() {
        return Ok(());
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if p.declare_output(dir).is_ok() => Ok(()),
        _ => p.check_write(path).map(|_| ()),
    }
}

/// Check a hub request for model `id` at `revision`.
pub fn net(id: &str, revision: Option<&str>) -> Result<()> {
    current().map_or(Ok(()), |p| p.check_net(id, revision))
}

/// `load_model`'s argument as a local path: `Ok(true)` when it may be looked at, `Ok(false)`
/// when it may not but could be a hub id (then only the hub and its cache are asked), else
/// the read denial. Nothing outside the readable areas is looked at.
pub fn model_path(path: &Path, may_be_hub_id: bool) -> Result<bool> {
    let Some(p) = current() else { return Ok(true) };
    match p.check_read(path) {
        Ok(_) => Ok(true),
        Err(_) if may_be_hub_id => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(recipe_dir: &Path) -> Policy {
        Policy::new(&Grants::default(), &[(recipe_dir.to_path_buf(), "the recipe's folder")])
    }

    #[test]
    fn reads_inside_the_roots_only_and_symlinks_do_not_escape() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("recipe");
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("data/a.jsonl"), "{}").unwrap();
        std::fs::write(t.path().join("secret.jsonl"), "{}").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(t.path().join("secret.jsonl"), root.join("data/link.jsonl")).unwrap();
        let p = policy(&root);
        assert!(p.check_read(&root.join("data/a.jsonl")).is_ok());
        assert!(p.check_read(&root.join("data/missing.jsonl")).is_ok(), "inside: may be looked at");
        for bad in [t.path().join("secret.jsonl"), root.join("data/../../secret.jsonl"), root.join("../recipe/../secret.jsonl")] {
            let e = p.check_read(&bad).unwrap_err().to_string();
            assert!(e.starts_with("permission denied: cannot read") && e.contains("--allow-read="), "{e}");
        }
        #[cfg(unix)]
        assert!(p.check_read(&root.join("data/link.jsonl")).is_err(), "a symlink out of the folder is refused");
        // The message is the same whether the outside path exists or not.
        let a = p.check_read(&t.path().join("secret.jsonl")).unwrap_err().to_string();
        let b = p.check_read(&t.path().join("nothere.jsonl")).unwrap_err().to_string();
        assert_eq!(a.replace("secret", "X"), b.replace("nothere", "X"));
    }

    #[test]
    fn net_only_for_literal_ids() {
        let p = policy(Path::new("/nonexistent"));
        p.add_literals(["org/model".to_string(), "v1".to_string()]);
        assert!(p.check_net("org/model", None).is_ok());
        assert!(p.check_net("org/model", Some("v1")).is_ok());
        assert!(p.check_net("org/model", Some("main")).is_ok());
        let e = p.check_net("org/secret-abc", None).unwrap_err().to_string();
        assert!(e.contains("--allow-net") && e.contains("org/secret-abc"), "{e}");
        assert!(p.check_net("org/model", Some("leak")).is_err());
        let all = Policy::new(&Grants { net: true, ..Default::default() }, &[]);
        assert!(all.check_net("anything/x", Some("y")).is_ok());
    }
}
