//! `TrlParser`: fills [`ModelConfig`], [`DataArguments`] and [`SFTConfig`]
//! (or an application's own [`ConfigGroup`]s) like TRL's `TrlParser`:
//! defaults < `--config file.yaml` < command-line flags.
//!
//! The values are merged as JSON: each group's defaults are serialized, the
//! YAML mapping and then the flags overwrite single keys (each value coerced to
//! the field's type from the group's field table), and the result is
//! deserialized with `deny_unknown_fields` and validated. Flag names, types,
//! aliases and help text all come from the field tables, so a new field needs
//! no parser change.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Number, Value};

use super::{
    ConfigError, ConfigGroup, DataArguments, FieldSpec, ModelConfig, SFTConfig, ValueKind,
};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The defaults given to [`TrlParser::new`].
    Default,
    /// The YAML file given with `--config`.
    ConfigFile(PathBuf),
    /// A command-line flag, as it was typed (e.g. `--learning-rate`).
    Cli(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::ConfigFile(p) => write!(f, "{}", p.display()),
            Origin::Cli(flag) => f.write_str(flag),
        }
    }
}

/// Why parsing failed, or `Help` with the text `--help` asked for.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// `--help` / `-h` was given: the help text, to print and exit 0.
    #[error("{0}")]
    Help(String),
    /// A flag that names no field.
    #[error("unknown argument `{flag}`{}", did_you_mean(suggestion))]
    UnknownFlag {
        flag: String,
        suggestion: Option<String>,
    },
    /// A YAML key that names no field.
    #[error("{}: unknown key `{key}`{}", path.display(), did_you_mean(suggestion))]
    UnknownKey {
        path: PathBuf,
        key: String,
        suggestion: Option<String>,
    },
    /// A value that does not fit the field's type (`--learning_rate abc`).
    #[error("{}", invalid_value(origin, field, value, reason))]
    InvalidValue {
        origin: Origin,
        field: String,
        value: String,
        reason: String,
    },
    /// A flag at the end of the arguments, or followed by another flag, that needs a value.
    #[error("`{flag}` expects a value")]
    MissingValue { flag: String },
    /// A word that is not a flag nor a flag's value.
    #[error("unexpected argument `{arg}`: options are given as --name VALUE")]
    UnexpectedArgument { arg: String },
    /// The config file cannot be read or is not a YAML mapping.
    #[error("config file {}: {reason}", path.display())]
    ConfigFile { path: PathBuf, reason: String },
    /// `--config` given twice.
    #[error("--config given twice ({} and {})", first.display(), second.display())]
    RepeatedConfig { first: PathBuf, second: PathBuf },
    /// A field and its alias set to different values in the same place
    /// (e.g. `max_seq_length: 512` and `max_length: 1024` in one file).
    /// `values` shows both, e.g. "512 and 1024".
    #[error("{origin}: `{first}` and `{second}` name the same setting but are given different values ({values})")]
    AliasConflict {
        origin: Origin,
        first: String,
        second: String,
        values: String,
    },
    /// The merged values failed validation; `origin` says where the culprit was set.
    #[error("invalid configuration: {error} (set by {origin})")]
    Invalid { error: ConfigError, origin: Origin },
    /// The merged values did not deserialize (a bug in a field table).
    #[error("{group}: {message}")]
    Deserialize {
        group: &'static str,
        message: String,
    },
}

fn did_you_mean(s: &Option<String>) -> String {
    s.as_ref()
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default()
}

fn invalid_value(origin: &Origin, field: &str, value: &str, reason: &str) -> String {
    match origin {
        Origin::Cli(flag) => format!("invalid value {value:?} for `{flag}`: {reason}"),
        Origin::ConfigFile(p) => format!(
            "{}: invalid value {value} for key `{field}`: {reason}",
            p.display()
        ),
        Origin::Default => format!("invalid default {value} for `{field}`: {reason}"),
    }
}

