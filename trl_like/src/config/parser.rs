//! `TrlParser`: fills [`ModelConfig`], [`DataArguments`] and [`SFTConfig`]
//! (or an application's own [`ConfigGroup`]s) like TRL's `TrlParser`:
//! defaults < `--config file.yaml` < command-line flags.
//!
//! The command line is read by a clap [`Command`] generated from the groups'
//! field tables: one [`Arg`] per field, whose flag, kebab-case alias, value
//! type (a value parser from the field's [`ValueKind`]), help (the doc comment)
//! and default (the group's value) all come from the table, plus hidden args
//! for older names (`--max_seq_length`) and the `--no_<bool>` forms. As TRL's
//! `set_defaults_with_config` does, the YAML file's values become the args'
//! defaults, so a flag wins over the file; [`ArgMatches::value_source`] tells a
//! value typed on the command line from a default, and [`Parsed::origin`]
//! reports where each setting came from. The values are merged as JSON,
//! deserialized with `deny_unknown_fields` and validated.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::builder::ValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command};
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
    /// A command-line flag, by its canonical name (e.g. `--learning_rate`,
    /// `--max_seq_length`, `--no_bf16`).
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
    /// Any other command-line error clap reports (for an application's own args).
    #[error("{0}")]
    Command(String),
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
    origins: HashMap<&'static str, Origin>,
}

impl<M, D, S> Parsed<M, D, S> {
    /// Where a field's value came from: a flag, the config file, or the default.
    pub fn origin(&self, field: &str) -> Origin {
        self.origins.get(field).cloned().unwrap_or(Origin::Default)
    }

    /// Whether a field was set explicitly, by the config file or a flag.
    pub fn is_explicit(&self, field: &str) -> bool {
        self.origins.contains_key(field)
    }
}

/// No extra command-line args: [`TrlParser::parse`] with the config groups only.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NoArgs {}

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
#[derive(Clone)]
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
    /// Where each field's current value came from (absent: the default).
    origins: HashMap<&'static str, Origin>,
}

fn group_of<G: ConfigGroup>(defaults: &G) -> Result<Group, ParseError> {
    let message = match serde_json::to_value(defaults) {
        Ok(Value::Object(values)) => {
            return Ok(Group {
                title: G::TITLE,
                name: G::NAME,
                fields: G::fields(),
                preprocess: G::preprocess,
                values,
            })
        }
        Ok(_) => "does not serialize to a map".to_string(),
        Err(e) => e.to_string(),
    };
    Err(ParseError::Deserialize {
        group: G::NAME,
        message,
    })
}

