//! Training configuration: transformers' `TrainingArguments` (the fields every
//! trainer shares), TRL's `SFTConfig` (which embeds them), TRL's `ModelConfig`, the tutorial's data
//! arguments, and [`TrlParser`], which fills all three from defaults, a YAML
//! file (`--config`) and command-line flags.
//!
//! Names and defaults follow transformers 5.23 and TRL 1.16 (checked against
//! the installed Python packages), so a YAML file written for the Python
//! tutorial parses here unchanged. Where the Python libraries renamed a field
//! since the tutorial was written, the old name is accepted as an alias
//! (`max_seq_length` → `max_length`, `torch_dtype` → `dtype`,
//! `activation_checkpointing` ↔ `gradient_checkpointing`); a few fields
//! transformers 5 removed (`warmup_ratio`, `overwrite_output_dir`,
//! `group_by_length`) are kept so that older configs still parse.
//!
//! # Application defaults
//!
//! The Python tutorial changes defaults by subclassing the dataclasses
//! (`ChatGLM4ModelConfig(ModelConfig)`, `MySFTConfig(SFTConfig)`). Here an
//! application builds the three structs with struct-update syntax and hands
//! them to [`TrlParser::new`]; `--help` then shows the application's defaults,
//! and a YAML file or a flag still overrides them:
//!
//! ```
//! use trl_like::config::{
//!     DataArguments, ModelConfig, SFTConfig, TorchDtype, TrainingArguments, TrlParser,
//! };
//!
//! let model = ModelConfig {
//!     model_name_or_path: Some("./weights/glm-4-9b-hf".into()),
//!     dtype: TorchDtype::Bfloat16,
//!     use_peft: true,
//!     lora_r: 8,
//!     ..ModelConfig::default()
//! };
//! let data = DataArguments { data_files: vec!["./data/alpaca_gpt4_data_zh.json".into()], ..Default::default() };
//! let sft = SFTConfig {
//!     // The shared training arguments sit in `args` (flattened in YAML and flags).
//!     args: TrainingArguments { learning_rate: 5e-4, ..SFTConfig::default().args },
//!     max_length: Some(512),
//!     ..SFTConfig::default()
//! };
//! let parser = TrlParser::new(model, data, sft);
//!
//! let args: Vec<String> = ["--lora_r", "16", "--learning-rate=1e-4"].iter().map(|s| s.to_string()).collect();
//! let (model, data, sft) = parser.parse_args_and_config(&args).unwrap();
//! assert_eq!((model.lora_r, model.use_peft), (16, true));
//! assert_eq!(data.data_files, ["./data/alpaca_gpt4_data_zh.json"]);
//! assert_eq!((sft.learning_rate, sft.max_length), (1e-4, Some(512)));
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Defines a configuration struct from one list of fields: the struct itself
/// (serde, `deny_unknown_fields`), its `Default`, and `FIELDS`, the table the
/// parser reads flag names, value types, aliases and help text from. The doc
/// comment of each field is its `--help` text, so nothing is written twice.
macro_rules! config_struct {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[alias = $alias:literal])*
                $field:ident : $ty:ty = $default:expr
            ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[doc = $doc])*
                $(#[serde(alias = $alias)])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        impl $name {
            /// Every field: name, value type, aliases and help text.
            pub const FIELDS: &'static [$crate::config::FieldSpec] = &[
                $(
                    $crate::config::FieldSpec {
                        name: stringify!($field),
                        ty: <$ty as $crate::config::ConfigValue>::TYPE,
                        aliases: &[$($alias),*],
                        help: &[$($doc),*],
                    },
                )*
            ];
        }
    };
}