/// The three structs, plus what the config file's `env:` mapping asked for.
#[derive(Debug, Clone)]
pub struct Parsed<M, D, S> {
    pub model: M,
    pub data: D,
    pub sft: S,
    /// Environment variables from the YAML `env:` mapping (TRL sets them;
    /// [`TrlParser::parse_args_and_config`] does too, [`TrlParser::parse`] does not).
    pub env: Vec<(String, String)>,
    /// The `--config` file, if any.
    pub config_file: Option<PathBuf>,
}

/// TRL's `TrlParser` for three config groups. Build it with the application's
/// defaults ([`TrlParser::new`]) or TRL's ([`Default`]).
#[derive(Debug, Clone)]
pub struct TrlParser<M = ModelConfig, D = DataArguments, S = SFTConfig> {
    model_defaults: M,
    data_defaults: D,
    sft_defaults: S,
}

impl Default for TrlParser<ModelConfig, DataArguments, SFTConfig> {
    fn default() -> Self {
        Self::new(
            ModelConfig::default(),
            DataArguments::default(),
            SFTConfig::default(),
        )
    }
}

/// One group while merging: its field table and its values as JSON.
struct Group {
    title: &'static str,
    name: &'static str,
    fields: &'static [FieldSpec],
    preprocess: fn(&str, Value) -> Value,
    values: Map<String, Value>,
}

/// A name (field or alias) resolved to its group and field.
#[derive(Clone, Copy)]
struct Target {
    group: usize,
    spec: &'static FieldSpec,
}

/// The state of one merge.
struct Merge {
    groups: Vec<Group>,
    names: HashMap<&'static str, Target>,
    /// Where each field's current value came from.
    origins: HashMap<&'static str, Origin>,
}

fn group_of<G: ConfigGroup>(defaults: &G) -> Result<Group, ParseError> {
    let values = match serde_json::to_value(defaults) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(ParseError::Deserialize {
                group: G::NAME,
                message: "does not serialize to a map".into(),
            })
        }
        Err(e) => {
            return Err(ParseError::Deserialize {
                group: G::NAME,
                message: e.to_string(),
            })
        }
    };
    Ok(Group {
        title: G::TITLE,
        name: G::NAME,
        fields: G::fields(),
        preprocess: G::preprocess,
        values,
    })
}

impl<M: ConfigGroup, D: ConfigGroup, S: ConfigGroup> TrlParser<M, D, S> {
    /// A parser whose defaults are these values: the equivalent of the
    /// tutorial's dataclass subclasses with changed defaults.
    pub fn new(model_defaults: M, data_defaults: D, sft_defaults: S) -> Self {
        Self {
            model_defaults,
            data_defaults,
            sft_defaults,
        }
    }

    /// Parses `args` (without the program name) and the `--config` file they
    /// name; sets the environment variables of the file's `env:` mapping, as
    /// TRL does. Returns `ParseError::Help` for `--help`.
    pub fn parse_args_and_config(&self, args: &[String]) -> Result<(M, D, S), ParseError> {
        let parsed = self.parse(args)?;
        for (k, v) in &parsed.env {
            std::env::set_var(k, v);
        }
        Ok((parsed.model, parsed.data, parsed.sft))
    }

    /// Like [`parse_args_and_config`](Self::parse_args_and_config), but
    /// returns the `env:` mapping instead of applying it.
    pub fn parse(&self, args: &[String]) -> Result<Parsed<M, D, S>, ParseError> {
        let mut merge = self.start()?;
        if args.iter().any(|a| a == "--help" || a == "-h") {
            return Err(ParseError::Help(merge.help()));
        }

        // The config file is applied first wherever --config appears.
        let mut config: Option<PathBuf> = None;
        let mut rest: Vec<&str> = Vec::with_capacity(args.len());
        let mut i = 0;
        while i < args.len() {
            let a = args[i].as_str();
            let path = if a == "--config" {
                i += 1;
                match args.get(i) {
                    Some(p) if !p.starts_with("--") => Some(PathBuf::from(p)),
                    _ => {
                        return Err(ParseError::MissingValue {
                            flag: "--config".into(),
                        })
                    }
                }
            } else if let Some(p) = a.strip_prefix("--config=") {
                Some(PathBuf::from(p))
            } else {
                rest.push(a);
                None
            };
            if let Some(p) = path {
                if let Some(first) = config.replace(p.clone()) {
                    return Err(ParseError::RepeatedConfig { first, second: p });
                }
            }
            i += 1;
        }

        let mut env = Vec::new();
        if let Some(path) = &config {
            env = merge.apply_yaml(path)?;
        }
        merge.apply_cli(&rest)?;

        let model: M = merge.finish(0)?;
        let data: D = merge.finish(1)?;
        let sft: S = merge.finish(2)?;
        merge.check(model.validate())?;
        merge.check(data.validate())?;
        merge.check(sft.validate())?;
        Ok(Parsed {
            model,
            data,
            sft,
            env,
            config_file: config,
        })
    }

