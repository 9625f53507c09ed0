//! Downloads from the Hugging Face Hub, like `huggingface-cli download
//! --local-dir DIR REPO_ID`: every file of a repository snapshot, with progress
//! bars, into a plain local folder. Honours `HF_ENDPOINT` (mirror sites),
//! `HF_TOKEN`, `HF_HOME` (the cache) and `HF_HUB_OFFLINE`. Interrupted downloads
//! resume from the cache.

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("HF_HUB_OFFLINE is set, so {repo} cannot be downloaded; put the files in {local_dir} yourself or unset HF_HUB_OFFLINE")]
    Offline { repo: String, local_dir: String },
    #[error("cannot reach {endpoint} ({reason}); check the network, or set HF_ENDPOINT to a reachable mirror, or copy the files into {local_dir} by hand")]
    Unreachable {
        endpoint: String,
        reason: String,
        local_dir: String,
    },
    #[error("{repo}: {message}")]
    Api { repo: String, message: String },
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

/// What to download.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub repo_id: String,
    /// "model" (default), "dataset" or "space".
    pub repo_type: String,
    pub revision: Option<String>,
    pub local_dir: PathBuf,
    /// Only files whose names end with one of these (empty = all files).
    pub allow_suffixes: Vec<String>,
    pub token: Option<String>,
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| ["https://", "huggingface", ".co"].concat())
}

/// Fails fast (seconds, not a hung TCP handshake) when the hub cannot be reached.
fn check_reachable(endpoint: &str, local_dir: &Path) -> Result<(), HubError> {
    let unreachable = |reason: String| HubError::Unreachable {
        endpoint: endpoint.to_string(),
        reason,
        local_dir: local_dir.display().to_string(),
    };
    let without_scheme = endpoint.split("://").nth(1).unwrap_or(endpoint);
    let host_port = without_scheme.split('/').next().unwrap_or(without_scheme);
    let default_port = if endpoint.starts_with("http://") {
        80
    } else {
        443
    };
    let target = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("name lookup failed: {e}")))?
        .collect();
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

fn repo_type(name: &str) -> Result<RepoType, String> {
    match name {
        "model" => Ok(RepoType::Model),
        "dataset" => Ok(RepoType::Dataset),
        "space" => Ok(RepoType::Space),
        other => Err(format!(
            "unknown repo type {other:?} (expected model, dataset or space)"
        )),
    }
}

/// Downloads the repository snapshot into `local_dir` and returns that folder.
/// Files already present there with the cached size are kept as they are.
pub fn snapshot_download(req: &SnapshotRequest) -> Result<PathBuf, HubError> {
    let api_err = |message: String| HubError::Api {
        repo: req.repo_id.clone(),
        message,
    };
    let kind = repo_type(&req.repo_type).map_err(api_err)?;
    if std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
    {
        return Err(HubError::Offline {
            repo: req.repo_id.clone(),
            local_dir: req.local_dir.display().to_string(),
        });
    }
    let endpoint = endpoint();
    check_reachable(&endpoint, &req.local_dir)?;
    let token = req.token.clone().or_else(|| std::env::var("HF_TOKEN").ok());
    let mut builder = ApiBuilder::from_env()
        .with_progress(true)
        .with_endpoint(endpoint);
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder.build().map_err(|e| api_err(e.to_string()))?;
    let repo = match &req.revision {
        Some(rev) => Repo::with_revision(req.repo_id.clone(), kind, rev.clone()),
        None => Repo::new(req.repo_id.clone(), kind),
    };
    let repo = api.repo(repo);
    let info = repo
        .info()
        .map_err(|e| api_err(format!("cannot list files: {e}")))?;
    let io = |path: &Path, source| HubError::Io {
        path: path.display().to_string(),
        error: source,
    };
    std::fs::create_dir_all(&req.local_dir).map_err(|e| io(&req.local_dir, e))?;
    for sibling in &info.siblings {
        let name = &sibling.rfilename;
        if name == ".gitattributes" {
            continue;
        }
        if !req.allow_suffixes.is_empty()
            && !req
                .allow_suffixes
                .iter()
                .any(|s| name.ends_with(s.as_str()))
        {
            continue;
        }
        let cached = repo
            .get(name)
            .map_err(|e| api_err(format!("{name}: {e}")))?;
        let target = req.local_dir.join(name);
        let cached_len = std::fs::metadata(&cached)
            .map_err(|e| io(&cached, e))?
            .len();
        if std::fs::metadata(&target)
            .map(|m| m.len() == cached_len)
            .unwrap_or(false)
        {
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let real = std::fs::canonicalize(&cached).map_err(|e| io(&cached, e))?;
        // A hard link costs no space; across file systems fall back to a copy.
        let _ = std::fs::remove_file(&target);
        if std::fs::hard_link(&real, &target).is_err() {
            std::fs::copy(&real, &target).map_err(|e| io(&target, e))?;
        }
    }
    Ok(req.local_dir.clone())
}
