//! LoRA as PEFT does it, and PEFT's file format both ways.
//!
//! `y = W x + b + scaling · B(A(dropout(x)))` with `scaling = lora_alpha / r`
//! (`lora_alpha / √r` with rsLoRA); A is kaiming-uniform(a=√5), B zeros, so a
//! fresh adapter leaves the model unchanged. Adapters live in a VarStore of
//! their own (fp32 even on a bf16 base), which is all the optimizer ever sees.
//! Saved as `adapter_model.safetensors` (keys
//! `base_model.model.<module>.lora_A.weight` / `lora_B.weight`) plus
//! `adapter_config.json`, which `PeftModel.from_pretrained` opens.

// Re-exported: the adapter type lives beside the layer that carries it.
pub use crate::nn::LoraLayer;
use crate::nn::{Linear, LinearWeight};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names matched like PEFT: equal to, or the last dotted part of, the module path.
    Names(Vec<String>),
    /// Every linear layer except the output head (`lm_head`).
    AllLinear,
    /// A single string in `adapter_config.json` other than "all-linear": PEFT
    /// treats it as a regular expression the whole module path must match.
    Regex(String),
}

impl Serialize for TargetModules {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::Names(v) => v.serialize(s),
            TargetModules::AllLinear => "all-linear".serialize(s),
            TargetModules::Regex(r) => r.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == "all-linear" => Ok(TargetModules::AllLinear),
            Value::String(s) => Ok(TargetModules::Regex(s)),
            Value::Array(v) => v
                .into_iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| serde::de::Error::custom("target_modules must be strings"))
                })
                .collect::<Result<_, _>>()
                .map(TargetModules::Names),
            _ => Err(serde::de::Error::custom(
                "target_modules must be a list of names or \"all-linear\"",
            )),
        }
    }
}

impl TargetModules {
    /// PEFT's rule for a list of names: `module == name` or `module.endswith("." + name)`;
    /// a regex must match the whole module path.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::AllLinear => module != "lm_head" && !module.ends_with(".lm_head"),
            TargetModules::Names(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            TargetModules::Regex(r) => {
                regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(module))
            }
        }
    }

    /// How `adapter_config.json` spells it, for messages.
    pub fn describe(&self) -> String {
        match self {
            TargetModules::Names(v) => format!("{v:?}"),
            TargetModules::AllLinear => "\"all-linear\"".into(),
            TargetModules::Regex(r) => format!("{r:?} (a regular expression)"),
        }
    }
}

/// PEFT's `LoraConfig` (the fields this crate uses; unknown keys of an
/// `adapter_config.json` are ignored when reading, as PEFT's newer fields are).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: i64,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Only layers with these indices get adapters (PEFT accepts one int or a list).
    #[serde(default, deserialize_with = "one_or_many")]
    pub layers_to_transform: Option<Vec<i64>>,
    /// The name of the layer list whose index `layers_to_transform` refers to
    /// (e.g. "layers"); unset: the number after any dotted name.
    #[serde(default, deserialize_with = "one_or_many")]
    pub layers_pattern: Option<Vec<String>>,
}

/// `x` or `[x, ...]` (or null) as an optional list.
fn one_or_many<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Array(v) => v
            .into_iter()
            .map(|x| serde_json::from_value(x).map_err(serde::de::Error::custom))
            .collect::<Result<Vec<T>, _>>()
            .map(Some),
        x => serde_json::from_value(x)
            .map(|one| Some(vec![one]))
            .map_err(serde::de::Error::custom),
    }
}

fn default_bias() -> String {
    "none".into()
}

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("invalid LoRA setting: {0}")]
    Config(String),
    #[error("{adapter}: the adapter targets module {module}, which this model does not have (its linear modules are: {available})")]
    UnknownModule {
        adapter: String,
        module: String,
        available: String,
    },
    #[error("{adapter}: tensor {name} has shape {found:?}, the model needs {expected:?} (is the adapter made for another base model?)")]
    Shape {
        adapter: String,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("none of the model's linear modules match target_modules {0}")]
    NoTargets(String),
    #[error("{adapter}: adapter_config.json and adapter_model.safetensors disagree: the config says {config} ({expected}), the file holds adapters for {found}{detail}; fix the config or use the adapter it was saved with")]
    ConfigMismatch {
        adapter: String,
        config: String,
        expected: String,
        found: String,
        detail: String,
    },
}