    /// The `--help` text: every field of every group with its type, help and
    /// (application) default.
    pub fn help(&self) -> String {
        match self.start() {
            Ok(m) => m.help(),
            Err(e) => e.to_string(),
        }
    }

    /// Every field as Markdown tables (flag, type, default, help), one per
    /// group — the source of the flags reference in the docs.
    pub fn help_markdown(&self) -> String {
        let m = match self.start() {
            Ok(m) => m,
            Err(e) => return e.to_string(),
        };
        let mut out = String::new();
        for g in &m.groups {
            out.push_str(&format!(
                "\n## {}\n\n| flag / YAML key | type | default | meaning |\n|---|---|---|---|\n",
                g.title
            ));
            for spec in g.fields {
                let mut flag = format!("`--{}`", spec.name);
                for a in spec.aliases {
                    flag.push_str(&format!(" (`--{a}`)"));
                }
                let default = g
                    .values
                    .get(spec.name)
                    .map(display_value)
                    .unwrap_or_else(|| "none".into());
                let cell = |s: String| s.replace('|', "\\|");
                out.push_str(&format!(
                    "| {flag} | {} | {} | {} |\n",
                    cell(type_label(spec)),
                    cell(format!("`{default}`")),
                    cell(spec.help_text())
                ));
            }
        }
        out
    }

    fn start(&self) -> Result<Merge, ParseError> {
        let groups = vec![
            group_of(&self.model_defaults)?,
            group_of(&self.data_defaults)?,
            group_of(&self.sft_defaults)?,
        ];
        let mut names = HashMap::new();
        for (gi, g) in groups.iter().enumerate() {
            for spec in g.fields {
                for n in std::iter::once(spec.name).chain(spec.aliases.iter().copied()) {
                    // First definition wins; the crate's tests keep names unique.
                    names.entry(n).or_insert(Target { group: gi, spec });
                }
            }
        }
        Ok(Merge {
            groups,
            names,
            origins: HashMap::new(),
        })
    }
}

/// What one layer (the file, or the command line) set so far, to catch a
/// field and its alias given different values in the same layer.
type LayerSeen = HashMap<&'static str, (String, Value)>;

impl Merge {
    fn lookup(&self, name: &str) -> Option<Target> {
        self.names.get(name).copied()
    }