/// Like the plain form, with the fields of another config struct embedded
/// first: flattened in YAML and on the command line (one key per field), in
/// `FIELDS` ahead of the struct's own, and reachable through `Deref`
/// (`sft.learning_rate` reads `sft.args.learning_rate`).
macro_rules! config_struct_flattened {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(#[doc = $bdoc:literal])*
            #[flatten]
            $base:ident : $bty:ty = $bdefault:expr,
            $(
                $(#[doc = $doc:literal])*
                $(#[alias = $alias:literal])*
                $field:ident : $ty:ty = $default:expr
            ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            $(#[doc = $bdoc])*
            #[serde(flatten)]
            pub $base: $bty,
            $(
                $(#[doc = $doc])*
                $(#[serde(alias = $alias)])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $base: $bdefault, $($field: $default,)* }
            }
        }

        impl std::ops::Deref for $name {
            type Target = $bty;
            fn deref(&self) -> &$bty {
                &self.$base
            }
        }

        impl std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut $bty {
                &mut self.$base
            }
        }

        impl $name {
            /// Every field, the embedded struct's first: name, value type,
            /// aliases and help text.
            pub const FIELDS: &'static [$crate::config::FieldSpec] = {
                const OWN: &[$crate::config::FieldSpec] = &[
                    $(
                        $crate::config::FieldSpec {
                            name: stringify!($field),
                            ty: <$ty as $crate::config::ConfigValue>::TYPE,
                            aliases: &[$($alias),*],
                            help: &[$($doc),*],
                        },
                    )*
                ];
                const BASE: &[$crate::config::FieldSpec] = <$bty>::FIELDS;
                const ALL: [$crate::config::FieldSpec; BASE.len() + OWN.len()] =
                    $crate::config::concat_fields(BASE, OWN);
                &ALL
            };
        }
    };
}

/// `a` then `b` as one array (const, so field tables stay `&'static`).
pub(crate) const fn concat_fields<const N: usize>(
    a: &[FieldSpec],
    b: &[FieldSpec],
) -> [FieldSpec; N] {
    const EMPTY: FieldSpec = FieldSpec {
        name: "",
        ty: FieldType::required(ValueKind::Bool),
        aliases: &[],
        help: &[],
    };
    assert!(a.len() + b.len() == N);
    let mut out = [EMPTY; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[a.len() + j] = b[j];
        j += 1;
    }
    out
}

/// Defines a string-valued enum (`lr_scheduler_type: cosine`) with serde
/// names, `as_str`, `Display`, `FromStr` and its list of choices.
macro_rules! config_enum {
    (
        $(#[doc = $doc:literal])*
        pub enum $name:ident {
            $( $(#[doc = $vdoc:literal])* $variant:ident = $s:literal ),+ $(,)?
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $( $(#[doc = $vdoc])* #[serde(rename = $s)] $variant, )+
        }

        impl $name {
            /// The accepted spellings, in declaration order.
            pub const CHOICES: &'static [&'static str] = &[$($s),+];

            /// The name used in YAML files and on the command line.
            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$variant => $s,)+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::config::UnknownChoice;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok(Self::$variant),)+
                    _ => Err($crate::config::UnknownChoice::new(s, Self::CHOICES)),
                }
            }
        }

        impl $crate::config::ConfigValue for $name {
            const TYPE: $crate::config::FieldType =
                $crate::config::FieldType::required($crate::config::ValueKind::Enum(Self::CHOICES));
        }
    };
}

mod data;
mod deepspeed;
mod dpo;
mod model;
mod parser;
mod sft;
mod training_args;

pub use data::{DataArguments, DatasetFormat};
pub use deepspeed::{Auto, DeepSpeedConfig, DeepSpeedError, ZeroPlan};
pub use dpo::{DPOConfig, DPOLossType, FDivergenceType};
pub use model::{Bnb4bitQuantType, ModelConfig, TorchDtype};
pub use parser::{NoArgs, Origin, ParseError, Parsed, TrlParser};
pub use sft::{LossType, PackingStrategy, SFTConfig, TruncationMode};
pub use training_args::{
    IntervalStrategy, OptimizerName, ResumeFrom, SamplingStrategy, SaveStrategy, SchedulerType,
    TrainingArguments,
};

/// A string that names none of an enum setting's choices (`FromStr` of the
/// setting enums).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected one of {}, got {value:?}", choices.join(", "))]
pub struct UnknownChoice {
    pub value: String,
    pub choices: &'static [&'static str],
}

impl UnknownChoice {
    pub fn new(value: &str, choices: &'static [&'static str]) -> Self {
        Self {
            value: value.to_string(),
            choices,
        }
    }
}

/// The kind of value a field holds, as the parser sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// `true`/`false` (also `yes`/`no`, `1`/`0`, `on`/`off`); a bare flag means true.
    Bool,
    /// A signed integer.
    Int,
    /// A non-negative integer.
    UInt,
    /// A finite floating-point number.
    Float,
    /// Any string.
    Str,
    /// One of a fixed set of strings.
    Enum(&'static [&'static str]),
    /// A list of strings; a single string is a one-element list.
    List,
    /// A list of finite numbers; a single number is a one-element list.
    FloatList,
    /// A JSON object (a YAML mapping, or a JSON string on the command line).
    Json,
}

