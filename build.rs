//! With feature `cuda`: compiles every `src/kernels/<op>/*.cu` to `<stem>.ptx` in OUT_DIR
//! (loaded at run time through `kernels::launch`; the driver JITs it for the GPU), with the nvcc
//! of CUDA_HOME or PATH, for this machine's GPU (`nvidia-smi`) unless CUDA_COMPUTE_CAP says. Shared
//! headers (`*.cuh`) sit in `src/kernels/` or beside the `.cu` files that include them, by
//! relative path. Without the feature: nothing. Always: the git commit, for run manifests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files directly in `dir` whose names end in `.{ext}`, sorted.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort();
    out
}

/// The op folders of `src/kernels`, sorted.
fn op_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// `git` with `args` in the package's folder: its trimmed output, or `None` (no git, no checkout).
fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// `QSCRIPT_GIT_COMMIT` for run manifests: the checkout's commit, or `unknown`. The script
/// reruns when HEAD or its branch moves (the files must exist: a missing one reruns always).
fn git_commit() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=QSCRIPT_GIT_COMMIT={commit}");
    let head = git(&["rev-parse", "--git-path", "HEAD"]).map(PathBuf::from);
    let branch = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])).map(PathBuf::from);
    for p in [head, branch].into_iter().flatten().filter(|p| p.is_file()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

/// nvcc from CUDA_HOME / CUDA_PATH / CUDA_ROOT (the toolkit folder), else PATH, else
/// /usr/local/cuda, where the toolkit's installers put it.
fn find_nvcc() -> Option<PathBuf> {
    let homes = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"].into_iter().filter_map(std::env::var_os).map(PathBuf::from);
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).filter_map(|d| d.parent().map(Path::to_path_buf));
    homes.chain(on_path).chain([PathBuf::from("/usr/local/cuda")]).map(|h| h.join("bin/nvcc")).find(|p| p.is_file())
}

/// The first GPU's compute capability as `nvidia-smi` reports it (`9.0` → `90`), so the PTX
/// targets the GPU this machine has; None without a GPU (a cross-build).
fn gpu_compute_cap() -> Option<String> {
    let out = Command::new("nvidia-smi").args(["--query-gpu=compute_cap", "--format=csv,noheader"]).output().ok()?;
    let first = String::from_utf8(out.stdout).ok()?.lines().next()?.trim().replace('.', "");
    (out.status.success() && !first.is_empty() && first.chars().all(|c| c.is_ascii_digit())).then_some(first)
}

fn main() {
    // Without this line cargo would rerun the script whenever any file of the package changes.
    println!("cargo:rerun-if-changed=build.rs");
    git_commit();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let root = Path::new("src/kernels");
    let dirs = op_dirs(root);
    let sources: Vec<PathBuf> = dirs.iter().flat_map(|d| files(d, "cu")).collect();
    let headers: Vec<PathBuf> = std::iter::once(root).chain(dirs.iter().map(PathBuf::as_path)).flat_map(|d| files(d, "cuh")).collect();
    // Each CUDA file by name (a folder would rerun nvcc on every Rust edit beside it); a new
    // `.cu` file is seen once build.rs reruns (touch build.rs after adding one).
    for f in sources.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "feature `cuda` needs the CUDA toolkit's nvcc: install the toolkit (12.x or 13.x) and put its bin/ on PATH, \
             or set CUDA_HOME to its folder (e.g. CUDA_HOME=/usr/local/cuda)"
        )
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").ok().or_else(gpu_compute_cap).unwrap_or_else(|| "90".into());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut stems = std::collections::BTreeSet::new();
    for src in sources {
        let stem = src.file_stem().expect("a .cu file name").to_owned();
        // One PTX file per stem in OUT_DIR: two `.cu` files of one name would overwrite.
        assert!(stems.insert(stem.clone()), "two CUDA files named {}.cu under {}", stem.to_string_lossy(), root.display());
        let ptx = out_dir.join(&stem).with_extension("ptx");
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", "-std=c++17"]).arg(format!("-arch=compute_{cap}"));
        if let Some(ccbin) = std::env::var_os("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        cmd.arg("-o").arg(&ptx).arg(&src);
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {} ({status})", src.display());
    }
}