/// The LoRA config of a `ModelConfig` (TRL's `get_peft_config(model_args)`):
/// `None` when `use_peft` is off (full fine-tuning).
pub fn get_peft_config(
    model: &crate::config::ModelConfig,
) -> Result<Option<LoraConfig>, PeftError> {
    if !model.use_peft {
        return Ok(None);
    }
    if model
        .lora_modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(PeftError::Config(
            "--lora_modules_to_save is not supported yet; remove it from the config or flags"
                .into(),
        ));
    }
    let targets = if model.targets_all_linear() {
        TargetModules::AllLinear
    } else {
        // PEFT's default for GLM is q/k/v like the tutorial's.
        TargetModules::Names(
            model
                .lora_target_modules
                .clone()
                .unwrap_or_else(|| vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]),
        )
    };
    let mut cfg = LoraConfig::new(
        model.lora_r as i64,
        model.lora_alpha as f64,
        model.lora_dropout,
        targets,
    );
    cfg.use_rslora = model.use_rslora;
    cfg.use_dora = model.use_dora;
    Ok(Some(cfg))
}

impl LoraConfig {
    pub fn new(r: i64, lora_alpha: f64, lora_dropout: f64, target_modules: TargetModules) -> Self {
        Self {
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            use_rslora: false,
            modules_to_save: None,
            bias: default_bias(),
            base_model_name_or_path: None,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            fan_in_fan_out: false,
            layers_to_transform: None,
            layers_pattern: None,
        }
    }

    /// PEFT's `check_target_module_exists`: whether `module` (a full module path)
    /// gets an adapter. `layers_to_transform` narrows name-suffix matches (and
    /// "all-linear", which PEFT expands into names) to the listed layer indices.
    pub fn targets(&self, module: &str) -> bool {
        let by_suffix = match &self.target_modules {
            TargetModules::Regex(_) => return self.target_modules.matches(module),
            TargetModules::Names(names) if names.iter().any(|n| n == module) => return true,
            t => t.matches(module),
        };
        let Some(layers) = self.layers_to_transform.as_ref().filter(|l| !l.is_empty()) else {
            return by_suffix;
        };
        by_suffix
            && self
                .layer_index(module)
                .is_some_and(|i| layers.contains(&i))
    }

    /// The layer index in a module path, found as PEFT finds it.
    fn layer_index(&self, module: &str) -> Option<i64> {
        let patterns: Vec<String> = match self.layers_pattern.as_ref().filter(|p| !p.is_empty()) {
            None => vec![r"^.*\.[^.]*\.(\d+)\.".into()],
            Some(p) => p
                .iter()
                .map(|name| format!(r"^.*\.{name}\.(\d+)\."))
                .collect(),
        };
        patterns.iter().find_map(|p| {
            regex::Regex::new(p)
                .ok()?
                .captures(module)?
                .get(1)?
                .as_str()
                .parse()
                .ok()
        })
    }

    /// `target_modules` and the layer settings as the config states them, for messages.
    fn describe_targets(&self) -> String {
        let mut out = format!("target_modules {}", self.target_modules.describe());
        if let Some(l) = &self.layers_to_transform {
            out.push_str(&format!(", layers_to_transform {l:?}"));
        }
        if let Some(p) = &self.layers_pattern {
            out.push_str(&format!(", layers_pattern {p:?}"));
        }
        out
    }

