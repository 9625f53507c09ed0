//! `--deepspeed FILE` (transformers' `TrainingArguments.deepspeed`): a
//! DeepSpeed config (JSON or YAML) or an accelerate config file whose
//! `distributed_type` is `DEEPSPEED` (the tutorial's `configs/zero2.yaml`).
//!
//! What this trainer implements of it: ZeRO stages 0, 1 and 2 with fp32
//! master weights and moments (DeepSpeed's bf16 optimizer), gradient
//! clipping, and the batch arithmetic. Values may be `"auto"` (filled from
//! the training flags, as transformers' `HfTrainerDeepSpeedConfig` does); a
//! concrete value that contradicts a flag is refused showing both, and every
//! setting that would change what runs but is not implemented (offload to
//! CPU/NVMe, ZeRO-3, fp16 loss scaling, a DeepSpeed scheduler) is refused by
//! name rather than ignored.

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

use super::TrainingArguments;

/// Why a DeepSpeed / accelerate config cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--deepspeed {path}: {message}")]
pub struct DeepSpeedError {
    pub path: String,
    pub message: String,
}

/// A value that is either `"auto"` (take the training flag) or concrete.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Auto<T> {
    Auto,
    Value(T),
}

/// The settings of a DeepSpeed config that this trainer acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepSpeedConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// `zero_optimization.stage` / `deepspeed_config.zero_stage`.
    pub zero_stage: u8,
    /// `bf16.enabled` / accelerate's `mixed_precision: bf16` (None: not given).
    pub bf16: Option<Auto<bool>>,
    pub gradient_clipping: Option<Auto<f64>>,
    pub train_micro_batch_size_per_gpu: Option<Auto<usize>>,
    pub gradient_accumulation_steps: Option<Auto<usize>>,
    pub train_batch_size: Option<Auto<usize>>,
    /// `optimizer.params` entries (`lr`, `betas`, `eps`, `weight_decay`) that are not "auto".
    pub optimizer_params: Vec<(String, Value)>,
}

/// What a run does with a [`DeepSpeedConfig`] once checked against the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroPlan {
    /// 0: replicated fp32 master and moments; 1: sharded optimizer state;
    /// 2: sharded optimizer state and gradients.
    pub stage: u8,
    /// bf16 mixed precision (fp32 master weights either way).
    pub bf16: bool,
}

/// Accelerate's bookkeeping keys: they describe the launch, not the training.
const ACCELERATE_BOOKKEEPING: &[&str] = &[
    "compute_environment",
    "debug",
    "downcast_bf16",
    "machine_rank",
    "main_training_function",
    "rdzv_backend",
    "same_network",
    "tpu_env",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "use_cpu",
    "num_machines",
    "num_processes",
    "gpu_ids",
    "main_process_ip",
    "main_process_port",
    "enable_cpu_affinity",
    "dynamo_config",
];

/// DeepSpeed keys without effect on what is computed (logging, timers).
const DEEPSPEED_BOOKKEEPING: &[&str] = &[
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "dump_state",
    "prescale_gradients",
];

/// `zero_optimization` keys that tune communication overlap and bucket sizes
/// (the result is the same sums), or that only ZeRO-3 reads.
const ZERO_TUNING: &[&str] = &[
    "overlap_comm",
    "contiguous_gradients",
    "reduce_scatter",
    "reduce_bucket_size",
    "allgather_partitions",
    "allgather_bucket_size",
    "round_robin_gradients",
    "sub_group_size",
    "load_from_fp32_weights",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save",
];