    fn all_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.names.keys().copied()
    }

    fn set(
        &mut self,
        t: Target,
        name_used: &str,
        value: Value,
        origin: Origin,
        seen: &mut LayerSeen,
    ) -> Result<(), ParseError> {
        if let Some((prev_name, prev_value)) = seen.get(t.spec.name) {
            if prev_name != name_used && *prev_value != value {
                return Err(ParseError::AliasConflict {
                    origin,
                    first: prev_name.clone(),
                    second: name_used.to_string(),
                    values: format!(
                        "{} and {}",
                        display_value(prev_value),
                        display_value(&value)
                    ),
                });
            }
        }
        seen.insert(t.spec.name, (name_used.to_string(), value.clone()));
        self.groups[t.group]
            .values
            .insert(t.spec.name.to_string(), value);
        self.origins.insert(t.spec.name, origin);
        Ok(())
    }

    fn coerce_for(&self, t: Target, raw: Value, origin: &Origin) -> Result<Value, ParseError> {
        let pre = (self.groups[t.group].preprocess)(t.spec.name, raw.clone());
        coerce(t.spec, pre).map_err(|reason| ParseError::InvalidValue {
            origin: origin.clone(),
            field: t.spec.name.to_string(),
            value: display_value(&raw),
            reason,
        })
    }

    /// Reads the YAML mapping and applies it; returns its `env:` entries.
    fn apply_yaml(&mut self, path: &Path) -> Result<Vec<(String, String)>, ParseError> {
        let file_err = |reason: String| ParseError::ConfigFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let doc: Value =
            serde_yaml_ng::from_str(&text).map_err(|e| file_err(format!("invalid YAML: {e}")))?;
        let map = match doc {
            Value::Object(m) => m,
            Value::Null => Map::new(), // an empty file (or only comments) sets nothing
            other => {
                return Err(file_err(format!(
                    "must be a YAML mapping of field: value, got {}",
                    kind_name(&other)
                )))
            }
        };
        let origin = Origin::ConfigFile(path.to_path_buf());
        let mut env = Vec::new();
        let mut seen = LayerSeen::new();
        for (key, raw) in map {
            if key == "env" {
                let Value::Object(vars) = raw else {
                    return Err(file_err(
                        "`env` must be a mapping of VARIABLE: value".into(),
                    ));
                };
                for (k, v) in vars {
                    let v = match v {
                        Value::String(s) => s,
                        Value::Null => String::new(),
                        Value::Array(_) | Value::Object(_) => {
                            return Err(file_err(format!("env variable `{k}` must be a scalar")))
                        }
                        other => other.to_string(),
                    };
                    env.push((k, v));
                }
                continue;
            }
            let Some(t) = self.lookup(&key) else {
                let suggestion = suggest(&key, self.all_names().chain(["env"]));
                return Err(ParseError::UnknownKey {
                    path: path.to_path_buf(),
                    key,
                    suggestion,
                });
            };
            let value = self.coerce_for(t, raw, &origin)?;
            self.set(t, &key, value, origin.clone(), &mut seen)?;
        }
        Ok(env)
    }

    fn apply_cli(&mut self, args: &[&str]) -> Result<(), ParseError> {
        let mut seen = LayerSeen::new();
        let mut i = 0;
        while i < args.len() {
            let arg = args[i];
            i += 1;
            let Some(body) = arg
                .strip_prefix("--")
                .filter(|b| !b.is_empty() && !b.starts_with('-'))
            else {
                return Err(ParseError::UnexpectedArgument {
                    arg: arg.to_string(),
                });
            };
            let (name_typed, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let flag = format!("--{name_typed}");
            let name = name_typed.replace('-', "_");

            // --no_<bool> / --no-<bool>
            if let Some(t) = name
                .strip_prefix("no_")
                .and_then(|n| self.lookup(n))
                .filter(|t| t.spec.ty.kind == ValueKind::Bool)
            {
                if inline.is_some() {
                    return Err(ParseError::InvalidValue {
                        origin: Origin::Cli(flag.clone()),
                        field: t.spec.name.to_string(),
                        value: inline.unwrap_or_default().to_string(),
                        reason: format!("{flag} takes no value"),
                    });
                }
                let used = name.trim_start_matches("no_").to_string();
                self.set(t, &used, Value::Bool(false), Origin::Cli(flag), &mut seen)?;
                continue;
            }

            let Some(t) = self.lookup(&name) else {
                let suggestion = suggest(&name, self.all_names().chain(["config", "help"]))
                    .map(|s| format!("--{s}"));
                return Err(ParseError::UnknownFlag { flag, suggestion });
            };
            let next_value = |i: usize| args.get(i).copied().filter(|s| !s.starts_with("--"));
            let raw = match (t.spec.ty.kind, inline) {
                (_, Some(v)) => Value::String(v.to_string()),
                (ValueKind::Bool, None) => match next_value(i) {
                    Some(v) => {
                        i += 1;
                        Value::String(v.to_string())
                    }
                    None => Value::Bool(true),
                },
                (ValueKind::List, None) => {
                    let start = i;
                    while next_value(i).is_some() {
                        i += 1;
                    }
                    if i == start {
                        return Err(ParseError::MissingValue { flag });
                    }
                    Value::Array(
                        args[start..i]
                            .iter()
                            .map(|s| Value::String(s.to_string()))
                            .collect(),
                    )
                }
                (_, None) => match next_value(i) {
                    Some(v) => {
                        i += 1;
                        Value::String(v.to_string())
                    }
                    None => return Err(ParseError::MissingValue { flag }),
                },
            };
            let origin = Origin::Cli(flag);
            let value = self.coerce_for(t, raw, &origin)?;
            self.set(t, &name, value, origin, &mut seen)?;
        }
        Ok(())
    }

    fn finish<G: ConfigGroup>(&self, index: usize) -> Result<G, ParseError> {
        let g = &self.groups[index];
        serde_json::from_value(Value::Object(g.values.clone())).map_err(|e| {
            ParseError::Deserialize {
                group: g.name,
                message: e.to_string(),
            }
        })
    }

    fn check(&self, r: Result<(), ConfigError>) -> Result<(), ParseError> {
        r.map_err(|error| {
            let origin = self
                .origins
                .get(error.field())
                .cloned()
                .unwrap_or(Origin::Default);
            ParseError::Invalid { error, origin }
        })
    }

    fn help(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "Usage: [--config FILE.yaml] [--FIELD VALUE ...]\n\n\
             Each setting comes from the defaults below, overridden by the YAML file given with\n\
             --config (a mapping of field: value, plus an optional env: mapping of environment\n\
             variables), overridden by flags. Flags: --field VALUE, --field=VALUE, or kebab case\n\
             (--learning-rate). Booleans: --flag, --flag true|false, --no_flag. Lists: the values\n\
             up to the next flag. Optional settings accept none (or null).\n\n\
             Options:\n  --config FILE\n      YAML file with settings (overridden by flags).\n  -h, --help\n      Print this help.\n",
        );
        for g in &self.groups {
            out.push_str(&format!("\n{}:\n", g.title));
            for spec in g.fields {
                out.push_str(&format!("  --{} {}", spec.name, type_label(spec)));
                if !spec.aliases.is_empty() {
                    let a: Vec<String> = spec.aliases.iter().map(|a| format!("--{a}")).collect();
                    out.push_str(&format!("  (alias: {})", a.join(", ")));
                }
                out.push('\n');
                let default = g
                    .values
                    .get(spec.name)
                    .map(display_value)
                    .unwrap_or_else(|| "none".into());
                out.push_str(&format!(
                    "      {} [default: {default}]\n",
                    spec.help_text()
                ));
            }
        }
        out
    }
}