const PREAMBLE: &str = "\
Each setting comes from the defaults below, overridden by the YAML file given with
--config (a mapping of field: value, plus an optional env: mapping of environment
variables), overridden by flags. Flags: --field VALUE, --field=VALUE, or kebab case
(--learning-rate). Booleans: --flag, --flag true|false, --no_flag. Lists: the values
up to the next flag. Optional settings accept none (or null).";

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
        self.parse_with::<NoArgs>(args).map(|(p, _)| p)
    }

    /// Like [`parse`](Self::parse), with an application's own args (a clap
    /// [`Args`], e.g. a `#[derive(clap::Args)]` struct) parsed from the same
    /// command line and shown in the same `--help`.
    pub fn parse_with<A: Args>(&self, args: &[String]) -> Result<(Parsed<M, D, S>, A), ParseError> {
        let mut merge = self.start()?;
        // Help wins wherever it appears, even after a bad value.
        if args.iter().any(|a| a == "--help" || a == "-h") {
            return Err(ParseError::Help(merge.help::<A>()));
        }
        let mut matches = merge.matches::<A>(args)?;
        let config = match matches.get_many::<String>("config") {
            None => None,
            Some(mut paths) => {
                let first = paths.next().map(PathBuf::from);
                if let (Some(first), Some(second)) = (first.clone(), paths.next()) {
                    return Err(ParseError::RepeatedConfig {
                        first,
                        second: PathBuf::from(second),
                    });
                }
                first
            }
        };
        let mut env = Vec::new();
        if let Some(path) = &config {
            env = merge.apply_yaml(path)?;
            // The file's values are now the defaults: parse the flags against them.
            matches = merge.matches::<A>(args)?;
        }
        merge.read_matches(&matches)?;

        let model: M = merge.finish(0)?;
        let data: D = merge.finish(1)?;
        let sft: S = merge.finish(2)?;
        merge.check(model.validate())?;
        merge.check(data.validate())?;
        merge.check(sft.validate())?;
        let extra = A::from_arg_matches(&matches).map_err(|e| from_clap(e, &[]))?;
        Ok((
            Parsed {
                model,
                data,
                sft,
                env,
                config_file: config,
                origins: merge.origins,
            },
            extra,
        ))
    }

    /// The clap command: every field of every group, with the application's defaults.
    pub fn command(&self) -> Command {
        self.command_with::<NoArgs>()
    }

    /// [`command`](Self::command) plus an application's own args.
    pub fn command_with<A: Args>(&self) -> Command {
        match self.start() {
            Ok(m) => m.command::<A>(),
            Err(_) => A::augment_args(Command::new("trl")),
        }
    }

    /// The `--help` text: every field of every group with its type, help and
    /// (application) default.
    pub fn help(&self) -> String {
        self.help_with::<NoArgs>()
    }

    /// [`help`](Self::help) plus an application's own args.
    pub fn help_with<A: Args>(&self) -> String {
        match self.start() {
            Ok(m) => m.help::<A>(),
            Err(e) => e.to_string(),
        }
    }

    /// Every field as Markdown tables (flag, type, default, help), one per
    /// group — the source of the flags reference in the docs.
    pub fn help_markdown(&self) -> String {
        self.help_markdown_with::<NoArgs>()
    }

    /// [`help_markdown`](Self::help_markdown) plus tables for an
    /// application's own args, one per help heading.
    pub fn help_markdown_with<A: Args>(&self) -> String {
        match self.start() {
            Ok(m) => m.markdown::<A>(),
            Err(e) => e.to_string(),
        }
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
                for n in names_of(spec) {
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

/// A field's name and its older names.
fn names_of(spec: &'static FieldSpec) -> impl Iterator<Item = &'static str> {
    std::iter::once(spec.name).chain(spec.aliases.iter().copied())
}

/// The carrier of a field value's error through clap, back to [`ParseError`].
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
struct FlagValueError {
    flag: String,
    field: &'static str,
    value: String,
    reason: String,
}

/// The value parser of a scalar field: the field's type coercion.
fn scalar_parser(
    spec: &'static FieldSpec,
    used: &'static str,
    preprocess: fn(&str, Value) -> Value,
) -> ValueParser {
    ValueParser::new(move |s: &str| -> Result<Value, FlagValueError> {
        let err = |reason| FlagValueError {
            flag: format!("--{used}"),
            field: spec.name,
            value: s.to_string(),
            reason,
        };
        coerce(spec, preprocess(spec.name, Value::String(s.to_string()))).map_err(err)
    })
}

/// The clap value name of a field: its type without the optional marker.
fn value_name(spec: &FieldSpec) -> String {
    match spec.ty.kind {
        ValueKind::Bool => "BOOL".into(),
        ValueKind::List => "STR".into(),
        ValueKind::FloatList => "FLOAT".into(),
        _ => type_label(spec).trim_end_matches(" (or none)").to_string(),
    }
}

/// A value as the strings clap takes for a default; `None` for an empty list,
/// which no default string can spell.
fn default_strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Null => Some(vec!["none".into()]),
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) if a.is_empty() => None,
        Value::Array(a) => Some(a.iter().map(display_value).collect()),
        Value::Object(_) => Some(vec![v.to_string()]),
        other => Some(vec![other.to_string()]),
    }
}