impl DeepSpeedConfig {
    /// Reads and checks `path` (JSON, or YAML by extension or when JSON fails).
    pub fn from_file(path: &Path) -> Result<Self, DeepSpeedError> {
        let err = |message: String| DeepSpeedError {
            path: path.display().to_string(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot read the file: {e}")))?;
        let value: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(json_err) => serde_yaml_ng::from_str(&text).map_err(|yaml_err| {
                err(format!(
                    "neither JSON ({json_err}) nor YAML ({yaml_err}); expected a DeepSpeed config \
                     or an accelerate config with distributed_type DEEPSPEED"
                ))
            })?,
        };
        Self::from_value(path, &value).map_err(err)
    }

    /// Parses an already-read config (the message names the offending key).
    pub fn from_value(path: &Path, value: &Value) -> Result<Self, String> {
        let Value::Object(top) = value else {
            return Err("expected a mapping at the top level".into());
        };
        if top.contains_key("distributed_type") {
            Self::from_accelerate(path, top)
        } else {
            Self::from_deepspeed(path, top)
        }
    }

    /// accelerate's config file (`accelerate config` output).
    fn from_accelerate(path: &Path, top: &Map<String, Value>) -> Result<Self, String> {
        let kind = top.get("distributed_type").and_then(Value::as_str);
        if kind != Some("DEEPSPEED") {
            return Err(format!(
                "distributed_type {} is not DEEPSPEED; only DeepSpeed accelerate configs are read \
                 here (for plain data parallelism launch with torchrun and no --deepspeed)",
                show(top.get("distributed_type"))
            ));
        }
        let mut cfg = DeepSpeedConfig::empty(path);
        for (key, v) in top {
            match key.as_str() {
                "distributed_type" => {}
                "mixed_precision" => {
                    cfg.bf16 =
                        match v.as_str() {
                            Some("bf16") => Some(Auto::Value(true)),
                            Some("no") => Some(Auto::Value(false)),
                            Some("fp16") => return Err(
                                "mixed_precision fp16 is not supported (fp16 needs loss scaling, \
                                 which is not implemented); use bf16 or no"
                                    .into(),
                            ),
                            _ => {
                                return Err(format!(
                                    "mixed_precision {}: expected bf16 or no",
                                    show(Some(v))
                                ))
                            }
                        }
                }
                "deepspeed_config" => {
                    let Value::Object(ds) = v else {
                        return Err("deepspeed_config: expected a mapping".into());
                    };
                    cfg.read_accelerate_deepspeed(path, ds)?;
                }
                k if ACCELERATE_BOOKKEEPING.contains(&k) => {}
                other => {
                    return Err(format!(
                        "key `{other}` is not supported in an accelerate config here (known: \
                         distributed_type, mixed_precision, deepspeed_config and accelerate's \
                         launch bookkeeping keys)"
                    ))
                }
            }
        }
        Ok(cfg)
    }

    fn read_accelerate_deepspeed(
        &mut self,
        path: &Path,
        ds: &Map<String, Value>,
    ) -> Result<(), String> {
        for (key, v) in ds {
            let field = format!("deepspeed_config.{key}");
            match key.as_str() {
                "zero_stage" => self.zero_stage = stage(&field, v)?,
                "gradient_clipping" => self.gradient_clipping = Some(auto_f64(&field, v)?),
                "gradient_accumulation_steps" => {
                    self.gradient_accumulation_steps = Some(auto_usize(&field, v)?)
                }
                "offload_optimizer_device" | "offload_param_device" => no_offload(&field, v)?,
                "zero3_init_flag" | "zero3_save_16bit_model" => {
                    if v.as_bool() == Some(true) {
                        return Err(format!(
                            "{field} true needs ZeRO-3, which is not implemented; set it to false"
                        ));
                    }
                }
                "deepspeed_config_file" => {
                    let file = v.as_str().ok_or(format!("{field}: expected a path"))?;
                    let file = path.parent().unwrap_or(Path::new(".")).join(file);
                    let inner = DeepSpeedConfig::from_file(&file).map_err(|e| e.to_string())?;
                    let keep_bf16 = self.bf16;
                    *self = DeepSpeedConfig {
                        path: path.to_path_buf(),
                        bf16: inner.bf16.or(keep_bf16),
                        ..inner
                    };
                }
                other => {
                    return Err(format!(
                        "deepspeed_config.{other} is not supported (known: zero_stage, \
                         gradient_clipping, gradient_accumulation_steps, offload_optimizer_device, \
                         offload_param_device, zero3_init_flag, zero3_save_16bit_model, \
                         deepspeed_config_file)"
                    ))
                }
            }
        }
        Ok(())
    }

    /// A DeepSpeed config (`ds_config.json`).
    fn from_deepspeed(path: &Path, top: &Map<String, Value>) -> Result<Self, String> {
        let mut cfg = DeepSpeedConfig::empty(path);
        for (key, v) in top {
            match key.as_str() {
                "zero_optimization" => {
                    let Value::Object(z) = v else {
                        return Err("zero_optimization: expected a mapping".into());
                    };
                    for (zk, zv) in z {
                        let field = format!("zero_optimization.{zk}");
                        match zk.as_str() {
                            "stage" => cfg.zero_stage = stage(&field, zv)?,
                            "offload_optimizer" | "offload_param" => {
                                let device = zv.get("device").unwrap_or(&Value::Null);
                                no_offload(&format!("{field}.device"), device)?
                            }
                            k if ZERO_TUNING.contains(&k) => {
                                log::info!("{}: {field} does not change the result here (buckets and overlap are fixed); noted", path.display());
                            }
                            other => {
                                return Err(format!("zero_optimization.{other} is not supported"))
                            }
                        }
                    }
                }
                "bf16" | "bfloat16" => cfg.bf16 = enabled(key, v)?,
                "fp16" => {
                    if enabled(key, v)? == Some(Auto::Value(true)) {
                        return Err(
                            "fp16.enabled true is not supported (fp16 needs loss scaling, \
                                    which is not implemented); use bf16"
                                .into(),
                        );
                    }
                }
                "gradient_clipping" => cfg.gradient_clipping = Some(auto_f64(key, v)?),
                "train_micro_batch_size_per_gpu" => {
                    cfg.train_micro_batch_size_per_gpu = Some(auto_usize(key, v)?)
                }
                "gradient_accumulation_steps" => {
                    cfg.gradient_accumulation_steps = Some(auto_usize(key, v)?)
                }
                "train_batch_size" => cfg.train_batch_size = Some(auto_usize(key, v)?),
                "optimizer" => cfg.optimizer_params = optimizer(v)?,
                "scheduler" => {
                    return Err(
                        "scheduler is not supported: the schedule comes from \
                                --lr_scheduler_type and --warmup_steps; remove the scheduler block"
                            .into(),
                    )
                }
                k if DEEPSPEED_BOOKKEEPING.contains(&k) => {}
                other => return Err(format!("key `{other}` is not supported")),
            }
        }
        Ok(cfg)
    }

    fn empty(path: &Path) -> Self {
        DeepSpeedConfig {
            path: path.to_path_buf(),
            zero_stage: 0,
            bf16: None,
            gradient_clipping: None,
            train_micro_batch_size_per_gpu: None,
            gradient_accumulation_steps: None,
            train_batch_size: None,
            optimizer_params: Vec::new(),
        }
    }

    /// Checks the concrete values against the training flags (transformers'
    /// `fill_match`: a mismatch is an error showing both values) and returns
    /// what the run does.
    pub fn resolve(
        &self,
        args: &TrainingArguments,
        world_size: usize,
    ) -> Result<ZeroPlan, DeepSpeedError> {
        let mut mismatches = Vec::new();
        let mut check = |key: &str, ds: String, flag: &str, ours: String, equal: bool| {
            if !equal {
                mismatches.push(format!("{key} = {ds} vs --{flag} {ours}"));
            }
        };
        let ga = args.gradient_accumulation_steps;
        if let Some(Auto::Value(v)) = self.train_micro_batch_size_per_gpu {
            let ours = args.per_device_train_batch_size;
            check(
                "train_micro_batch_size_per_gpu",
                v.to_string(),
                "per_device_train_batch_size",
                ours.to_string(),
                v == ours,
            );
        }
        if let Some(Auto::Value(v)) = self.gradient_accumulation_steps {
            check(
                "gradient_accumulation_steps",
                v.to_string(),
                "gradient_accumulation_steps",
                ga.to_string(),
                v == ga,
            );
        }
        if let Some(Auto::Value(v)) = self.train_batch_size {
            let ours = args.per_device_train_batch_size * ga * world_size;
            check(
                "train_batch_size",
                v.to_string(),
                "per_device_train_batch_size x gradient_accumulation_steps x world size",
                ours.to_string(),
                v == ours,
            );
        }
        if let Some(Auto::Value(v)) = self.gradient_clipping {
            let ours = args.max_grad_norm;
            check(
                "gradient_clipping",
                v.to_string(),
                "max_grad_norm",
                ours.to_string(),
                v == ours,
            );
        }
        let bf16 = match self.bf16 {
            Some(Auto::Value(v)) => {
                let ours = args.use_bf16();
                check(
                    "bf16.enabled (mixed_precision)",
                    v.to_string(),
                    "bf16",
                    ours.to_string(),
                    v == ours,
                );
                v
            }
            _ => args.use_bf16(),
        };
        for (name, v) in &self.optimizer_params {
            let (flag, equal, ours) = match name.as_str() {
                "lr" => (
                    "learning_rate",
                    v.as_f64() == Some(args.learning_rate),
                    args.learning_rate.to_string(),
                ),
                "eps" => (
                    "adam_epsilon",
                    v.as_f64() == Some(args.adam_epsilon),
                    args.adam_epsilon.to_string(),
                ),
                "weight_decay" => (
                    "weight_decay",
                    v.as_f64() == Some(args.weight_decay),
                    args.weight_decay.to_string(),
                ),
                "betas" => {
                    let given: Option<Vec<f64>> = v
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_f64).collect());
                    let ours = vec![args.adam_beta1, args.adam_beta2];
                    (
                        "adam_beta1/adam_beta2",
                        given.as_ref() == Some(&ours),
                        format!("{ours:?}"),
                    )
                }
                _ => continue,
            };
            check(
                &format!("optimizer.params.{name}"),
                v.to_string(),
                flag,
                ours,
                equal,
            );
        }
        if !mismatches.is_empty() {
            return Err(DeepSpeedError {
                path: self.path.display().to_string(),
                message: format!(
                    "values contradict the training flags ({}); set them to \"auto\" or to the flags' values",
                    mismatches.join("; ")
                ),
            });
        }
        Ok(ZeroPlan {
            stage: self.zero_stage,
            bf16,
        })
    }
}