fn type_label(spec: &FieldSpec) -> String {
    let base = match spec.ty.kind {
        ValueKind::Bool => "[BOOL]".to_string(),
        ValueKind::Int | ValueKind::UInt => "INT".into(),
        ValueKind::Float => "FLOAT".into(),
        ValueKind::Str => "STR".into(),
        ValueKind::Enum(c) => format!("{{{}}}", c.join(",")),
        ValueKind::List => "STR [STR ...]".into(),
        ValueKind::Json => "JSON".into(),
    };
    if spec.ty.optional {
        format!("{base} (or none)")
    } else {
        base
    }
}

/// A value as a user would write it (strings unquoted).
fn display_value(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Array(a) => a.iter().map(display_value).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn is_none_word(s: &str) -> bool {
    s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("null")
}

/// Python's `strtobool`, as transformers' `string_to_bool` accepts it.
fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => Some(true),
        "n" | "no" | "f" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Converts a YAML or command-line value to the JSON shape the field's Rust
/// type deserializes from. Strings are parsed for non-string fields, because
/// YAML 1.1 readers (PyYAML) and shells hand numbers over as text.
fn coerce(spec: &FieldSpec, v: Value) -> Result<Value, String> {
    let optional = spec.ty.optional;
    let none_ok = |v: &Value| match v {
        Value::Null => true,
        Value::String(s) => is_none_word(s),
        Value::Array(a) => a.len() == 1 && a[0].as_str().is_some_and(is_none_word),
        _ => false,
    };
    if none_ok(&v) {
        if optional {
            return Ok(Value::Null);
        }
        if spec.ty.kind == ValueKind::Json {
            return Ok(Value::Object(Map::new()));
        }
        if v.is_null() {
            return Err("this setting cannot be none".into());
        }
    }
    match spec.ty.kind {
        ValueKind::Bool => match &v {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            Value::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                Ok(Value::Bool(n.as_u64() == Some(1)))
            }
            Value::String(s) => parse_bool(s)
                .map(Value::Bool)
                .ok_or_else(|| "expected true or false".into()),
            _ => Err(format!("expected true or false, got {}", kind_name(&v))),
        },
        ValueKind::Int | ValueKind::UInt => {
            let unsigned = spec.ty.kind == ValueKind::UInt;
            let want = if unsigned {
                "a non-negative integer"
            } else {
                "an integer"
            };
            let n: i128 = match &v {
                Value::Number(n) => {
                    if let Some(i) = n.as_i64() {
                        i as i128
                    } else if let Some(u) = n.as_u64() {
                        u as i128
                    } else {
                        match n.as_f64() {
                            Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                                f as i128
                            }
                            _ => return Err(format!("expected {want}")),
                        }
                    }
                }
                Value::String(s) => s
                    .trim()
                    .parse::<i128>()
                    .map_err(|_| format!("expected {want}"))?,
                _ => return Err(format!("expected {want}, got {}", kind_name(&v))),
            };
            if unsigned {
                u64::try_from(n)
                    .map(|u| Value::Number(u.into()))
                    .map_err(|_| format!("expected {want}"))
            } else {
                i64::try_from(n)
                    .map(|i| Value::Number(i.into()))
                    .map_err(|_| format!("expected {want}"))
            }
        }
        ValueKind::Float => {
            let f = match &v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => return Err(format!("expected a number, got {}", kind_name(&v))),
            };
            match f {
                Some(f) if f.is_finite() => Ok(Value::Number(
                    Number::from_f64(f).ok_or("expected a number")?,
                )),
                Some(_) => Err("expected a finite number".into()),
                None => Err("expected a number".into()),
            }
        }
        ValueKind::Str => scalar_string(&v)
            .map(Value::String)
            .ok_or_else(|| format!("expected a string, got {}", kind_name(&v))),
        ValueKind::Enum(choices) => {
            let s = scalar_string(&v)
                .ok_or_else(|| format!("expected a string, got {}", kind_name(&v)))?;
            if choices.contains(&s.as_str()) {
                Ok(Value::String(s))
            } else {
                let hint = suggest(&s, choices.iter().copied())
                    .map(|c| format!(" (did you mean {c}?)"))
                    .unwrap_or_default();
                Err(format!("expected one of {}{hint}", choices.join(", ")))
            }
        }
        ValueKind::List => match &v {
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    scalar_string(i)
                        .map(Value::String)
                        .ok_or_else(|| format!("list items must be strings, got {}", kind_name(i)))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            other => scalar_string(other)
                .map(|s| Value::Array(vec![Value::String(s)]))
                .ok_or_else(|| {
                    format!(
                        "expected a string or a list of strings, got {}",
                        kind_name(other)
                    )
                }),
        },
        ValueKind::Json => match v {
            Value::Object(m) => Ok(Value::Object(m)),
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(Value::Object(m)) => Ok(Value::Object(m)),
                Ok(other) => Err(format!("expected a JSON object, got {}", kind_name(&other))),
                Err(e) => Err(format!("expected a JSON object: {e}")),
            },
            other => Err(format!(
                "expected a mapping (or a JSON object string), got {}",
                kind_name(&other)
            )),
        },
    }
}

