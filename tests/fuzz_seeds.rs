//! The fuzz targets' smoke run on stable Rust (CI needs neither nightly nor cargo-fuzz): every
//! committed seed of `fuzz/corpus/<target>/` and every reproducer of `fuzz/regressions/<target>/`
//! through the same entry points the libFuzzer targets call (`qscript::util::fuzz`), plus
//! a few deterministic mutations of each seed (cuts and byte flips). Errors are fine; a panic,
//! a hang or an abort fails. Inputs that once crashed must now give their one-line error.

use qscript::util::fuzz::TARGETS;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// Cuts at a few points and byte flips chosen by a fixed LCG.
fn mutations(seed: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let n = seed.len();
    for cut in [0, 1, 8, n / 3, n / 2, n.saturating_sub(1)] {
        out.push(seed[..cut.min(n)].to_vec());
    }
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..12 {
        let mut m = seed.to_vec();
        for _ in 0..4 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if !m.is_empty() {
                let i = (x >> 33) as usize % m.len();
                m[i] = [0x00, 0xff, b'9', b'{', b'"', (x >> 20) as u8][(x >> 8) as usize % 6];
            }
        }
        out.push(m);
    }
    out
}

#[test]
fn every_seed_and_regression_runs_through_its_target_without_a_crash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    let t0 = Instant::now();
    for (name, run) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        assert!(!seeds.is_empty(), "no seeds for fuzz target {name}");
        for path in seeds.iter().chain(inputs(&root.join("regressions").join(name)).iter()) {
            let data = std::fs::read(path).unwrap();
            let t = Instant::now();
            let r = run(&data);
            assert!(t.elapsed() < Duration::from_secs(20), "{}: took {:?}", path.display(), t.elapsed());
            if let Err(e) = &r {
                let msg = format!("{e:#}");
                assert_eq!(msg.lines().count(), 1, "{}: not one line: {msg}", path.display());
            }
            // The inputs of issue 17 that crashed: now their errors.
            let want = match (*name, path.file_name().unwrap().to_string_lossy().as_ref()) {
                ("gguf", "seed-alignment-0") => Some("`general.alignment` = 0"),
                ("gguf", "seed-block-count-1e12") => Some("`num_hidden_layers` = 1000000000000"),
                ("configs", "seed-layers-1e12") => Some("`num_hidden_layers` = 1000000000000"),
                ("configs", "seed-positions-1e8") => Some("`max_position_embeddings` = 100000000"),
                ("configs", "seed-r-1e12") => Some("`r` = 1000000000000"),
                ("configs", "seed-rank-pattern-1e20") => Some("rank_pattern `q_proj`"),
                ("chat_template", "seed-loop") | ("configs", "seed-tiny") | ("configs", "seed-peft") | ("gguf", "seed-tiny-llama") => {
                    assert!(r.is_ok(), "{}: {:#}", path.display(), r.unwrap_err());
                    None
                }
                _ => None,
            };
            if let Some(want) = want {
                let e = match &r {
                    Ok(()) => panic!("{}: no error (want {want})", path.display()),
                    Err(e) => format!("{e:#}"),
                };
                assert!(e.contains(want), "{}: want {want}: {e}", path.display());
            }
            if *name != "recipe" {
                for m in mutations(&data) {
                    let _ = run(&m);
                    total += 1;
                }
            }
            total += 1;
        }
    }
    eprintln!("{total} inputs in {:.1?}", t0.elapsed());
}
