//! With feature `cuda`: compiles every `src/kernels/cuda/*.cu` to PTX in OUT_DIR (loaded at run
//! time by `src/kernels/cuda.rs`; the driver JITs it for the GPU). Without the feature: nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    // Without this line cargo would rerun the script whenever any file of the package changes.
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let dir = Path::new("src/kernels/cuda");
    println!("cargo:rerun-if-changed={}", dir.display());
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
    let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let ptx = out_dir.join(src.file_stem().expect("a .cu file name")).with_extension("ptx");
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