/// A field's value type: its kind and whether `none`/`null` is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldType {
    pub kind: ValueKind,
    /// `Option<_>` in Rust: `none`/`null` means unset.
    pub optional: bool,
}

impl FieldType {
    pub const fn required(kind: ValueKind) -> Self {
        Self {
            kind,
            optional: false,
        }
    }
    pub const fn optional(self) -> Self {
        Self {
            kind: self.kind,
            optional: true,
        }
    }
}

/// Maps a Rust field type to the [`FieldType`] the parser uses for it.
pub trait ConfigValue {
    const TYPE: FieldType;
}

macro_rules! config_value {
    ($($t:ty => $k:expr),* $(,)?) => {
        $(impl ConfigValue for $t { const TYPE: FieldType = FieldType::required($k); })*
    };
}
config_value! {
    bool => ValueKind::Bool,
    i64 => ValueKind::Int,
    u64 => ValueKind::UInt,
    usize => ValueKind::UInt,
    f64 => ValueKind::Float,
    String => ValueKind::Str,
    Vec<String> => ValueKind::List,
    Vec<f64> => ValueKind::FloatList,
    serde_json::Map<String, serde_json::Value> => ValueKind::Json,
}

impl<T: ConfigValue> ConfigValue for Option<T> {
    const TYPE: FieldType = T::TYPE.optional();
}

/// One field of a configuration struct, as the parser and `--help` see it.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    /// The snake_case name: the YAML key and `--name` flag.
    pub name: &'static str,
    pub ty: FieldType,
    /// Other accepted names (older spellings), e.g. `max_seq_length`.
    pub aliases: &'static [&'static str],
    /// The help text, one doc-comment line per entry.
    pub help: &'static [&'static str],
}

impl FieldSpec {
    /// The help text as one line.
    pub fn help_text(&self) -> String {
        self.help
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A struct the parser can fill: [`ModelConfig`], [`DataArguments`],
/// [`SFTConfig`], or an application's own.
pub trait ConfigGroup: Serialize + DeserializeOwned + Clone {
    /// The Rust (and Python) type name, e.g. `SFTConfig`.
    const NAME: &'static str;
    /// The `--help` heading.
    const TITLE: &'static str;
    /// Every field, in declaration order.
    fn fields() -> &'static [FieldSpec];
    /// Checks values and combinations; the error names the field.
    fn validate(&self) -> Result<(), ConfigError>;
    /// Field-specific spellings applied before the generic type coercion
    /// (e.g. `report_to: none` → `[]`). Returns the value unchanged by default.
    fn preprocess(_field: &str, value: serde_json::Value) -> serde_json::Value {
        value
    }
}

/// An invalid value or combination of values; `field()` names the culprit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A value outside its allowed range or set.
    #[error("`{field}` {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A value this implementation does not support (yet).
    #[error("`{field}`: {message}")]
    Unsupported {
        field: &'static str,
        message: String,
    },
    /// Two fields whose values contradict each other.
    #[error("`{field}` conflicts with `{other}`: {message}")]
    Conflict {
        field: &'static str,
        other: &'static str,
        message: String,
    },
}

impl ConfigError {
    /// The field the error is about (for a conflict, the first of the two).
    pub fn field(&self) -> &'static str {
        match self {
            Self::Invalid { field, .. }
            | Self::Unsupported { field, .. }
            | Self::Conflict { field, .. } => field,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(field: &'static str, message: impl Into<String>) -> Self {
        Self::Unsupported {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn conflict(
        field: &'static str,
        other: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self::Conflict {
            field,
            other,
            message: message.into(),
        }
    }
}

/// Shared range checks.
pub(crate) fn check_finite(field: &'static str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("must be a finite number, got {v}"),
        ))
    }
}

pub(crate) fn check_at_least_one(field: &'static str, v: usize) -> Result<(), ConfigError> {
    if v >= 1 {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("must be >= 1, got {v}"),
        ))
    }
}