    pub fn validate(&self) -> Result<(), PeftError> {
        if self.r <= 0 {
            return Err(PeftError::Config(format!(
                "lora_r must be at least 1, got {}",
                self.r
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::Config(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        if self.use_dora {
            return Err(PeftError::Config("use_dora is not supported yet".into()));
        }
        if self.bias != "none" {
            return Err(PeftError::Config(format!(
                "bias {:?} is not supported (only \"none\")",
                self.bias
            )));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(PeftError::Config(
                "rank_pattern / alpha_pattern are not supported yet".into(),
            ));
        }
        if self.fan_in_fan_out {
            return Err(PeftError::Config(
                "fan_in_fan_out adapters (GPT-2 Conv1D) do not apply to GLM-4".into(),
            ));
        }
        Ok(())
    }

    /// The factor on `B·A`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// `adapter_config.json` with PEFT's field names and values.
    pub fn to_peft_json(&self, inference_mode: bool) -> Value {
        let targets = match &self.target_modules {
            TargetModules::Names(v) => json!(v),
            TargetModules::AllLinear => json!("all-linear"),
            TargetModules::Regex(r) => json!(r),
        };
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": inference_mode,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": self.lora_alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": self.modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }
}

/// A model whose linear layers can carry adapters: it lists them by their HF
/// module path (e.g. `model.layers.0.self_attn.q_proj`).
pub trait LoraModel {
    fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Runs frozen linear layers that share an input as one GEMM from now on
    /// where the model can ([`crate::fused::FusedLinears`]); called once the
    /// base is frozen. Weights keep their names, shapes and values.
    fn fuse_frozen_projections(&mut self) {}
}

/// The adapters attached to a model: their config and their own VarStore
/// (variables named as PEFT saves them).
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub vs: nn::VarStore,
    /// Module paths that carry an adapter, in model order.
    pub modules: Vec<String>,
}

/// "12 modules: q_proj, v_proj on layers 0, 1" — a set of module paths in a few words.
fn summarize_modules(modules: &[String]) -> String {
    let mut names: Vec<&str> = Vec::new();
    let mut layers: Vec<i64> = Vec::new();
    let probe = LoraConfig::new(1, 1.0, 0.0, TargetModules::AllLinear);
    for m in modules {
        let leaf = m.rsplit('.').next().unwrap_or(m);
        if !names.contains(&leaf) {
            names.push(leaf);
        }
        if let Some(i) = probe.layer_index(m) {
            if !layers.contains(&i) {
                layers.push(i);
            }
        }
    }
    layers.sort_unstable();
    let layers: Vec<String> = layers.iter().map(i64::to_string).collect();
    match (modules.len(), layers.is_empty()) {
        (0, _) => "no modules".into(),
        (n, true) => format!("{n} modules: {}", names.join(", ")),
        (n, false) => format!(
            "{n} modules: {} on layers {}",
            names.join(", "),
            layers.join(", ")
        ),
    }
}

/// Creates a variable whose full dotted name is `key` (tch wants the dots as path segments).
fn var_at(root: &nn::Path, key: &str, dims: &[i64], init: nn::Init) -> Tensor {
    let (parents, name) = key.rsplit_once('.').unwrap_or(("", key));
    let mut path: Option<nn::Path> = None;
    for part in parents.split('.').filter(|p| !p.is_empty()) {
        path = Some(match path {
            None => root.sub(part),
            Some(p) => p.sub(part),
        });
    }
    match path {
        Some(p) => p.var(name, dims, init),
        None => root.var(name, dims, init),
    }
}

/// PEFT's key for an adapter tensor of `module`.
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

impl PeftAdapter {
    /// Attaches freshly initialised adapters (A kaiming-uniform, B zero) to every
    /// matching linear layer — `get_peft_model(model, config)`.
    pub fn attach_new(
        model: &mut dyn LoraModel,
        config: LoraConfig,
        device: Device,
    ) -> Result<Self, PeftError> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let mut modules = Vec::new();
        for (name, linear) in model.linear_layers_mut() {
            if !config.targets(&name) {
                continue;
            }
            let (fan_in, fan_out) = (linear.in_features(), linear.out_features());
            // kaiming_uniform_(a=√5) on [r, in]: bound = gain·√(3/fan_in) = 1/√fan_in.
            let bound = 1.0 / (fan_in as f64).sqrt();
            let root = vs.root();
            let a = var_at(
                &root,
                &peft_key(&name, "lora_A"),
                &[config.r, fan_in],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            );
            let b = var_at(
                &root,
                &peft_key(&name, "lora_B"),
                &[fan_out, config.r],
                nn::Init::Const(0.0),
            );
            linear.lora = Some(LoraLayer {
                lora_a: a,
                lora_b: b,
                scaling: config.scaling(),
                dropout: config.lora_dropout,
            });
            modules.push(name);
        }
        if modules.is_empty() {
            return Err(PeftError::NoTargets(format!("{:?}", config.target_modules)));
        }
        Ok(Self {
            config,
            vs,
            modules,
        })
    }

    /// Loads a PEFT adapter directory (ours or one saved by Python PEFT) onto `model`
    /// — `PeftModel.from_pretrained(model, dir)`.
    pub fn load(
        model: &mut dyn LoraModel,
        dir: &Path,
        device: Device,
        trainable: bool,
    ) -> Result<Self, PeftError> {
        let config = read_adapter_config(dir)?;
        let weights = dir.join("adapter_model.safetensors");
        let by_module = read_adapter_tensors(&weights)?;
        let vs = nn::VarStore::new(device);
        let mut linears: BTreeMap<String, &mut Linear> =
            model.linear_layers_mut().into_iter().collect();
        let available = linears_list(&linears);
        let adapter = dir.display().to_string();
        let mut modules = Vec::new();
        for (module, pair) in by_module {
            let (Some(a), Some(b)) = pair else {
                return Err(file_err(
                    &weights,
                    format!("{module} has only one of lora_A / lora_B"),
                ));
            };
            let Some(linear) = linears.get_mut(&module) else {
                return Err(PeftError::UnknownModule {
                    adapter,
                    module,
                    available,
                });
            };
            let lora = loaded_layer(&vs.root(), &config, linear, &module, [&a, &b], &adapter)?;
            linear.lora = Some(frozen_unless(lora, trainable));
            modules.push(module);
        }
        let names: Vec<&String> = linears.keys().collect();
        check_file_matches_config(&config, &names, &modules, adapter)?;
        Ok(Self {
            config,
            vs,
            modules,
        })
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<(), PeftError> {
        let io = |e: std::io::Error| PeftError::File {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let named: Vec<(String, Tensor)> = named
            .into_iter()
            .map(|(k, t)| (k, t.detach().to_device(Device::Cpu)))
            .collect();
        let weights = dir.join("adapter_model.safetensors");
        // Weights first, each file atomic: a kill leaves the previous adapter or
        // none, never a truncated one beside a valid config.
        crate::fsutil::write_atomic_with(&weights, |tmp| {
            Tensor::write_safetensors(&named, tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| PeftError::File {
            path: weights.display().to_string(),
            message: e.to_string(),
        })?;
        let config = serde_json::to_string_pretty(&self.config.to_peft_json(true)).expect("json");
        let config_path = dir.join("adapter_config.json");
        crate::fsutil::write_atomic(&config_path, (config + "\n").as_bytes()).map_err(|e| {
            PeftError::File {
                path: config_path.display().to_string(),
                message: e.to_string(),
            }
        })?;
        Ok(())
    }

    /// Trainable adapter tensors, by PEFT name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }
}

fn file_err(path: &Path, message: String) -> PeftError {
    PeftError::File {
        path: path.display().to_string(),
        message,
    }
}

/// `adapter_config.json`, refused unless it describes a valid LoRA adapter.
fn read_adapter_config(dir: &Path) -> Result<LoraConfig, PeftError> {
    let cfg_path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e.to_string()))?;
    let config: LoraConfig =
        serde_json::from_str(&text).map_err(|e| file_err(&cfg_path, e.to_string()))?;
    let peft_type = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["peft_type"].as_str().map(str::to_string));
    if let Some(t) = peft_type.filter(|t| t != "LORA") {
        return Err(file_err(
            &cfg_path,
            format!("peft_type {t:?} is not supported (only LORA)"),
        ));
    }
    config.validate()?;
    Ok(config)
}

/// A module's (lora_A, lora_B) as found in the file; either may be missing.
type LoraPair = (Option<Tensor>, Option<Tensor>);

/// `adapter_model.safetensors` grouped by module; any tensor that is not a
/// LoRA A / B weight is refused rather than ignored.
fn read_adapter_tensors(weights: &Path) -> Result<BTreeMap<String, LoraPair>, PeftError> {
    let tensors =
        Tensor::read_safetensors(weights).map_err(|e| file_err(weights, e.to_string()))?;
    let mut by_module: BTreeMap<String, LoraPair> = BTreeMap::new();
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix("base_model.model.") else {
            return Err(file_err(
                weights,
                format!("unexpected tensor {key} (not a LoRA weight)"),
            ));
        };
        let slot = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            &mut by_module.entry(m.to_string()).or_default().0
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            &mut by_module.entry(m.to_string()).or_default().1
        } else {
            return Err(file_err(
                weights,
                format!("unsupported tensor {key} (only lora_A / lora_B weights are)"),
            ));
        };
        *slot = Some(t);
    }
    Ok(by_module)
}

/// One module's adapter built from the file's tensors, after checking their
/// shapes against the config's rank and the layer's features.
fn loaded_layer(
    root: &nn::Path,
    config: &LoraConfig,
    linear: &Linear,
    module: &str,
    [a, b]: [&Tensor; 2],
    adapter: &str,
) -> Result<LoraLayer, PeftError> {
    let expect_a = vec![config.r, linear.in_features()];
    let expect_b = vec![linear.out_features(), config.r];
    for (name, t, expected) in [("lora_A", a, &expect_a), ("lora_B", b, &expect_b)] {
        if t.size() != *expected {
            return Err(PeftError::Shape {
                adapter: adapter.to_string(),
                name: peft_key(module, name),
                expected: expected.clone(),
                found: t.size(),
            });
        }
    }
    let mut va = var_at(
        root,
        &peft_key(module, "lora_A"),
        &expect_a,
        nn::Init::Const(0.0),
    );
    let mut vb = var_at(
        root,
        &peft_key(module, "lora_B"),
        &expect_b,
        nn::Init::Const(0.0),
    );
    tch::no_grad(|| {
        va.copy_(a);
        vb.copy_(b);
    });
    Ok(LoraLayer {
        lora_a: va,
        lora_b: vb,
        scaling: config.scaling(),
        dropout: config.lora_dropout,
    })
}

/// An adapter loaded for inference only keeps its weights out of autograd.
fn frozen_unless(mut lora: LoraLayer, trainable: bool) -> LoraLayer {
    if !trainable {
        lora.lora_a = lora.lora_a.set_requires_grad(false);
        lora.lora_b = lora.lora_b.set_requires_grad(false);
    }
    lora
}

/// PEFT builds the adapters from the config and then loads the tensors into
/// them; a file that holds other modules would silently train or run
/// something else than the config says.
fn check_file_matches_config(
    config: &LoraConfig,
    linears: &[&String],
    modules: &[String],
    adapter: String,
) -> Result<(), PeftError> {
    let expected: Vec<String> = linears
        .iter()
        .filter(|m| config.targets(m))
        .map(|m| m.to_string())
        .collect();
    if expected == modules {
        return Ok(());
    }
    let missing: Vec<&String> = expected.iter().filter(|m| !modules.contains(m)).collect();
    let extra: Vec<&String> = modules.iter().filter(|m| !expected.contains(m)).collect();
    let mut detail = String::new();
    if let Some(m) = missing.first() {
        detail.push_str(&format!(
            "; {} named by the config missing from the file (e.g. {m})",
            missing.len()
        ));
    }
    if let Some(m) = extra.first() {
        detail.push_str(&format!(
            "; {} in the file the config does not name (e.g. {m})",
            extra.len()
        ));
    }
    Err(PeftError::ConfigMismatch {
        adapter,
        config: config.describe_targets(),
        expected: summarize_modules(&expected),
        found: summarize_modules(modules),
        detail,
    })
}

fn linears_list(linears: &BTreeMap<String, &mut Linear>) -> String {
    let mut short: Vec<&str> = linears
        .keys()
        .map(|k| k.rsplit('.').next().unwrap_or(k))
        .collect();
    short.sort();
    short.dedup();
    format!(
        "{} (e.g. {})",
        short.join(", "),
        linears.keys().next().cloned().unwrap_or_default()
    )
}

/// PEFT's `merge_and_unload`: folds every adapter into its base weight
/// (`W += scaling · B A`, computed in fp32) and removes the adapters.
pub fn merge_and_unload(model: &mut dyn LoraModel) {
    tch::no_grad(|| {
        for (_, linear) in model.linear_layers_mut() {
            if let Some(lora) = linear.lora.take() {
                let delta = lora
                    .lora_b
                    .to_kind(Kind::Float)
                    .matmul(&lora.lora_a.to_kind(Kind::Float))
                    * lora.scaling;
                match &mut linear.weight {
                    LinearWeight::Dense(w) => {
                        let merged = w.to_kind(Kind::Float) + delta.to_device(w.device());
                        w.copy_(&merged.to_kind(w.kind()));
                    }
                    // A 4-bit base merges into a dense weight in the dtype it was quantized
                    // from: the result carries the quantization error (PEFT would quantize
                    // it again; a merged checkpoint is written dense).
                    LinearWeight::Quant4bit(q) => {
                        let merged = q.dequantize(Kind::Float) + delta.to_device(q.packed.device());
                        let kind = q.state.dtype;
                        linear.weight = LinearWeight::Dense(merged.to_kind(kind));
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[test]
    fn layers_to_transform_narrows_suffix_matches_like_peft() {
        let mut cfg = LoraConfig::new(8, 16.0, 0.0, TargetModules::Names(vec!["q_proj".into()]));
        assert!(cfg.targets("model.layers.1.self_attn.q_proj"));
        cfg.layers_to_transform = Some(vec![0]);
        assert!(cfg.targets("model.layers.0.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.1.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.k_proj"));
        cfg.layers_pattern = Some(vec!["blocks".into()]);
        assert!(!cfg.targets("model.layers.0.self_attn.q_proj"));
        let one: LoraConfig = serde_json::from_str(
            r#"{"r": 8, "lora_alpha": 16, "target_modules": ".*\\.0\\.self_attn\\.(q|v)_proj", "layers_to_transform": 1}"#,
        )
        .unwrap();
        assert_eq!(one.layers_to_transform, Some(vec![1]));
        // A regex is matched against the whole path, layers_to_transform aside (as PEFT does).
        assert!(one.targets("model.layers.0.self_attn.v_proj"));
        assert!(!one.targets("model.layers.0.self_attn.k_proj"));
    }
}
