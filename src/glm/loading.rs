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
use tch::{nn::VarStore, Device, Kind, Tensor};
use trl_like::quant::{Packed4bit, Quant4bitConfig, QuantType, BLOCKSIZE};

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

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
    )
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
            if let Some((key, _)) = name.split_once(".quant_state.bitsandbytes__") {
                // A pre-quantized checkpoint's JSON quant state: checked against the 4-bit
                // storage, its nested offset filled in.
                if !variables.contains_key(&format!("{key}.absmax")) {
                    unexpected.push(name);
                    continue;
                }
                filled.extend(read_quant_state(&variables, key, &name, view.data(), file)?);
                continue;
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let kind = kind_of(view.dtype()).ok_or_else(|| {
                file_err(
                    file,
                    format!("tensor {name} has unsupported dtype {:?}", view.dtype()),
                )
            })?;
            if is_float(kind) && variables.contains_key(&format!("{name}.absmax")) {
                // A dense weight of a 4-bit layer: quantized now, so the model never holds
                // it dense (transformers casts to `dtype` first, then bitsandbytes quantizes).
                let src = Tensor::f_from_data_size(view.data(), &shape, kind)
                    .map_err(|e| file_err(file, format!("tensor {name}: {e}")))?;
                filled.extend(quantize_into(
                    &variables,
                    &name,
                    &src,
                    vs.kind(),
                    vs.device(),
                    file,
                )?);
                bar.inc(view.data().len() as u64);
                continue;
            }
            let Some(var) = variables.get_mut(&name) else {
                unexpected.push(name);
                continue;
            };
            let storage_view = var.kind() == Kind::Uint8
                && is_float(kind)
                && (shape.iter().product::<i64>() * kind.elt_size_in_bytes() as i64)
                    == var.numel() as i64;
            if shape != var.size() && !storage_view {
                return Err(LoadError::Shape {
                    file: file.display().to_string(),
                    name,
                    expected: var.size(),
                    found: shape,
                });
            }
            let mut src = Tensor::f_from_data_size(view.data(), &shape, kind)
                .map_err(|e| file_err(file, format!("tensor {name}: {e}")))?;
            if var.kind() == Kind::Uint8 && kind != Kind::Uint8 && is_float(kind) {
                // bnb_4bit_quant_storage: the same packed bytes saved under another dtype.
                let bytes = src.numel() * kind.elt_size_in_bytes();
                if bytes as i64 == var.numel() as i64 {
                    src = src.view_dtype(Kind::Uint8).reshape(var.size());
                }
            }
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

/// The 4-bit configuration of the storage registered under `key` (a weight's key).
fn storage_config(variables: &HashMap<String, Tensor>, key: &str) -> Quant4bitConfig {
    // bitsandbytes tells the two code books apart the same way: FP4's code 1 is positive.
    let fp4 = variables
        .get(&format!("{key}.quant_map"))
        .is_some_and(|c| c.double_value(&[1]) > 0.0);
    Quant4bitConfig {
        quant_type: if fp4 { QuantType::Fp4 } else { QuantType::Nf4 },
        nested: variables.contains_key(&format!("{key}.nested_absmax")),
    }
}

/// Quantizes the dense checkpoint weight `src` into the 4-bit storage registered under
/// `name`; returns the variable names it filled.
fn quantize_into(
    variables: &HashMap<String, Tensor>,
    name: &str,
    src: &Tensor,
    kind: Kind,
    device: Device,
    file: &Path,
) -> Result<Vec<String>, LoadError> {
    let packed = &variables[name];
    let expected = packed.size()[0];
    if src.dim() != 2 || (src.numel() as i64 + 1) / 2 != expected {
        return Err(file_err(
            file,
            format!(
                "tensor {name} has shape {:?}, the model's 4-bit layer holds a matrix of {} values",
                src.size(),
                2 * expected
            ),
        ));
    }
    let w = src.to_device(device).to_kind(kind);
    let q = Packed4bit::quantize(&w, storage_config(variables, name))
        .map_err(|e| file_err(file, format!("{name}{e}")))?;
    let mut filled = Vec::new();
    for (suffix, t) in q.tensors() {
        let key = state_key(name, suffix);
        let dst = variables
            .get(&key)
            .ok_or_else(|| file_err(file, format!("{key}: no 4-bit storage for it")))?;
        dst.shallow_clone()
            .f_copy_(t)
            .map_err(|e| file_err(file, format!("tensor {key}: {e}")))?;
        filled.push(key);
    }
    Ok(filled)
}

fn state_key(name: &str, suffix: &str) -> String {
    if suffix.is_empty() {
        name.to_string()
    } else {
        format!("{name}.{suffix}")
    }
}

/// Checks a saved `quant_state.bitsandbytes__*` JSON against the storage under `key` and
/// fills the nested offset it carries; returns the variable names it filled.
fn read_quant_state(
    variables: &HashMap<String, Tensor>,
    key: &str,
    name: &str,
    bytes: &[u8],
    file: &Path,
) -> Result<Vec<String>, LoadError> {
    let bad = |msg: String| file_err(file, format!("tensor {name}: {msg}"));
    let fields: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not a JSON quant state ({e})")))?;
    let want = storage_config(variables, key);
    let quant_type = fields.get("quant_type").and_then(|v| v.as_str());
    if quant_type != Some(want.quant_type.as_str()) {
        return Err(bad(format!(
            "quant_type {quant_type:?}, but the checkpoint's quantization_config says {:?}",
            want.quant_type.as_str()
        )));
    }
    let blocksize = fields.get("blocksize").and_then(|v| v.as_i64());
    if blocksize != Some(BLOCKSIZE) {
        return Err(bad(format!(
            "blocksize {blocksize:?}; only {BLOCKSIZE} (what transformers writes) is supported"
        )));
    }
    let offset = fields.get("nested_offset").and_then(|v| v.as_f64());
    match (offset, want.nested) {
        (Some(offset), true) => {
            let slot = format!("{key}.nested_offset");
            let _ = variables[&slot].shallow_clone().fill_(offset as f32 as f64);
            Ok(vec![slot])
        }
        (None, false) => Ok(Vec::new()),
        (Some(_), false) => Err(bad(
            "is nested, but the quantization_config says bnb_4bit_use_double_quant false".into(),
        )),
        (None, true) => Err(bad(
            "has no nested_offset, but the quantization_config says \
             bnb_4bit_use_double_quant true"
                .into(),
        )),
    }
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