pub(crate) fn check_unit_interval(field: &'static str, v: f64) -> Result<(), ConfigError> {
    // [0, 1): Adam betas, dropout probabilities.
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("must be in [0, 1), got {v}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn keys<T: Serialize>(v: &T) -> Vec<String> {
        match serde_json::to_value(v).unwrap() {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    fn names(fields: &[FieldSpec]) -> Vec<String> {
        fields.iter().map(|f| f.name.to_string()).collect()
    }

    #[test]
    fn field_tables_match_serialized_structs() {
        assert_eq!(names(SFTConfig::FIELDS), keys(&SFTConfig::default()));
        assert_eq!(
            names(TrainingArguments::FIELDS),
            keys(&TrainingArguments::default())
        );
        assert_eq!(names(DPOConfig::FIELDS), keys(&DPOConfig::default()));
        // The embedded arguments come first, flattened.
        assert_eq!(
            &SFTConfig::FIELDS[..TrainingArguments::FIELDS.len()]
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>(),
            &TrainingArguments::FIELDS
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
        );
        assert_eq!(names(ModelConfig::FIELDS), keys(&ModelConfig::default()));
        assert_eq!(
            names(DataArguments::FIELDS),
            keys(&DataArguments::default())
        );
    }

    #[test]
    fn names_and_aliases_are_unique_across_groups() {
        let mut seen = HashSet::new();
        for f in SFTConfig::FIELDS
            .iter()
            .chain(ModelConfig::FIELDS)
            .chain(DataArguments::FIELDS)
        {
            for n in std::iter::once(f.name).chain(f.aliases.iter().copied()) {
                assert!(seen.insert(n), "{n} is defined twice");
                assert_ne!(n, "config", "`config` is reserved for --config");
                assert!(
                    !n.starts_with("no_"),
                    "{n} would clash with the --no_<bool> form"
                );
            }
        }
    }

    #[test]
    fn dpo_names_are_unique_beside_the_model_and_data_groups() {
        let mut seen = HashSet::new();
        for f in DPOConfig::FIELDS
            .iter()
            .chain(ModelConfig::FIELDS)
            .chain(DataArguments::FIELDS)
        {
            assert!(f.help_text().len() > 10, "{} has no help text", f.name);
            for n in std::iter::once(f.name).chain(f.aliases.iter().copied()) {
                assert!(seen.insert(n), "{n} is defined twice");
                assert!(!n.starts_with("no_"), "{n} clashes with --no_<bool>");
            }
        }
    }

    #[test]
    fn every_field_has_help() {
        for f in SFTConfig::FIELDS
            .iter()
            .chain(ModelConfig::FIELDS)
            .chain(DataArguments::FIELDS)
        {
            assert!(f.help_text().len() > 10, "{} has no help text", f.name);
        }
    }

    #[test]
    fn field_types_follow_rust_types() {
        let find = |fs: &[FieldSpec], n: &str| fs.iter().find(|f| f.name == n).unwrap().ty;
        assert_eq!(
            find(SFTConfig::FIELDS, "bf16"),
            FieldType::required(ValueKind::Bool).optional()
        );
        assert_eq!(
            find(SFTConfig::FIELDS, "learning_rate"),
            FieldType::required(ValueKind::Float)
        );
        assert_eq!(
            find(SFTConfig::FIELDS, "max_steps"),
            FieldType::required(ValueKind::Int)
        );
        assert_eq!(
            find(SFTConfig::FIELDS, "max_length"),
            FieldType::required(ValueKind::UInt).optional()
        );
        assert_eq!(
            find(SFTConfig::FIELDS, "lr_scheduler_type"),
            FieldType::required(ValueKind::Enum(SchedulerType::CHOICES))
        );
        assert_eq!(
            find(ModelConfig::FIELDS, "lora_target_modules"),
            FieldType::required(ValueKind::List).optional()
        );
        assert_eq!(
            find(SFTConfig::FIELDS, "lr_scheduler_kwargs"),
            FieldType::required(ValueKind::Json)
        );
    }
}