/// The args of one field: the field itself (visible, with its default), one
/// hidden arg per older name, and hidden `--no_<name>` args for booleans.
/// Older names are args of their own so that giving a field twice under
/// different names with different values can be refused.
fn field_args(
    spec: &'static FieldSpec,
    preprocess: fn(&str, Value) -> Value,
    default: Option<&Value>,
) -> Vec<Arg> {
    let mut out = Vec::new();
    for (i, name) in names_of(spec).enumerate() {
        let kebab = name.replace('_', "-");
        let mut arg = Arg::new(name)
            .long(name)
            .value_name(value_name(spec))
            .hide(i > 0);
        if kebab != name {
            arg = arg.alias(kebab.clone());
        }
        arg = match spec.ty.kind {
            ValueKind::Bool => arg
                .num_args(0..=1)
                .default_missing_value("true")
                .value_parser(scalar_parser(spec, name, preprocess)),
            ValueKind::List | ValueKind::FloatList => arg
                .num_args(1..)
                .allow_negative_numbers(true)
                .value_parser(clap::value_parser!(String)),
            _ => arg
                .num_args(1)
                .allow_hyphen_values(true)
                .value_parser(scalar_parser(spec, name, preprocess)),
        };
        if i == 0 {
            let mut help = spec.help_text();
            if !spec.aliases.is_empty() {
                let a: Vec<String> = spec.aliases.iter().map(|a| format!("--{a}")).collect();
                help.push_str(&format!(" [alias: {}]", a.join(", ")));
            }
            if let Some(v) = default {
                match default_strings(v) {
                    Some(d) => arg = arg.default_values(d),
                    // clap shows no default it does not hold: say it ourselves.
                    None => help.push_str(&format!(" [default: {}]", display_value(v))),
                }
            }
            arg = arg.help(help);
        }
        out.push(arg);
        if spec.ty.kind == ValueKind::Bool {
            out.push(
                Arg::new(format!("no_{name}"))
                    .long(format!("no_{name}"))
                    .alias(format!("no-{kebab}"))
                    .action(ArgAction::SetTrue)
                    .hide(true),
            );
        }
    }
    out
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

    /// The clap command for the current defaults (the application's, then the file's).
    fn command<A: Args>(&self) -> Command {
        let mut cmd = Command::new("trl")
            .no_binary_name(true)
            .args_override_self(true)
            .disable_help_flag(true)
            .disable_version_flag(true)
            .next_line_help(true)
            .term_width(0)
            .override_usage("[--config FILE.yaml] [--FIELD VALUE ...]")
            .before_help(PREAMBLE)
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_name("FILE")
                    .action(ArgAction::Append)
                    .help("YAML file with settings (overridden by flags)."),
            )
            .arg(
                Arg::new("help")
                    .short('h')
                    .long("help")
                    .action(ArgAction::Help)
                    .help("Print this help."),
            );
        for g in &self.groups {
            cmd = cmd.next_help_heading(g.title);
            for spec in g.fields {
                cmd = cmd.args(field_args(spec, g.preprocess, g.values.get(spec.name)));
            }
        }
        // An application's Args struct brings its doc comment as `about`: not ours to show.
        A::augment_args(cmd.next_help_heading(None::<&str>))
            .about(None::<&str>)
            .long_about(None::<&str>)
    }

    fn help<A: Args>(&self) -> String {
        self.command::<A>().render_help().to_string()
    }

    fn matches<A: Args>(&self, args: &[String]) -> Result<ArgMatches, ParseError> {
        let cmd = self.command::<A>();
        // What a misspelt flag may have meant: every name but the hidden `--no_<bool>` forms.
        let names: Vec<String> = cmd
            .get_arguments()
            .filter(|a| !(a.is_hide_set() && a.get_id().as_str().starts_with("no_")))
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        // Scalars take hyphen values (`--max_steps -1`, `--learning_rate -1e-4`),
        // so clap would read a following flag as the value: that value is missing.
        for (i, a) in args.iter().enumerate() {
            let Some(name) = a.strip_prefix("--").filter(|n| !n.contains('=')) else {
                continue;
            };
            let scalar = cmd.get_arguments().find(|x| {
                x.is_allow_hyphen_values_set()
                    && (x.get_long() == Some(name)
                        || x.get_all_aliases().is_some_and(|al| al.contains(&name)))
            });
            if let Some(x) = scalar {
                if !matches!(args.get(i + 1), Some(next) if !next.starts_with("--")) {
                    return Err(ParseError::MissingValue {
                        flag: format!("--{}", x.get_long().unwrap_or(name)),
                    });
                }
            }
        }
        // clap reads a lone `--` as the end of the options; nothing here takes positionals.
        if let Some(a) = args.iter().find(|a| *a == "--") {
            return Err(ParseError::UnexpectedArgument { arg: a.clone() });
        }
        cmd.try_get_matches_from(args)
            .map_err(|e| from_clap(e, &names))
    }

    /// Takes every field's value from the matches: the last of the flags that
    /// name it, else its default (the file's value or the application's).
    fn read_matches(&mut self, m: &ArgMatches) -> Result<(), ParseError> {
        for gi in 0..self.groups.len() {
            let (fields, preprocess) = (self.groups[gi].fields, self.groups[gi].preprocess);
            for spec in fields {
                // (position, name used, flag as the origin, value) of each flag.
                let mut given: Vec<(usize, &'static str, String, Value)> = Vec::new();
                for name in names_of(spec) {
                    if m.value_source(name) == Some(ValueSource::CommandLine) {
                        if let Some(v) = arg_value(m, name, spec, preprocess)? {
                            given.push((
                                m.index_of(name).unwrap_or(0),
                                name,
                                format!("--{name}"),
                                v,
                            ));
                        }
                    }
                    let no = format!("no_{name}");
                    if spec.ty.kind == ValueKind::Bool
                        && m.value_source(&no) == Some(ValueSource::CommandLine)
                    {
                        let at = m.index_of(&no).unwrap_or(0);
                        given.push((at, name, format!("--{no}"), Value::Bool(false)));
                    }
                }
                given.sort_by_key(|g| g.0);
                let mut seen = LayerSeen::new();
                for (_, name, flag, value) in given.iter().cloned() {
                    let t = Target { group: gi, spec };
                    self.set(t, name, value, Origin::Cli(flag), &mut seen)?;
                }
                if given.is_empty() {
                    // Not on the command line: the default clap holds, which is
                    // the file's value where the file set one.
                    if let Some(v) = arg_value(m, spec.name, spec, preprocess)? {
                        self.groups[gi].values.insert(spec.name.to_string(), v);
                    }
                }
            }
        }
        Ok(())
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
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).map_err(|e| file_err(format!("invalid YAML: {e}")))?;
        let map = match yaml_to_json(doc).map_err(|e| file_err(format!("invalid YAML: {e}")))? {
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

    /// Markdown tables: the fields (flag and older names, type, default, help)
    /// from the field tables, then the application's args from the clap command.
    fn markdown<A: Args>(&self) -> String {
        let cell = |s: String| s.replace('|', "\\|");
        let header = |title: &str| {
            format!("\n## {title}\n\n| flag / YAML key | type | default | meaning |\n|---|---|---|---|\n")
        };
        let mut out = String::new();
        for g in &self.groups {
            out.push_str(&header(g.title));
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
                out.push_str(&format!(
                    "| {flag} | {} | {} | {} |\n",
                    cell(type_label(spec)),
                    cell(format!("`{default}`")),
                    cell(spec.help_text())
                ));
            }
        }
        let mut app = A::augment_args(Command::new("app").disable_help_flag(true));
        app.build(); // settles each arg's number of values
        let mut heading: Option<Option<String>> = None;
        for arg in app.get_arguments().filter(|a| !a.is_hide_set()) {
            let Some(long) = arg.get_long() else { continue };
            let h = arg.get_help_heading().map(str::to_string);
            if heading.as_ref() != Some(&h) {
                out.push_str(&format!(
                    "\n## {}\n\n| flag (not a YAML key) | value | default | meaning |\n|---|---|---|---|\n",
                    h.as_deref().unwrap_or("Other options")
                ));
                heading = Some(h);
            }
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
            let (ty, default) = if takes_value {
                let names = arg
                    .get_value_names()
                    .map(|v| {
                        v.iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_else(|| "VALUE".into());
                let d: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                (
                    names,
                    if d.is_empty() {
                        "none".into()
                    } else {
                        d.join(" ")
                    },
                )
            } else {
                ("(switch)".to_string(), "off".to_string())
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            out.push_str(&format!(
                "| `--{long}` | {} | {} | {} |\n",
                cell(ty),
                cell(format!("`{default}`")),
                cell(help)
            ));
        }
        out
    }
}

/// A field's value in the matches, coerced (`None`: not there at all).
fn arg_value(
    m: &ArgMatches,
    id: &str,
    spec: &'static FieldSpec,
    preprocess: fn(&str, Value) -> Value,
) -> Result<Option<Value>, ParseError> {
    let internal = |e: clap::parser::MatchesError| ParseError::Deserialize {
        group: "TrlParser",
        message: format!("--{id}: {e}"),
    };
    if !matches!(spec.ty.kind, ValueKind::List | ValueKind::FloatList) {
        return m
            .try_get_one::<Value>(id)
            .map(Option::<&Value>::cloned)
            .map_err(internal);
    }
    let Some(items) = m.try_get_many::<String>(id).map_err(internal)? else {
        return Ok(None);
    };
    let raw = Value::Array(items.map(|s| Value::String(s.clone())).collect());
    coerce(spec, preprocess(spec.name, raw.clone()))
        .map(Some)
        .map_err(|reason| ParseError::InvalidValue {
            origin: Origin::Cli(format!("--{id}")),
            field: spec.name.to_string(),
            value: display_value(&raw),
            reason,
        })
}

/// A clap error as a [`ParseError`]: field values come back with their field,
/// unknown flags with our suggestion (it knows kebab case and abbreviations).
fn from_clap(e: clap::Error, names: &[String]) -> ParseError {
    use std::error::Error as _;
    if let Some(v) = e.source().and_then(|s| s.downcast_ref::<FlagValueError>()) {
        return ParseError::InvalidValue {
            origin: Origin::Cli(v.flag.clone()),
            field: v.field.to_string(),
            value: v.value.clone(),
            reason: v.reason.clone(),
        };
    }
    let context = |k| match e.get(k) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let arg = context(ContextKind::InvalidArg);
    // "--learning_rate <FLOAT>" -> "--learning_rate"
    let flag = arg
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let value = context(ContextKind::InvalidValue);
    match e.kind() {
        ErrorKind::DisplayHelp => ParseError::Help(e.to_string()),
        ErrorKind::UnknownArgument if arg.len() > 2 && arg.starts_with("--") => {
            ParseError::UnknownFlag {
                suggestion: suggest(&arg[2..], names.iter().map(String::as_str))
                    .map(|s| format!("--{s}")),
                flag: arg,
            }
        }
        ErrorKind::UnknownArgument => ParseError::UnexpectedArgument { arg },
        ErrorKind::InvalidValue if value.is_empty() => ParseError::MissingValue { flag },
        ErrorKind::TooManyValues => ParseError::InvalidValue {
            origin: Origin::Cli(flag.clone()),
            field: flag
                .trim_start_matches("--")
                .trim_start_matches("no_")
                .to_string(),
            value,
            reason: format!("{flag} takes no value"),
        },
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => ParseError::InvalidValue {
            origin: Origin::Cli(flag.clone()),
            field: flag.trim_start_matches("--").to_string(),
            value,
            reason: e
                .source()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "invalid value".into()),
        },
        _ => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or_default();
            ParseError::Command(line.trim_start_matches("error: ").to_string())
        }
    }
}

/// A YAML document as JSON. Not-a-number and infinities, which JSON cannot
/// hold, stay visible as their YAML spelling (`.nan`, `.inf`, `-.inf`) so that
/// the field's coercion can refuse them by name instead of reading "none".
fn yaml_to_json(v: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Number(i.into())
            } else if let Some(u) = n.as_u64() {
                Value::Number(u.into())
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match Number::from_f64(f) {
                    Some(n) => Value::Number(n),
                    None if f.is_nan() => Value::String(".nan".into()),
                    None if f > 0.0 => Value::String(".inf".into()),
                    None => Value::String("-.inf".into()),
                }
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .map(yaml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match yaml_to_json(k)? {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "a mapping key must be a name, got {}",
                            kind_name(&other)
                        ))
                    }
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

fn type_label(spec: &FieldSpec) -> String {
    let base = match spec.ty.kind {
        ValueKind::Bool => "[BOOL]".to_string(),
        ValueKind::Int | ValueKind::UInt => "INT".into(),
        ValueKind::Float => "FLOAT".into(),
        ValueKind::Str => "STR".into(),
        ValueKind::Enum(c) => format!("{{{}}}", c.join(",")),
        ValueKind::List => "STR [STR ...]".into(),
        ValueKind::FloatList => "FLOAT [FLOAT ...]".into(),
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
    if let Some(done) = coerce_none(spec, &v)? {
        return Ok(done);
    }
    match spec.ty.kind {
        ValueKind::Bool => coerce_bool(&v),
        ValueKind::Int => coerce_int(&v, false),
        ValueKind::UInt => coerce_int(&v, true),
        ValueKind::Float => coerce_float(&v),
        ValueKind::Str => scalar_string(&v)
            .map(Value::String)
            .ok_or_else(|| format!("expected a string, got {}", kind_name(&v))),
        ValueKind::Enum(choices) => coerce_enum(&v, choices),
        ValueKind::List => coerce_list(&v),
        ValueKind::FloatList => coerce_float_list(&v),
        ValueKind::Json => coerce_json(v),
    }
}

/// A none spelling (null, "none", ["none"]): `Some` with the field's empty value
/// when it has one, `None` to coerce the value as any other (a string field
/// keeps the word "none").
fn coerce_none(spec: &FieldSpec, v: &Value) -> Result<Option<Value>, String> {
    let none = match v {
        Value::Null => true,
        Value::String(s) => is_none_word(s),
        Value::Array(a) => a.len() == 1 && a[0].as_str().is_some_and(is_none_word),
        _ => false,
    };
    if !none {
        return Ok(None);
    }
    if spec.ty.optional {
        return Ok(Some(Value::Null));
    }
    if spec.ty.kind == ValueKind::Json {
        return Ok(Some(Value::Object(Map::new())));
    }
    if v.is_null() {
        return Err("this setting cannot be none".into());
    }
    Ok(None)
}

fn coerce_bool(v: &Value) -> Result<Value, String> {
    match v {
        Value::Bool(b) => Ok(Value::Bool(*b)),
        Value::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
            Ok(Value::Bool(n.as_u64() == Some(1)))
        }
        Value::String(s) => parse_bool(s)
            .map(Value::Bool)
            .ok_or_else(|| "expected true or false".into()),
        _ => Err(format!("expected true or false, got {}", kind_name(v))),
    }
}

/// An integer field; a float is accepted when it is whole (YAML writes `1e3`).
fn coerce_int(v: &Value, unsigned: bool) -> Result<Value, String> {
    let want = if unsigned {
        "a non-negative integer"
    } else {
        "an integer"
    };
    let n: i128 = match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i as i128
            } else if let Some(u) = n.as_u64() {
                u as i128
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => f as i128,
                    _ => return Err(format!("expected {want}")),
                }
            }
        }
        Value::String(s) => s
            .trim()
            .parse::<i128>()
            .map_err(|_| format!("expected {want}"))?,
        _ => return Err(format!("expected {want}, got {}", kind_name(v))),
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

