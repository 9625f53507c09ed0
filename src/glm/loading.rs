//! Loads transformers safetensors checkpoints (one file or sharded with
//! `model.safetensors.index.json`) into a VarStore whose variable names are the
//! HF parameter names. Shards are memory-mapped and copied tensor by tensor
//! into variables already allocated in the target dtype and device, so the
//! peak host memory is one tensor, not the model.

use super::config::ConfigError;
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(
        "{dir}: no weights found (expected model.safetensors or model.safetensors.index.json)"
    )]
    NoWeights { dir: String },
    #[error("{dir}: {} tensor(s) missing from the checkpoint, e.g. {}", .names.len(), .names.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    Missing { dir: String, names: Vec<String> },
    #[error("{dir}: {} tensor(s) in the checkpoint that the model does not have, e.g. {}", .names.len(), .names.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    Unexpected { dir: String, names: Vec<String> },
    #[error("{file}: tensor {name} has shape {found:?}, the model expects {expected:?}")]
    Shape {
        file: String,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
}

fn file_err(path: &Path, message: impl ToString) -> LoadError {
    LoadError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The safetensors files of a checkpoint directory, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| file_err(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| file_err(&index, e))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(&index, "no \"weight_map\" object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    if !dir.is_dir() {
        return Err(file_err(dir, "model directory does not exist"));
    }
    Err(LoadError::NoWeights {
        dir: dir.display().to_string(),
    })
}

pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Buffers transformers may save that are recomputed here.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Copies every tensor of the checkpoint in `dir` into the same-named variable of `vs`.
/// Every variable must be filled and every checkpoint tensor must be used.
pub fn load_safetensors(vs: &VarStore, dir: &Path) -> Result<(), LoadError> {
    let files = weight_files(dir)?;
    let mut variables: HashMap<String, Tensor> = vs.variables();
    let mut filled = BTreeSet::new();
    let mut unexpected = Vec::new();
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("loading weights {bar:30} {bytes}/{total_bytes} {msg}")
            .expect("valid template"),
    );
    let _guard = tch::no_grad_guard();
    for file in &files {
        let handle = std::fs::File::open(file).map_err(|e| file_err(file, e))?;
        // SAFETY: the map is read-only and dropped before this function returns;
        // a checkpoint changed on disk while loading is outside what we support.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| file_err(file, e))?;
        let tensors = SafeTensors::deserialize(&mmap)
            .map_err(|e| file_err(file, format!("not a valid safetensors file ({e})")))?;
        for (name, view) in tensors.tensors() {
            if is_ignored_buffer(&name) {
                continue;
            }
            let Some(var) = variables.get_mut(&name) else {
                unexpected.push(name);
                continue;
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(LoadError::Shape {
                    file: file.display().to_string(),
                    name,
                    expected: var.size(),
                    found: shape,
                });
            }
            let kind = kind_of(view.dtype()).ok_or_else(|| {
                file_err(
                    file,
                    format!("tensor {name} has unsupported dtype {:?}", view.dtype()),
                )
            })?;
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)
                .map_err(|e| file_err(file, format!("tensor {name}: {e}")))?;
            var.f_copy_(&src)
                .map_err(|e| file_err(file, format!("tensor {name}: {e}")))?;
            bar.inc(view.data().len() as u64);
            filled.insert(name);
        }
        bar.set_message(
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    bar.finish_and_clear();
    let dir_s = dir.display().to_string();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(LoadError::Unexpected {
            dir: dir_s,
            names: unexpected,
        });
    }
    let mut missing: Vec<String> = variables
        .keys()
        .filter(|k| !filled.contains(*k))
        .cloned()
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(LoadError::Missing {
            dir: dir_s,
            names: missing,
        });
    }
    Ok(())
}

/// Largest shard written by [`save_safetensors`] (transformers' default `max_shard_size` is 5 GB).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Writes named tensors as `model.safetensors`, or as `model-0000i-of-0000n.safetensors`
/// shards plus `model.safetensors.index.json` when they exceed `max_shard_bytes`.
pub fn save_safetensors(
    named: &[(String, Tensor)],
    dir: &Path,
    max_shard_bytes: usize,
) -> std::io::Result<()> {
    let to_io = |e: tch::TchError| std::io::Error::other(e.to_string());
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0usize;
    let mut total = 0usize;
    for (name, t) in named {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if current > 0 && current + bytes > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        total += bytes;
        shards
            .last_mut()
            .expect("one shard")
            .push((name.clone(), t.detach().to_device(tch::Device::Cpu)));
    }
    // The index (or, unsharded, model.safetensors) is what loaders read first:
    // an old one must not survive beside new weights, and the new one is
    // written last, so a save cut short is an error to load, never a mix.
    let index_path = dir.join("model.safetensors.index.json");
    remove_if_present(&index_path)?;
    let write = |shard: &[(String, Tensor)], path: &Path| {
        trl_like::fsutil::write_atomic_with(path, |tmp| {
            Tensor::write_safetensors(shard, tmp).map_err(to_io)
        })
    };
    if shards.len() == 1 {
        write(&shards[0], &dir.join("model.safetensors"))?;
        return remove_stale_shards(dir, &[]);
    }
    remove_if_present(&dir.join("model.safetensors"))?;
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::with_capacity(n);
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write(shard, &dir.join(&file))?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        files.push(file);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index)? + "\n";
    trl_like::fsutil::write_atomic(&index_path, text.as_bytes())?;
    remove_stale_shards(dir, &files)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Deletes `model-*-of-*.safetensors` files of an earlier save that `keep` does not name.
fn remove_stale_shards(dir: &Path, keep: &[String]) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if trl_like::trainer::output_dir::is_weight_shard(&name) && !keep.contains(&name) {
            remove_if_present(&dir.join(&name))?;
        }
    }
    Ok(())
}