fn show(v: Option<&Value>) -> String {
    v.map_or("(missing)".into(), |v| v.to_string())
}

fn is_auto(v: &Value) -> bool {
    v.as_str() == Some("auto")
}

fn stage(field: &str, v: &Value) -> Result<u8, String> {
    match v.as_u64() {
        Some(s @ 0..=2) => Ok(s as u8),
        Some(3) => Err(format!(
            "{field} 3 (ZeRO-3, sharded weights) is not implemented; use stage 2 (sharded \
             optimizer state and gradients) or 1"
        )),
        _ => Err(format!("{field} {}: expected 0, 1 or 2", show(Some(v)))),
    }
}

fn auto_f64(field: &str, v: &Value) -> Result<Auto<f64>, String> {
    if is_auto(v) {
        return Ok(Auto::Auto);
    }
    v.as_f64()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .map(Auto::Value)
        .ok_or(format!(
            "{field} {}: expected a non-negative number or \"auto\"",
            show(Some(v))
        ))
}

fn auto_usize(field: &str, v: &Value) -> Result<Auto<usize>, String> {
    if is_auto(v) {
        return Ok(Auto::Auto);
    }
    v.as_u64()
        .filter(|&x| x > 0)
        .map(|x| Auto::Value(x as usize))
        .ok_or(format!(
            "{field} {}: expected a positive integer or \"auto\"",
            show(Some(v))
        ))
}

