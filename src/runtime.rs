//! Where the computation runs: device and dtype choice, and what `glm4 env` reports.

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};
use trl_like::config::TorchDtype;

/// Parses `--device`: `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("--device {other:?} is not one of auto, cpu, cuda, cuda:N"),
        },
    })
    .and_then(|d| {
        if let Device::Cuda(n) = d {
            if !tch::Cuda::is_available() {
                bail!("--device {name}: CUDA is not available on this machine (see `glm4 env`)");
            }
            if n >= tch::Cuda::device_count() as usize {
                bail!(
                    "--device {name}: only {} CUDA device(s) present",
                    tch::Cuda::device_count()
                );
            }
        }
        Ok(d)
    })
}

/// Parses `--torch_dtype` (auto | bfloat16 | float16 | float32) and resolves it
/// with [`resolve_dtype`].
pub fn parse_dtype(
    name: &str,
    checkpoint_dtype: Option<TorchDtype>,
    device: Device,
) -> Result<Kind> {
    Ok(resolve_dtype(dtype_arg(name)?, checkpoint_dtype, device))
}

/// The value of `--torch_dtype`, unresolved.
pub fn dtype_arg(name: &str) -> Result<TorchDtype> {
    TorchDtype::from_name(name).with_context(|| {
        format!("--torch_dtype {name:?} is not one of auto, bfloat16, float16, float32")
    })
}

/// `auto` takes the checkpoint's dtype on CUDA, and float32 on CPU, where bf16
/// matmuls are very slow.
pub fn resolve_dtype(
    dtype: TorchDtype,
    checkpoint_dtype: Option<TorchDtype>,
    device: Device,
) -> Kind {
    match dtype.to_kind() {
        Some(kind) => kind,
        None if device == Device::Cpu => Kind::Float,
        None => checkpoint_dtype
            .and_then(TorchDtype::to_kind)
            .unwrap_or(Kind::BFloat16),
    }
}

/// The libtorch shared library this process actually loaded (from /proc/self/maps).
pub fn loaded_libtorch_dir() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
}

/// The libtorch version, read beside the loaded library (pip wheels carry
/// `torch/version.py`, standalone libtorch `build-version`).
pub fn libtorch_version(lib_dir: &std::path::Path) -> Option<String> {
    let torch_dir = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(torch_dir.join("version.py")) {
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("__version__ = ") {
                return Some(v.trim().trim_matches('\'').trim_matches('"').to_string());
            }
        }
    }
    std::fs::read_to_string(torch_dir.join("build-version"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// GPU names from nvidia-smi (tch has no device-name API); empty when unavailable.
pub fn gpu_names() -> Vec<String> {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