fn coerce_float(v: &Value) -> Result<Value, String> {
    let f = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => parse_float(s),
        _ => return Err(format!("expected a number, got {}", kind_name(v))),
    };
    match f {
        Some(f) if f.is_finite() => Ok(Value::Number(
            Number::from_f64(f).ok_or("expected a number")?,
        )),
        Some(f) if f.is_nan() => Err("expected a finite number, got not-a-number".into()),
        Some(_) => Err("expected a finite number, got an infinity".into()),
        None => Err("expected a number".into()),
    }
}

fn coerce_enum(v: &Value, choices: &[&str]) -> Result<Value, String> {
    let s = scalar_string(v).ok_or_else(|| format!("expected a string, got {}", kind_name(v)))?;
    if choices.contains(&s.as_str()) {
        Ok(Value::String(s))
    } else {
        let hint = suggest(&s, choices.iter().copied())
            .map(|c| format!(" (did you mean {c}?)"))
            .unwrap_or_default();
        Err(format!("expected one of {}{hint}", choices.join(", ")))
    }
}

/// A list of strings; a single scalar stands for a one-item list.
fn coerce_list(v: &Value) -> Result<Value, String> {
    match v {
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
    }
}

/// A list of numbers (`loss_weights`); a single number is a one-item list.
fn coerce_float_list(v: &Value) -> Result<Value, String> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(coerce_float)
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        other => coerce_float(other).map(|f| Value::Array(vec![f])),
    }
}

/// A mapping; on the command line it arrives as a JSON object string.
fn coerce_json(v: Value) -> Result<Value, String> {
    match v {
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
    }
}

/// A number as Rust or YAML spells it (`1e-4`, `.nan`, `-.inf`).
fn parse_float(s: &str) -> Option<f64> {
    let s = s.trim();
    match s.to_ascii_lowercase().as_str() {
        ".nan" => Some(f64::NAN),
        ".inf" | "+.inf" => Some(f64::INFINITY),
        "-.inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
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