/// The closest candidate to a misspelt name, if it is close enough.
fn suggest<'a>(input: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let input = input.to_ascii_lowercase().replace('-', "_");
    let mut candidates: Vec<&str> = candidates.collect();
    candidates.sort_unstable();
    // The smallest edit distance (ties: alphabetical), if it is small...
    let (d, best) = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&input, c), *c))
        .min()?;
    if d <= 2 || (d as f64) <= 0.34 * input.len().max(best.len()) as f64 {
        return Some(best.to_string());
    }
    // ... else a name the input abbreviates (`--learning` -> `--learning_rate`).
    (input.len() >= 4).then(|| {
        candidates
            .iter()
            .find(|c| c.starts_with(&input))
            .map(|c| c.to_string())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &'static str, fields: &'static [FieldSpec]) -> &'static FieldSpec {
        fields.iter().find(|f| f.name == name).unwrap()
    }

    #[test]
    fn coercion_by_type() {
        let lr = spec("learning_rate", SFTConfig::FIELDS);
        assert_eq!(
            coerce(lr, Value::String("5e-4".into())).unwrap(),
            serde_json::json!(5e-4)
        );
        assert_eq!(
            coerce(lr, serde_json::json!(1)).unwrap(),
            serde_json::json!(1.0)
        );
        assert!(coerce(lr, Value::String("abc".into())).is_err());
        assert!(coerce(lr, Value::String("nan".into())).is_err());
        assert!(coerce(lr, Value::Null).is_err());

        let bs = spec("per_device_train_batch_size", SFTConfig::FIELDS);
        assert_eq!(
            coerce(bs, serde_json::json!(4.0)).unwrap(),
            serde_json::json!(4)
        );
        assert!(coerce(bs, serde_json::json!(-1)).is_err());
        assert!(coerce(bs, serde_json::json!(2.5)).is_err());

        let max_steps = spec("max_steps", SFTConfig::FIELDS);
        assert_eq!(
            coerce(max_steps, Value::String("-1".into())).unwrap(),
            serde_json::json!(-1)
        );

        let bf16 = spec("bf16", SFTConfig::FIELDS);
        for (s, b) in [("yes", true), ("False", false), ("1", true), ("off", false)] {
            assert_eq!(
                coerce(bf16, Value::String(s.into())).unwrap(),
                Value::Bool(b),
                "{s}"
            );
        }
        assert_eq!(
            coerce(bf16, Value::String("None".into())).unwrap(),
            Value::Null
        );
        let packing = spec("packing", SFTConfig::FIELDS);
        assert!(coerce(packing, Value::String("none".into())).is_err());

        let targets = spec("lora_target_modules", ModelConfig::FIELDS);
        assert_eq!(
            coerce(targets, Value::String("all-linear".into())).unwrap(),
            serde_json::json!(["all-linear"])
        );
        assert_eq!(
            coerce(targets, serde_json::json!(["none"])).unwrap(),
            Value::Null
        );

        let kwargs = spec("lr_scheduler_kwargs", SFTConfig::FIELDS);
        assert_eq!(
            coerce(kwargs, Value::String(r#"{"num_cycles": 2}"#.into())).unwrap(),
            serde_json::json!({"num_cycles": 2})
        );
        assert!(coerce(kwargs, Value::String("[1]".into())).is_err());
        assert_eq!(coerce(kwargs, Value::Null).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn suggestions() {
        let names = [
            "learning_rate",
            "lora_r",
            "lora_alpha",
            "max_length",
            "seed",
        ];
        assert_eq!(
            suggest("learnig_rate", names.iter().copied()).as_deref(),
            Some("learning_rate")
        );
        assert_eq!(
            suggest("learning-rate", names.iter().copied()).as_deref(),
            Some("learning_rate")
        );
        assert_eq!(
            suggest("lora_alpah", names.iter().copied()).as_deref(),
            Some("lora_alpha")
        );
        assert_eq!(
            suggest("learning", names.iter().copied()).as_deref(),
            Some("learning_rate")
        );
        assert_eq!(suggest("completely_different", names.iter().copied()), None);
    }
}
