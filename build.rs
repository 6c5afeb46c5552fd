//! With feature `cuda`: compiles every `src/kernels/<op>/*.cu` to `<stem>.ptx` in OUT_DIR
//! (loaded at run time through `kernels::launch`; the driver JITs it for the GPU). Shared
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
    for var in ["CUDA_HOME", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Some(home) = std::env::var_os("CUDA_HOME") else {
        panic!(
            "feature `cuda` needs CUDA_HOME (the CUDA toolkit with bin/nvcc); \
             on a machine without a GPU build with /work/shared/cuda/build-cuda.sh --features cuda"
        );
    };
    let nvcc = PathBuf::from(home).join("bin/nvcc");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
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