fn enabled(key: &str, v: &Value) -> Result<Option<Auto<bool>>, String> {
    match v.get("enabled") {
        None => Ok(None),
        Some(e) if is_auto(e) => Ok(Some(Auto::Auto)),
        Some(Value::Bool(b)) => Ok(Some(Auto::Value(*b))),
        Some(other) => Err(format!(
            "{key}.enabled {other}: expected true, false or \"auto\""
        )),
    }
}

fn no_offload(field: &str, v: &Value) -> Result<(), String> {
    match v {
        Value::Null => Ok(()),
        Value::String(s) if s == "none" => Ok(()),
        other => Err(format!(
            "{field} {other}: offloading to CPU or NVMe is not supported; set it to none"
        )),
    }
}

/// `optimizer`: AdamW (or Adam, which DeepSpeed runs as AdamW with
/// `adam_w_mode`) whose concrete params are checked against the flags.
fn optimizer(v: &Value) -> Result<Vec<(String, Value)>, String> {
    let ty = v.get("type").and_then(Value::as_str).unwrap_or("AdamW");
    if !matches!(ty.to_ascii_lowercase().as_str(), "adamw" | "adam") {
        return Err(format!(
            "optimizer.type {ty} is not supported; only AdamW (the trainer's --optim)"
        ));
    }
    let mut out = Vec::new();
    if let Some(Value::Object(params)) = v.get("params") {
        for (k, pv) in params {
            match k.as_str() {
                "lr" | "betas" | "eps" | "weight_decay" => {
                    if !is_auto(pv) {
                        out.push((k.clone(), pv.clone()));
                    }
                }
                "torch_adam" | "adam_w_mode" => {}
                other => return Err(format!("optimizer.params.{other} is not supported")),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SFTConfig;
    use serde_json::json;

    fn parse(v: Value) -> Result<DeepSpeedConfig, String> {
        DeepSpeedConfig::from_value(Path::new("ds.json"), &v)
    }

    #[test]
    fn deepspeed_json_with_auto_values_resolves_from_the_flags() {
        let cfg = parse(json!({
            "zero_optimization": {"stage": 2, "overlap_comm": true, "offload_optimizer": {"device": "none"}},
            "bf16": {"enabled": "auto"},
            "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}},
            "steps_per_print": 10
        }))
        .unwrap();
        let args = TrainingArguments {
            bf16: Some(false),
            ..SFTConfig::default().args
        };
        assert_eq!(
            cfg.resolve(&args, 4).unwrap(),
            ZeroPlan {
                stage: 2,
                bf16: false
            }
        );
    }

    #[test]
    fn contradicting_values_show_both() {
        let cfg = parse(json!({
            "zero_optimization": {"stage": 1},
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 0.5,
            "train_batch_size": 16
        }))
        .unwrap();
        let args = TrainingArguments {
            per_device_train_batch_size: 2,
            ..SFTConfig::default().args
        };
        let e = cfg.resolve(&args, 2).unwrap_err().to_string();
        assert!(
            e.contains("train_micro_batch_size_per_gpu = 4 vs --per_device_train_batch_size 2"),
            "{e}"
        );
        assert!(
            e.contains("gradient_clipping = 0.5 vs --max_grad_norm 1"),
            "{e}"
        );
        assert!(e.contains("train_batch_size = 16"), "{e}");
        // The same numbers as the flags pass.
        let args = TrainingArguments {
            per_device_train_batch_size: 4,
            max_grad_norm: 0.5,
            gradient_accumulation_steps: 2,
            ..SFTConfig::default().args
        };
        assert_eq!(cfg.resolve(&args, 2).unwrap().stage, 1);
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        for (v, name) in [
            (json!({"zero_optimization": {"stage": 3}}), "stage 3"),
            (
                json!({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}),
                "offload_optimizer.device",
            ),
            (json!({"fp16": {"enabled": true}}), "fp16"),
            (json!({"scheduler": {"type": "WarmupLR"}}), "scheduler"),
            (
                json!({"zero_optimization": {"stage": 2, "mics_shard_size": 2}}),
                "mics_shard_size",
            ),
            (
                json!({"activation_checkpointing": {}}),
                "activation_checkpointing",
            ),
            (json!({"optimizer": {"type": "Lamb"}}), "Lamb"),
            (json!({"distributed_type": "FSDP"}), "FSDP"),
            (
                json!({"distributed_type": "DEEPSPEED", "deepspeed_config": {"offload_param_device": "nvme"}}),
                "offload_param_device",
            ),
            (
                json!({"distributed_type": "DEEPSPEED", "fsdp_config": {}}),
                "fsdp_config",
            ),
            (
                json!({"distributed_type": "DEEPSPEED", "mixed_precision": "fp16"}),
                "fp16",
            ),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert!(e.contains(name), "{v}: {e}");
        }
    }

    #[test]
    fn accelerate_zero2_yaml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepspeed/accelerate_zero2.yaml");
        let cfg = DeepSpeedConfig::from_file(&path).unwrap();
        assert_eq!(cfg.zero_stage, 2);
        assert_eq!(cfg.bf16, Some(Auto::Value(true)));
        assert_eq!(cfg.gradient_clipping, Some(Auto::Value(1.0)));
        // TRL's defaults (bf16 on, max_grad_norm 1.0) agree with it.
        assert_eq!(
            cfg.resolve(&SFTConfig::default(), 8).unwrap(),
            ZeroPlan {
                stage: 2,
                bf16: true
            }
        );
        let e = cfg
            .resolve(
                &TrainingArguments {
                    bf16: Some(false),
                    ..SFTConfig::default().args
                },
                8,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bf16.enabled (mixed_precision) = true vs --bf16 false"),
            "{e}"
        );
        // The shipped configs/zero2.yaml is the same file.
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/zero2.yaml");
        assert_eq!(DeepSpeedConfig::from_file(&shipped).unwrap().zero_stage, 2);
    }

    #[test]
    fn unreadable_files_name_the_path() {
        let e = DeepSpeedConfig::from_file(Path::new("/nonexistent/ds.json")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ds.json"), "{e}");
    }
}
