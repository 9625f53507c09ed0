//! A `transformers.PreTrainedTokenizerFast`-like tokenizer over the `tokenizers` crate.
//!
//! Mirrors transformers 5.x (`tokenization_utils_base.py`, `tokenization_utils_tokenizers.py`):
//! loading a `tokenizer.json` + `tokenizer_config.json` directory, special-token
//! bookkeeping, `encode`/`decode`, `apply_chat_template(tokenize=False)` and
//! `save_pretrained`. Token ids are `i64` so they go straight into tch tensors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tch::{Device, Tensor};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer,
};

use crate::chat_template::{json_dumps, ChatTemplate, ChatTemplateError, JsonDumpsOptions};
use crate::config::UnknownChoice;

/// Named special-token attributes, in transformers' `SPECIAL_TOKENS_ATTRIBUTES` order.
const SPECIAL_TOKEN_ATTRS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Errors from loading, using or saving a tokenizer. File errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{}: invalid JSON: {error}", path.display())]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// A file is valid JSON but has an unexpected shape.
    #[error("{}: {message}", path.display())]
    InvalidFile { path: PathBuf, message: String },
    /// The `tokenizers` backend failed (loading `tokenizer.json`, encoding or decoding).
    #[error("{context}: {message}")]
    Backend { context: String, message: String },
    /// The tokenizer has no chat template (or none matching the request).
    #[error("{0}")]
    NoChatTemplate(String),
    /// Compiling or rendering the chat template failed.
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    /// The chat template from `origin` (its file, or the config key holding it)
    /// does not compile (`compile`), or failed while rendering a conversation.
    #[error("{origin}{}: the chat template {}: {message}",
        line.map(|l| format!(", line {l}")).unwrap_or_default(),
        if *compile { "does not compile" } else { "failed to render" })]
    ChatTemplateAt {
        origin: String,
        line: Option<usize>,
        compile: bool,
        message: String,
    },
    /// The conversation passed to `apply_chat_template` is malformed.
    #[error("invalid conversation: {0}")]
    InvalidConversation(String),
    /// A token id outside `0..=u32::MAX`.
    #[error("token id {0} is out of range for this tokenizer")]
    InvalidTokenId(i64),
    /// A token string that is not in the vocabulary.
    #[error("token {0:?} is not in the vocabulary")]
    UnknownToken(String),
    /// Padding was requested but no pad token is set (set one, e.g. pad = eos).
    #[error("asking to pad but the tokenizer has no pad token; set one with `set_pad_token` (e.g. the eos token)")]
    NoPadToken,
    /// `BatchEncoding` rows of different lengths cannot form a tensor.
    #[error("batch rows have different lengths ({0} vs {1}); pad them first")]
    RaggedBatch(usize, usize),
    /// A tch error while building tensors.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Which side padding goes on (transformers' `padding_side`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    /// Pad before the tokens (what generation needs: the prompt ends at the last column).
    Left,
    /// Pad after the tokens (transformers' default).
    #[default]
    Right,
}

impl PaddingSide {
    /// `"left"` or `"right"`, as in `tokenizer_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            PaddingSide::Left => "left",
            PaddingSide::Right => "right",
        }
    }
}

impl std::str::FromStr for PaddingSide {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownChoice> {
        match s {
            "left" => Ok(PaddingSide::Left),
            "right" => Ok(PaddingSide::Right),
            other => Err(UnknownChoice::new(other, &["left", "right"])),
        }
    }
}

/// Padded token ids of a batch.
///
/// # Shapes
/// `input_ids` and `attention_mask` are `[batch][seq]` with every row the same
/// length (the longest sequence); `attention_mask` is 1 on real tokens, 0 on padding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchEncoding {
    pub input_ids: Vec<Vec<i64>>,
    pub attention_mask: Vec<Vec<i64>>,
}

impl BatchEncoding {
    /// `(input_ids, attention_mask)` as int64 tensors of shape `[batch, seq]` on `device`.
    pub fn to_tensors(&self, device: Device) -> Result<(Tensor, Tensor)> {
        Ok((
            rows_to_tensor(&self.input_ids, device)?,
            rows_to_tensor(&self.attention_mask, device)?,
        ))
    }
}

fn rows_to_tensor(rows: &[Vec<i64>], device: Device) -> Result<Tensor> {
    let width = rows.first().map_or(0, Vec::len);
    if let Some(bad) = rows.iter().find(|r| r.len() != width) {
        return Err(TokenizerError::RaggedBatch(width, bad.len()));
    }
    let flat: Vec<i64> = rows.concat();
    let t = Tensor::from_slice(&flat).f_view([rows.len() as i64, width as i64])?;
    Ok(t.f_to_device(device)?)
}

/// A chat template source with its compiled form built on first use (transformers
/// also compiles lazily, so a template minijinja cannot parse does not stop loading).
#[derive(Debug)]
struct TemplateSlot {
    source: String,
    /// Where the source came from, for errors: a file, or the config key holding it.
    origin: String,
    compiled: OnceLock<ChatTemplate>,
}

impl TemplateSlot {
    fn new(source: String, origin: impl Into<String>) -> Self {
        Self {
            source,
            origin: origin.into(),
            compiled: OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&ChatTemplate, TokenizerError> {
        if let Some(t) = self.compiled.get() {
            return Ok(t);
        }
        let t = ChatTemplate::new(self.source.clone()).map_err(|e| self.locate(e))?;
        Ok(self.compiled.get_or_init(|| t))
    }

    /// Names the template's origin and line, so that a broken template is not
    /// mistaken for a problem of the conversation being rendered.
    fn locate(&self, error: ChatTemplateError) -> TokenizerError {
        let (compile, e) = match &error {
            ChatTemplateError::Compile(e) => (true, e),
            ChatTemplateError::Render(e) => (false, e),
        };
        let message = match e.detail() {
            Some(detail) => format!("{}: {detail}", e.kind()),
            None => e.kind().to_string(),
        };
        TokenizerError::ChatTemplateAt {
            origin: self.origin.clone(),
            line: e.line(),
            compile,
            message,
        }
    }
}

impl Clone for TemplateSlot {
    fn clone(&self) -> Self {
        Self::new(self.source.clone(), self.origin.clone())
    }
}

/// The loaded chat template(s): a single one, or several by name
/// (`chat_template` as a list of `{"name", "template"}`, or `chat_templates/*.jinja`).
#[derive(Debug, Clone, Default)]
struct ChatTemplates {
    /// `(name, template)`; a single template is stored under `"default"`.
    templates: Vec<(String, TemplateSlot)>,
}

impl ChatTemplates {
    fn get(&self, name: &str) -> Option<&TemplateSlot> {
        self.templates
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    fn is_single(&self) -> bool {
        self.templates.len() == 1 && self.templates[0].0 == "default"
    }

    /// transformers' `get_chat_template`: `tool_use` when tools are given and it
    /// exists, else `default`.
    fn select(&self, with_tools: bool) -> Result<&TemplateSlot> {
        if self.templates.is_empty() {
            return Err(TokenizerError::NoChatTemplate(
                "cannot use chat template functions because the tokenizer has no chat_template; \
                 set one with `set_chat_template`"
                    .into(),
            ));
        }
        if with_tools {
            if let Some(t) = self.get("tool_use") {
                return Ok(t);
            }
        }
        self.get("default").ok_or_else(|| {
            let names: Vec<&str> = self.templates.iter().map(|(n, _)| n.as_str()).collect();
            TokenizerError::NoChatTemplate(format!(
                "this tokenizer has several chat templates and none is named \"default\": {names:?}"
            ))
        })
    }
}

/// A fast tokenizer with transformers' `PreTrainedTokenizerFast` semantics.
///
/// Cheap to clone relative to model weights; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct PreTrainedTokenizer {
    tokenizer: Tokenizer,
    /// The raw `tokenizer_config.json` (unknown keys are kept for `save_pretrained`).
    config: Map<String, Value>,
    /// Named special tokens (`bos_token`, …, plus model-specific `*_token` keys), in order.
    special_tokens: Vec<(String, String)>,
    /// `extra_special_tokens` (formerly `additional_special_tokens`).
    extra_special_tokens: Vec<String>,
    chat_templates: ChatTemplates,
    padding_side: PaddingSide,
    model_max_length: Option<usize>,
    clean_up_tokenization_spaces: bool,
    cleanup_bpe_anyway: bool,
    /// Padding/truncation settings found in `tokenizer.json`, restored on save.
    /// They are disabled on the live backend because transformers' `tokenizer(text)`
    /// (padding=False, truncation=False) disables them for each call too.
    saved_padding: Option<tokenizers::PaddingParams>,
    saved_truncation: Option<tokenizers::TruncationParams>,
    name_or_path: PathBuf,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.into(),
        error: source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.into(),
        error: source,
    })
}

fn invalid(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidFile {
        path: path.into(),
        message: message.into(),
    }
}

/// A special token as written in a config: `"<s>"`, or an AddedToken-like `{"content": "<s>", ...}`.
fn token_content(value: &Value, path: &Path, key: &str) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(m) => match m.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(
                path,
                format!("`{key}` is an object without a string \"content\""),
            )),
        },
        _ => Err(invalid(
            path,
            format!("`{key}` must be a string, an object with \"content\", or null"),
        )),
    }
}

/// An AddedToken-like object (`added_tokens_decoder` entries) with Python's defaults.
fn parse_added_token(value: &Value, path: &Path, key: &str) -> Result<AddedToken> {
    let m = value.as_object().ok_or_else(|| {
        invalid(
            path,
            format!("added_tokens_decoder[{key}] must be an object"),
        )
    })?;
    let content = m.get("content").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            path,
            format!("added_tokens_decoder[{key}] has no string \"content\""),
        )
    })?;
    let flag = |name: &str| m.get(name).and_then(Value::as_bool);
    let special = flag("special").unwrap_or(false);
    // Python's AddedToken(normalized=None) means `not special`.
    Ok(AddedToken::from(content, special)
        .single_word(flag("single_word").unwrap_or(false))
        .lstrip(flag("lstrip").unwrap_or(false))
        .rstrip(flag("rstrip").unwrap_or(false))
        .normalized(flag("normalized").unwrap_or(!special)))
}

fn token_list(value: &Value, path: &Path, key: &str) -> Result<Vec<String>> {
    match value {
        Value::Null => Ok(vec![]),
        Value::Array(items) => {
            let mut out = Vec::new();
            for v in items {
                out.extend(token_content(v, path, key)?);
            }
            Ok(out)
        }
        _ => Err(invalid(path, format!("`{key}` must be a list of tokens"))),
    }
}

fn set_token(tokens: &mut Vec<(String, String)>, name: &str, value: Option<String>) {
    tokens.retain(|(n, _)| n != name);
    if let Some(v) = value {
        tokens.push((name.to_string(), v));
    }
}

/// transformers' `clean_up_tokenization` (only used for non-BPE models, see `decode`).
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// The `tokenizers` backend from `tokenizer.json`, which must exist: only fast
/// tokenizers are supported.
fn load_backend(tok_path: &Path) -> Result<Tokenizer> {
    if !tok_path.is_file() {
        return Err(invalid(
            tok_path,
            "not found (only fast tokenizers with a tokenizer.json are supported)",
        ));
    }
    Tokenizer::from_file(tok_path).map_err(|e| TokenizerError::Backend {
        context: format!("{}: cannot load tokenizer", tok_path.display()),
        message: e.to_string(),
    })
}

/// A JSON file whose top level must be an object.
fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    match read_json(path)? {
        Value::Object(m) => Ok(m),
        _ => Err(invalid(path, "must contain a JSON object")),
    }
}

/// `tokenizer_config.json`, or an empty config when the directory has none
/// (transformers then runs on its defaults).
fn read_config(cfg_path: &Path) -> Result<Map<String, Value>> {
    if cfg_path.is_file() {
        read_json_object(cfg_path)
    } else {
        Ok(Map::new())
    }
}

/// The chat templates: files first (transformers 5), else the config entry.
fn load_chat_templates(
    dir: &Path,
    config: &Map<String, Value>,
    cfg_path: &Path,
) -> Result<Vec<(String, TemplateSlot)>> {
    let templates = read_template_files(dir)?;
    if !templates.is_empty() {
        return Ok(templates);
    }
    config_chat_templates(config, cfg_path)
}

/// `chat_template.jinja` as `default`, then `chat_templates/*.jinja` by file stem
/// in sorted order; a named file overrides an earlier template of the same name.
fn read_template_files(dir: &Path) -> Result<Vec<(String, TemplateSlot)>> {
    let mut templates: Vec<(String, TemplateSlot)> = Vec::new();
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.is_file() {
        let src = std::fs::read_to_string(&jinja_path).map_err(|source| TokenizerError::Io {
            path: jinja_path.clone(),
            error: source,
        })?;
        templates.push((
            "default".into(),
            TemplateSlot::new(src, jinja_path.display().to_string()),
        ));
    }
    let tdir = dir.join("chat_templates");
    if tdir.is_dir() {
        let entries = std::fs::read_dir(&tdir).map_err(|source| TokenizerError::Io {
            path: tdir.clone(),
            error: source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
            .collect();
        files.sort();
        for p in files {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let src = std::fs::read_to_string(&p).map_err(|source| TokenizerError::Io {
                path: p.clone(),
                error: source,
            })?;
            templates.retain(|(n, _)| *n != name);
            let origin = p.display().to_string();
            templates.push((name, TemplateSlot::new(src, origin)));
        }
    }
    Ok(templates)
}

/// The config's `chat_template`: a single string (stored as `default`) or a list
/// of `{"name", "template"}` entries.
fn config_chat_templates(
    config: &Map<String, Value>,
    cfg_path: &Path,
) -> Result<Vec<(String, TemplateSlot)>> {
    let mut templates: Vec<(String, TemplateSlot)> = Vec::new();
    match config.get("chat_template") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => templates.push((
            "default".into(),
            TemplateSlot::new(
                s.clone(),
                format!("{} (\"chat_template\")", cfg_path.display()),
            ),
        )),
        Some(Value::Array(items)) => {
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some(n), Some(t)) => {
                        let origin = format!("{} (chat_template {n:?})", cfg_path.display());
                        templates.push((n.into(), TemplateSlot::new(t.into(), origin)))
                    }
                    _ => {
                        return Err(invalid(
                            cfg_path,
                            "`chat_template` list entries need string \"name\" and \"template\"",
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                cfg_path,
                "`chat_template` must be a string or a list",
            ))
        }
    }
    Ok(templates)
}

/// `(attribute, token)` pairs such as `("eos_token", "<|endoftext|>")`, in order.
type NamedTokens = Vec<(String, String)>;

/// Named special tokens and `extra_special_tokens` as the config declares them.
fn config_special_tokens(
    config: &Map<String, Value>,
    cfg_path: &Path,
) -> Result<(NamedTokens, Vec<String>)> {
    let mut special_tokens: Vec<(String, String)> = Vec::new();
    for attr in SPECIAL_TOKEN_ATTRS {
        if let Some(v) = config.get(attr) {
            set_token(&mut special_tokens, attr, token_content(v, cfg_path, attr)?);
        }
    }
    // Model-specific named tokens (e.g. `image_token`): other `*_token` keys with string values.
    for (key, v) in config {
        if key.ends_with("_token") && !SPECIAL_TOKEN_ATTRS.contains(&key.as_str()) {
            if let Value::String(s) = v {
                set_token(&mut special_tokens, key, Some(s.clone()));
            }
        }
    }
    let mut extra_special_tokens = Vec::new();
    for key in ["extra_special_tokens", "additional_special_tokens"] {
        match config.get(key) {
            Some(Value::Object(named)) => {
                for (name, v) in named {
                    set_token(&mut special_tokens, name, token_content(v, cfg_path, name)?);
                }
            }
            Some(v) if extra_special_tokens.is_empty() => {
                extra_special_tokens = token_list(v, cfg_path, key)?
            }
            _ => {}
        }
    }
    Ok((special_tokens, extra_special_tokens))
}

/// Merges a legacy `special_tokens_map.json` into the special tokens; its named
/// tokens override the config's, its extra tokens are appended when new.
fn merge_special_tokens_map(
    stm_path: &Path,
    special_tokens: &mut Vec<(String, String)>,
    extra_special_tokens: &mut Vec<String>,
) -> Result<()> {
    let stm = read_json_object(stm_path)?;
    for (key, v) in &stm {
        if key == "extra_special_tokens" || key == "additional_special_tokens" {
            for t in token_list(v, stm_path, key)? {
                if !extra_special_tokens.contains(&t) {
                    extra_special_tokens.push(t);
                }
            }
        } else if key.ends_with("_token") {
            set_token(special_tokens, key, token_content(v, stm_path, key)?);
        }
    }
    Ok(())
}

/// Adds the config's `added_tokens_decoder` entries the backend lacks, in id
/// order (transformers adds them at init).
fn add_decoder_tokens(
    tokenizer: &mut Tokenizer,
    config: &Map<String, Value>,
    cfg_path: &Path,
) -> Result<()> {
    let Some(decoder) = config.get("added_tokens_decoder") else {
        return Ok(());
    };
    let m = decoder
        .as_object()
        .ok_or_else(|| invalid(cfg_path, "`added_tokens_decoder` must be an object"))?;
    let mut entries: Vec<(u64, AddedToken)> = Vec::new();
    for (id, v) in m {
        let id: u64 = id.parse().map_err(|_| {
            invalid(
                cfg_path,
                format!("added_tokens_decoder key {id:?} is not an integer id"),
            )
        })?;
        entries.push((id, parse_added_token(v, cfg_path, &id.to_string())?));
    }
    entries.sort_by_key(|(id, _)| *id);
    for (_, tok) in entries {
        if tokenizer.token_to_id(&tok.content).is_none() {
            if tok.special {
                tokenizer.add_special_tokens(&[tok]);
            } else {
                tokenizer.add_tokens(&[tok]);
            }
        }
    }
    Ok(())
}

/// Adds, as special tokens, the named and extra special tokens the backend lacks.
fn add_missing_special_tokens(
    tokenizer: &mut Tokenizer,
    special_tokens: &[(String, String)],
    extra_special_tokens: &[String],
) {
    let missing: Vec<AddedToken> = special_tokens
        .iter()
        .map(|(_, t)| t)
        .chain(extra_special_tokens.iter())
        .filter(|t| tokenizer.token_to_id(t).is_none())
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    if !missing.is_empty() {
        tokenizer.add_special_tokens(&missing);
    }
}

/// The config's `padding_side`, defaulting to the direction of `tokenizer.json`'s
/// own padding, else right.
fn config_padding_side(
    config: &Map<String, Value>,
    cfg_path: &Path,
    saved_padding: Option<&tokenizers::PaddingParams>,
) -> Result<PaddingSide> {
    match config.get("padding_side") {
        Some(Value::String(s)) => s
            .parse()
            .map_err(|e: UnknownChoice| invalid(cfg_path, format!("padding_side: {e}"))),
        Some(Value::Null) | None => Ok(match saved_padding {
            Some(p) if matches!(p.direction, tokenizers::PaddingDirection::Left) => {
                PaddingSide::Left
            }
            _ => PaddingSide::Right,
        }),
        Some(_) => Err(invalid(
            cfg_path,
            "`padding_side` must be \"left\" or \"right\"",
        )),
    }
}

/// The config's `model_max_length`; transformers stores "no limit" as int(1e30),
/// so huge values count as unset.
fn config_model_max_length(config: &Map<String, Value>) -> Option<usize> {
    config
        .get("model_max_length")
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite() && *x >= 0.0 && *x < 1e18)
        .map(|x| x as usize)
}

impl PreTrainedTokenizer {
    /// Loads a tokenizer directory the way `AutoTokenizer.from_pretrained(dir)` does for
    /// fast tokenizers: `tokenizer.json` (required), `tokenizer_config.json`,
    /// `special_tokens_map.json` (legacy, only when the config has no
    /// `added_tokens_decoder`), and `chat_template.jinja` / `chat_templates/*.jinja`,
    /// which take precedence over a `chat_template` in the config.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = load_backend(&tok_path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = read_config(&cfg_path)?;
        let templates = load_chat_templates(dir, &config, &cfg_path)?;
        let (mut special_tokens, mut extra_special_tokens) =
            config_special_tokens(&config, &cfg_path)?;

        // Legacy special_tokens_map.json: read only when the config lacks added_tokens_decoder.
        let stm_path = dir.join("special_tokens_map.json");
        if !config.contains_key("added_tokens_decoder") && stm_path.is_file() {
            merge_special_tokens_map(&stm_path, &mut special_tokens, &mut extra_special_tokens)?;
        }

        // tokenizer.json's own padding supplies defaults for pad_token and padding_side.
        let saved_padding = tokenizer.get_padding().cloned();
        let saved_truncation = tokenizer.get_truncation().cloned();
        if let Some(p) = &saved_padding {
            if !special_tokens.iter().any(|(n, _)| n == "pad_token")
                && !config.contains_key("pad_token")
            {
                set_token(&mut special_tokens, "pad_token", Some(p.pad_token.clone()));
            }
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Backend {
                context: tok_path.display().to_string(),
                message: e.to_string(),
            })?;

        add_decoder_tokens(&mut tokenizer, &config, &cfg_path)?;
        add_missing_special_tokens(&mut tokenizer, &special_tokens, &extra_special_tokens);

        let padding_side = config_padding_side(&config, &cfg_path, saved_padding.as_ref())?;
        let model_max_length = config_model_max_length(&config);
        let flag = |k: &str| config.get(k).and_then(Value::as_bool).unwrap_or(false);

        Ok(Self {
            clean_up_tokenization_spaces: flag("clean_up_tokenization_spaces"),
            cleanup_bpe_anyway: flag(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
            ),
            tokenizer,
            config,
            special_tokens,
            extra_special_tokens,
            chat_templates: ChatTemplates { templates },
            padding_side,
            model_max_length,
            saved_padding,
            saved_truncation,
            name_or_path: dir.to_path_buf(),
        })
    }

    /// The directory this tokenizer was loaded from.
    pub fn name_or_path(&self) -> &Path {
        &self.name_or_path
    }

    /// The underlying `tokenizers` tokenizer (padding/truncation disabled).
    pub fn backend(&self) -> &Tokenizer {
        &self.tokenizer
    }

    // ------------------------------------------------------------------
    // Encoding / decoding
    // ------------------------------------------------------------------

    /// `tokenizer(text, add_special_tokens=...).input_ids`.
    ///
    /// With `add_special_tokens = true` the post-processor runs (GLM-4: prepends
    /// `[gMASK]<sop>`). Special tokens written in `text` are always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Backend {
                context: "encode".into(),
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// [`encode`](Self::encode) for many texts (in parallel); one unpadded id list per text.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        add_special_tokens: bool,
    ) -> Result<Vec<Vec<i64>>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encs = self
            .tokenizer
            .encode_batch_fast(inputs, add_special_tokens)
            .map_err(|e| TokenizerError::Backend {
                context: "encode_batch".into(),
                message: e.to_string(),
            })?;
        Ok(encs
            .iter()
            .map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect())
            .collect())
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`.
    ///
    /// Ids unknown to the vocabulary are skipped, as the Python backend does. Like
    /// transformers 5, `clean_up_tokenization_spaces` is honoured only for non-BPE
    /// models (it corrupts BPE output), so GLM-4 decodes verbatim.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids = to_u32(ids)?;
        let text = self
            .tokenizer
            .decode(&ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Backend {
                context: "decode".into(),
                message: e.to_string(),
            })?;
        let is_bpe = matches!(self.tokenizer.get_model(), ModelWrapper::BPE(_));
        if self.clean_up_tokenization_spaces && (!is_bpe || self.cleanup_bpe_anyway) {
            Ok(clean_up_tokenization(&text))
        } else {
            Ok(text)
        }
    }

    /// [`decode`](Self::decode) for each sequence.
    pub fn batch_decode(
        &self,
        sequences: &[Vec<i64>],
        skip_special_tokens: bool,
    ) -> Result<Vec<String>> {
        sequences
            .iter()
            .map(|s| self.decode(s, skip_special_tokens))
            .collect()
    }

    /// A streaming decoder that turns ids into text one token at a time.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream::new(self, skip_special_tokens)
    }

    // ------------------------------------------------------------------
    // Vocabulary and special tokens
    // ------------------------------------------------------------------

    /// Id of `token` (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.tokenizer.token_to_id(token).map(i64::from)
    }

    /// Token string of `id`.
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.tokenizer.id_to_token(id))
    }

    /// `len(tokenizer)`: vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// `tokenizer.vocab_size`: the base model vocabulary, without added tokens.
    pub fn base_vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(false)
    }

    /// A named special token (`"eos_token"`, `"pad_token"`, or a model-specific `*_token`).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }

    fn special_token_id(&self, name: &str) -> Option<i64> {
        self.special_token(name).and_then(|t| self.token_to_id(t))
    }

    /// `tokenizer.eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }
    /// `tokenizer.eos_token_id`.
    pub fn eos_token_id(&self) -> Option<i64> {
        self.special_token_id("eos_token")
    }
    /// `tokenizer.bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }
    /// `tokenizer.bos_token_id`.
    pub fn bos_token_id(&self) -> Option<i64> {
        self.special_token_id("bos_token")
    }
    /// `tokenizer.unk_token`.
    pub fn unk_token(&self) -> Option<&str> {
        self.special_token("unk_token")
    }
    /// `tokenizer.pad_token`; `None` when unset.
    pub fn pad_token(&self) -> Option<&str> {
        self.special_token("pad_token")
    }
    /// `tokenizer.pad_token_id`; `None` when unset (the tutorial then sets pad = eos).
    pub fn pad_token_id(&self) -> Option<i64> {
        self.special_token_id("pad_token")
    }

    /// `tokenizer.pad_token = token`. The token must already be in the vocabulary
    /// (so that `pad_token_id` is defined), e.g. the eos token.
    pub fn set_pad_token(&mut self, token: &str) -> Result<()> {
        if self.tokenizer.token_to_id(token).is_none() {
            return Err(TokenizerError::UnknownToken(token.to_string()));
        }
        set_token(
            &mut self.special_tokens,
            "pad_token",
            Some(token.to_string()),
        );
        Ok(())
    }

    /// `tokenizer.eos_token = token` (TRL's `eos_token` setting). The token must
    /// be in the vocabulary, as TRL requires.
    pub fn set_eos_token(&mut self, token: &str) -> Result<()> {
        if self.tokenizer.token_to_id(token).is_none() {
            return Err(TokenizerError::UnknownToken(token.to_string()));
        }
        set_token(
            &mut self.special_tokens,
            "eos_token",
            Some(token.to_string()),
        );
        Ok(())
    }

    /// `tokenizer.special_tokens_map`: named special tokens as strings, in attribute order.
    pub fn special_tokens_map(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for attr in SPECIAL_TOKEN_ATTRS {
            if let Some(t) = self.special_token(attr) {
                out.push((attr, t));
            }
        }
        for (n, t) in &self.special_tokens {
            if !SPECIAL_TOKEN_ATTRS.contains(&n.as_str()) {
                out.push((n, t));
            }
        }
        out
    }

    /// `tokenizer.all_special_tokens`: named then extra special tokens, without duplicates.
    pub fn all_special_tokens(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let named = self.special_tokens_map().into_iter().map(|(_, t)| t);
        for t in named.chain(self.extra_special_tokens.iter().map(String::as_str)) {
            if !out.iter().any(|o| o == t) {
                out.push(t.to_string());
            }
        }
        out
    }

    /// `tokenizer.all_special_ids` (tokens missing from the vocabulary are left out).
    pub fn all_special_ids(&self) -> Vec<i64> {
        self.all_special_tokens()
            .iter()
            .filter_map(|t| self.token_to_id(t))
            .collect()
    }

    /// `tokenizer.padding_side` (from the config; `Right` if absent).
    pub fn padding_side(&self) -> PaddingSide {
        self.padding_side
    }

    /// `tokenizer.padding_side = side`.
    pub fn set_padding_side(&mut self, side: PaddingSide) {
        self.padding_side = side;
    }

    /// `tokenizer.model_max_length`; `None` when the config sets no real limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    // ------------------------------------------------------------------
    // Padding
    // ------------------------------------------------------------------

    /// Pads `sequences` to the longest with the pad token id on `side`
    /// (`tokenizer.pad({"input_ids": ...}, padding_side=...)`).
    pub fn pad(&self, sequences: Vec<Vec<i64>>, side: PaddingSide) -> Result<BatchEncoding> {
        let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let needs_padding = sequences.iter().any(|s| s.len() != longest);
        let pad_id = match self.pad_token_id() {
            Some(id) => id,
            None if !needs_padding => 0, // never written
            None => return Err(TokenizerError::NoPadToken),
        };
        let mut batch = BatchEncoding::default();
        for ids in sequences {
            let n = longest - ids.len();
            let (row, mask) = match side {
                PaddingSide::Left => {
                    let mut row = vec![pad_id; n];
                    let mut mask = vec![0; n];
                    mask.resize(longest, 1);
                    row.extend(ids);
                    (row, mask)
                }
                PaddingSide::Right => {
                    let mut mask = vec![1; ids.len()];
                    mask.resize(longest, 0);
                    let mut row = ids;
                    row.resize(longest, pad_id);
                    (row, mask)
                }
            };
            batch.input_ids.push(row);
            batch.attention_mask.push(mask);
        }
        Ok(batch)
    }

    // ------------------------------------------------------------------
    // Chat templates
    // ------------------------------------------------------------------

    /// The chat template source (`tokenizer.chat_template`); with several named
    /// templates, the `"default"` one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_templates
            .get("default")
            .map(|t| t.source.as_str())
    }

    /// Names of all chat templates (`["default"]` for a single one).
    pub fn chat_template_names(&self) -> Vec<&str> {
        self.chat_templates
            .templates
            .iter()
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// `tokenizer.chat_template = template` (replaces all templates with this one).
    pub fn set_chat_template(&mut self, template: String) {
        self.set_chat_template_from(template, "chat template");
    }

    /// [`set_chat_template`](Self::set_chat_template) with where the template
    /// came from (e.g. its file), which errors in the template name.
    pub fn set_chat_template_from(&mut self, template: String, origin: impl Into<String>) {
        self.chat_templates.templates =
            vec![("default".into(), TemplateSlot::new(template, origin))];
    }

    /// `tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=...,
    /// tokenize=False)`: the rendered prompt string.
    ///
    /// As in transformers: message keys whose value is `null` are dropped first,
    /// reasoning fields are aliased (`reasoning_content`/`thinking`/`reasoning`), the
    /// template sees `messages`, `tools` (`none` when not given), `documents` (`none`),
    /// `add_generation_prompt` and the special tokens (`eos_token`, `pad_token`, …).
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, tools, add_generation_prompt, &Map::new())
    }

    /// [`apply_chat_template`](Self::apply_chat_template) with extra template variables
    /// (transformers' `**kwargs`, e.g. `enable_thinking`); they override special tokens.
    pub fn apply_chat_template_with(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let slot = self.chat_templates.select(tools.is_some())?;
        let template = slot.get()?;
        // transformers accepts tools only as a list of JSON-schema dicts (or functions).
        if let Some(t) = tools {
            if !t.as_array().is_some_and(|a| a.iter().all(Value::is_object)) {
                return Err(TokenizerError::InvalidConversation(
                    "tools must be a list of JSON objects (function schemas)".into(),
                ));
            }
        }
        if messages.is_empty() {
            return Err(TokenizerError::InvalidConversation(
                "cannot apply a chat template to an empty conversation".into(),
            ));
        }
        let mut chat = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let Value::Object(m) = m else {
                return Err(TokenizerError::InvalidConversation(format!(
                    "message {i} is not a JSON object: {m}"
                )));
            };
            chat.push(Value::Object(alias_reasoning_fields(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )));
        }
        // template_kwargs = {**special_tokens_map, **kwargs}; then messages/tools/... on top.
        let mut ctx = Map::new();
        for (name, tok) in self.special_tokens_map() {
            ctx.insert(name.to_string(), Value::String(tok.to_string()));
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(chat));
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Value::Null));
        ctx.entry("documents").or_insert(Value::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        template.render(&ctx).map_err(|e| slot.locate(e))
    }

    /// `apply_chat_template(..., tokenize=True)`: render, then encode with
    /// `add_special_tokens=false` — the template already writes `[gMASK]<sop>`,
    /// so special tokens are never added twice (what transformers does).
    pub fn apply_chat_template_ids(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<Vec<i64>> {
        let text = self.apply_chat_template(messages, tools, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Renders and encodes each conversation, then pads the batch on `padding_side`
    /// (left for generation) with the pad token id.
    pub fn apply_chat_template_batch(
        &self,
        conversations: &[Vec<Value>],
        add_generation_prompt: bool,
        padding_side: PaddingSide,
    ) -> Result<BatchEncoding> {
        let texts = conversations
            .iter()
            .map(|c| self.apply_chat_template(c, None, add_generation_prompt))
            .collect::<Result<Vec<_>>>()?;
        let ids = self.encode_batch(&texts, false)?;
        self.pad(ids, padding_side)
    }

    // ------------------------------------------------------------------
    // Saving
    // ------------------------------------------------------------------

    /// Writes `tokenizer.json`, `tokenizer_config.json` (with the current chat
    /// template, special tokens and padding side) and `chat_template.jinja` into
    /// `dir` (created if missing), so transformers 4.x and 5.x can load it.
    ///
    /// The chat template goes both into the config (read by older versions) and
    /// into `chat_template.jinja` (read first by transformers 5, so a stale file in
    /// `dir` can never shadow the config). Named templates other than `default`
    /// go to `chat_templates/<name>.jinja`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| TokenizerError::Io {
            path: dir.into(),
            error: source,
        })?;
        let mut written = Vec::new();
        let tok_path = dir.join("tokenizer.json");
        let tok_json = self.backend_json(&tok_path)?;
        written.push(write_text(tok_path, &tok_json)?);

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg_text = config_text(self.saved_config(), &cfg_path)?;
        written.push(write_text(cfg_path, &cfg_text)?);

        self.write_chat_templates(dir, &mut written)?;
        Ok(written)
    }

    /// `tokenizer.json` with the padding/truncation it was loaded with.
    fn backend_json(&self, tok_path: &Path) -> Result<String> {
        let mut backend = self.tokenizer.clone();
        backend.with_padding(self.saved_padding.clone());
        backend
            .with_truncation(self.saved_truncation.clone())
            .map_err(|e| TokenizerError::Backend {
                context: tok_path.display().to_string(),
                message: e.to_string(),
            })?;
        backend
            .to_string(true)
            .map_err(|e| TokenizerError::Backend {
                context: tok_path.display().to_string(),
                message: e.to_string(),
            })
    }

    /// `tokenizer_config.json`'s content: the loaded config with the current state on top.
    fn saved_config(&self) -> Map<String, Value> {
        let mut cfg = self.config.clone();
        for key in [
            "chat_template",
            "name_or_path",
            "tokenizer_file",
            "special_tokens_map_file",
            "additional_special_tokens",
        ] {
            cfg.remove(key);
        }
        for attr in SPECIAL_TOKEN_ATTRS {
            cfg.remove(attr);
        }
        for (name, tok) in self.special_tokens_map() {
            cfg.insert(name.into(), Value::String(tok.into()));
        }
        if !self.extra_special_tokens.is_empty() {
            cfg.insert(
                "extra_special_tokens".into(),
                Value::Array(
                    self.extra_special_tokens
                        .iter()
                        .cloned()
                        .map(Value::String)
                        .collect(),
                ),
            );
        }
        cfg.insert(
            "padding_side".into(),
            Value::String(self.padding_side.as_str().into()),
        );
        cfg.insert(
            "clean_up_tokenization_spaces".into(),
            Value::Bool(self.clean_up_tokenization_spaces),
        );
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), Value::from(n as u64));
        }
        cfg.entry("tokenizer_class")
            .or_insert_with(|| Value::String("PreTrainedTokenizerFast".into()));
        cfg.insert("added_tokens_decoder".into(), self.added_tokens_decoder());
        if let Some(templates) = self.chat_template_config() {
            cfg.insert("chat_template".into(), templates);
        }
        cfg
    }

    /// The backend's added tokens as transformers' `added_tokens_decoder`, in id order.
    fn added_tokens_decoder(&self) -> Value {
        let mut added: Vec<(u32, AddedToken)> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        added.sort_by_key(|(id, _)| *id);
        let mut decoder = Map::new();
        for (id, t) in added {
            decoder.insert(
                id.to_string(),
                serde_json::json!({
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                }),
            );
        }
        Value::Object(decoder)
    }

    /// The config's `chat_template`: a string for a single template, a list of
    /// `{"name", "template"}` for several, nothing when there is none.
    fn chat_template_config(&self) -> Option<Value> {
        if self.chat_templates.is_single() {
            Some(Value::String(
                self.chat_templates.templates[0].1.source.clone(),
            ))
        } else if !self.chat_templates.templates.is_empty() {
            let list = self
                .chat_templates
                .templates
                .iter()
                .map(|(n, t)| serde_json::json!({"name": n, "template": t.source}))
                .collect();
            Some(Value::Array(list))
        } else {
            None
        }
    }

    /// Writes `default` to `chat_template.jinja` and each other template to
    /// `chat_templates/<name>.jinja`, appending the paths to `written`.
    fn write_chat_templates(&self, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
        for (name, t) in &self.chat_templates.templates {
            if name == "default" {
                written.push(write_text(dir.join("chat_template.jinja"), &t.source)?);
            } else {
                // Template names come from files/configs: keep them to a plain file name.
                if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                    return Err(TokenizerError::NoChatTemplate(format!(
                        "invalid chat template name {name:?}"
                    )));
                }
                let tdir = dir.join("chat_templates");
                std::fs::create_dir_all(&tdir).map_err(|source| TokenizerError::Io {
                    path: tdir.clone(),
                    error: source,
                })?;
                written.push(write_text(tdir.join(format!("{name}.jinja")), &t.source)?);
            }
        }
        Ok(())
    }
}

/// Writes `text` to `path` atomically, so an interrupted save never leaves a
/// truncated file behind; returns `path` for the list of written files.
fn write_text(path: PathBuf, text: &str) -> Result<PathBuf> {
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|source| TokenizerError::Io {
        path: path.clone(),
        error: source,
    })?;
    Ok(path)
}

/// Same bytes as transformers: json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n".
fn config_text(cfg: Map<String, Value>, cfg_path: &Path) -> Result<String> {
    let opts = JsonDumpsOptions {
        indent: Some("  ".into()),
        sort_keys: true,
        ..Default::default()
    };
    let text = json_dumps(&minijinja::Value::from_serialize(Value::Object(cfg)), &opts)
        .map_err(|e| invalid(cfg_path, e.to_string()))?;
    Ok(text + "\n")
}

/// transformers' `_alias_reasoning_fields`: `{"thinking": r, **message, "reasoning_content": r}`
/// where `r` is the first non-null of `reasoning_content`, `thinking`, `reasoning`.
fn alias_reasoning_fields(message: Map<String, Value>) -> Map<String, Value> {
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| message.get(*k).filter(|v| !v.is_null()).cloned());
    let Some(r) = reasoning else { return message };
    let mut out = Map::new();
    out.insert("thinking".into(), r.clone());
    for (k, v) in message {
        out.insert(k, v); // an existing "thinking" keeps the first position, Python-dict style
    }
    out.insert("reasoning_content".into(), r);
    out
}

fn to_u32(ids: &[i64]) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&i| u32::try_from(i).map_err(|_| TokenizerError::InvalidTokenId(i)))
        .collect()
}

/// The backend's own stream over this crate's tokenizer type.
type BackendStream<'a> = tokenizers::DecodeStream<
    'a,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Incremental detokenizer for streaming generation output (transformers'
/// `TextStreamer`), over tokenizers' `DecodeStream`: each token is decoded once
/// with a small window of left context, and text is held back while it ends in
/// an incomplete UTF-8 character.
///
/// Emits the decoder's output verbatim: `clean_up_tokenization_spaces` (which
/// [`PreTrainedTokenizer::decode`] honours for non-BPE models only) is not applied.
pub struct DecodeStream<'a> {
    tokenizer: &'a PreTrainedTokenizer,
    skip_special_tokens: bool,
    inner: BackendStream<'a>,
    /// Ids fed since text was last emitted (an incomplete character, or skipped
    /// special tokens), for [`finish`](Self::finish).
    pending: Vec<u32>,
    /// The id that completed the last emitted text: left context for `finish`.
    context: Option<u32>,
}

impl std::fmt::Debug for DecodeStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeStream")
            .field("skip_special_tokens", &self.skip_special_tokens)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<'a> DecodeStream<'a> {
    /// A stream over `tokenizer`; see [`PreTrainedTokenizer::decode_stream`].
    pub fn new(tokenizer: &'a PreTrainedTokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            inner: tokenizer.tokenizer.decode_stream(skip_special_tokens),
            pending: Vec::new(),
            context: None,
        }
    }

    /// Feeds one token id; returns the text it completes, if any.
    pub fn step(&mut self, id: i64) -> Result<Option<String>> {
        let id = u32::try_from(id).map_err(|_| TokenizerError::InvalidTokenId(id))?;
        self.pending.push(id);
        let text = self.inner.step(id).map_err(|e| TokenizerError::Backend {
            context: "decode".into(),
            message: e.to_string(),
        })?;
        if text.is_some() {
            self.pending.clear();
            self.context = Some(id);
        }
        Ok(text)
    }

    /// Flushes whatever is held back (an incomplete character comes out as U+FFFD)
    /// and resets the stream.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let pending = std::mem::take(&mut self.pending);
        let context = self.context.take();
        self.inner = self
            .tokenizer
            .tokenizer
            .decode_stream(self.skip_special_tokens);
        if pending.is_empty() {
            return Ok(None);
        }
        let decode = |ids: &[u32]| {
            self.tokenizer
                .tokenizer
                .decode(ids, self.skip_special_tokens)
                .map_err(|e| TokenizerError::Backend {
                    context: "decode".into(),
                    message: e.to_string(),
                })
        };
        let prefix = decode(context.as_slice())?;
        let with_context: Vec<u32> = context.into_iter().chain(pending.iter().copied()).collect();
        let full = decode(&with_context)?;
        let rest = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // A decoder rewrote the context: the pending ids on their own.
            None => decode(&pending)?,
        };
        Ok((!rest.is_empty()).then_some(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../weights/tiny-glm")
    }

    /// The tiny GLM tokenizer, if the weights directory is present.
    fn tiny() -> Option<PreTrainedTokenizer> {
        let dir = tiny_dir();
        if !dir.join("tokenizer.json").is_file() {
            eprintln!("skipping: {} not found", dir.display());
            return None;
        }
        Some(PreTrainedTokenizer::from_pretrained(dir).unwrap())
    }

    #[test]
    fn loads_special_tokens_and_config() {
        let Some(t) = tiny() else { return };
        assert_eq!(t.eos_token(), Some("<|endoftext|>"));
        assert_eq!(t.pad_token(), Some("<|endoftext|>"));
        assert_eq!(t.eos_token_id(), t.token_to_id("<|endoftext|>"));
        assert_eq!(t.padding_side(), PaddingSide::Left);
        assert_eq!(t.model_max_length(), Some(8192));
        assert_eq!(t.vocab_size(), t.base_vocab_size() + 14);
        assert_eq!(t.all_special_ids(), vec![t.eos_token_id().unwrap()]);
        assert!(t.chat_template().unwrap().starts_with("[gMASK]<sop>"));
    }

    #[test]
    fn post_processor_prepends_gmask_sop_only_with_special_tokens() {
        let Some(t) = tiny() else { return };
        let gmask = t.token_to_id("[gMASK]").unwrap();
        let sop = t.token_to_id("<sop>").unwrap();
        let with = t.encode("hello world", true).unwrap();
        let without = t.encode("hello world", false).unwrap();
        assert_eq!(&with[..2], &[gmask, sop]);
        assert_eq!(&with[2..], &without[..]);
        assert_eq!(t.decode(&with, false).unwrap(), "[gMASK]<sop>hello world");
        assert_eq!(t.decode(&with, true).unwrap(), "hello world");
        assert_eq!(
            t.encode_batch(&["hello world", "hi"], false).unwrap()[0],
            without
        );
        assert!(matches!(
            t.decode(&[-1], false),
            Err(TokenizerError::InvalidTokenId(-1))
        ));
    }

    #[test]
    fn chat_template_ids_do_not_double_special_tokens() {
        let Some(t) = tiny() else { return };
        let msgs = vec![
            json!({"role": "user", "content": "你好"}),
            json!({"role": "assistant", "content": null}),
        ];
        let text = t.apply_chat_template(&msgs, None, true).unwrap();
        // `content: null` is dropped (transformers' normalisation), so that message renders nothing.
        // tok.apply_chat_template([{"role": "user", "content": "你好"}, {"role": "assistant", "content": None}],
        //                         tokenize=False, add_generation_prompt=True)  (transformers 5.23)
        assert_eq!(text, "[gMASK]<sop><|user|>\n你好<|assistant|>");
        let ids = t.apply_chat_template_ids(&msgs, None, true).unwrap();
        assert_eq!(ids, t.encode(&text, false).unwrap());
        assert_eq!(
            ids.iter()
                .filter(|&&i| Some(i) == t.token_to_id("[gMASK]"))
                .count(),
            1
        );
        assert!(t.apply_chat_template(&[], None, false).is_err());
        assert!(t
            .apply_chat_template(&[json!("not a message")], None, false)
            .is_err());
    }

    #[test]
    fn template_sees_special_tokens_and_tools_none() {
        let Some(mut t) = tiny() else { return };
        t.set_chat_template(
            "{{ eos_token }}|{{ pad_token }}|{{ bos_token }}|{{ tools is none }}|{{ documents is none }}|{{ messages[0].thinking }}".into(),
        );
        let msgs = [json!({"role": "assistant", "content": "x", "reasoning_content": "why"})];
        // transformers 5.23, tiny-glm with this chat_template:
        // tok.apply_chat_template([{"role": "assistant", "content": "x", "reasoning_content": "why"}], tokenize=False)
        assert_eq!(
            t.apply_chat_template(&msgs, None, false).unwrap(),
            "<|endoftext|>|<|endoftext|>||True|True|why"
        );
    }

    #[test]
    fn batch_padding_left_and_right() {
        let Some(mut t) = tiny() else { return };
        let pad = t.pad_token_id().unwrap();
        let b = t
            .pad(vec![vec![5, 6, 7], vec![8]], PaddingSide::Left)
            .unwrap();
        assert_eq!(b.input_ids, vec![vec![5, 6, 7], vec![pad, pad, 8]]);
        assert_eq!(b.attention_mask, vec![vec![1, 1, 1], vec![0, 0, 1]]);
        let b = t
            .pad(vec![vec![5, 6, 7], vec![8]], PaddingSide::Right)
            .unwrap();
        assert_eq!(b.input_ids, vec![vec![5, 6, 7], vec![8, pad, pad]]);
        assert_eq!(b.attention_mask, vec![vec![1, 1, 1], vec![1, 0, 0]]);
        let (ids, mask) = b.to_tensors(Device::Cpu).unwrap();
        assert_eq!(ids.size(), vec![2, 3]);
        assert_eq!(mask.kind(), tch::Kind::Int64);
        assert_eq!(
            Vec::<i64>::try_from(ids.flatten(0, -1)).unwrap(),
            vec![5, 6, 7, 8, pad, pad]
        );

        let convs = vec![
            vec![json!({"role": "user", "content": "hi"})],
            vec![json!({"role": "user", "content": "a much longer question here"})],
        ];
        let b = t
            .apply_chat_template_batch(&convs, true, PaddingSide::Left)
            .unwrap();
        let short = t.apply_chat_template_ids(&convs[0], None, true).unwrap();
        let row = &b.input_ids[0];
        assert_eq!(&row[row.len() - short.len()..], &short[..]);

        // Without a pad token, padding unequal rows is an error, not a panic.
        t.special_tokens.retain(|(n, _)| n != "pad_token");
        assert_eq!(t.pad_token_id(), None);
        assert!(matches!(
            t.pad(vec![vec![1], vec![1, 2]], PaddingSide::Right),
            Err(TokenizerError::NoPadToken)
        ));
        assert!(t.set_pad_token("definitely not a token").is_err());
        t.set_pad_token("<|endoftext|>").unwrap();
        assert_eq!(t.pad_token_id(), t.eos_token_id());
    }

    #[test]
    fn decode_stream_matches_full_decode() {
        let Some(t) = tiny() else { return };
        let mut flushed_partial = 0;
        for text in [
            "Hello, 世界! 🎉 résumé\n  indented",
            "[gMASK]<sop><|user|>\n你好",
        ] {
            let all_ids = t.encode(text, false).unwrap();
            // Every prefix: those that end inside a character make `finish` flush it.
            for ids in (1..=all_ids.len()).map(|n| &all_ids[..n]) {
                for skip in [false, true] {
                    let mut stream = t.decode_stream(skip);
                    let mut out = String::new();
                    for &id in ids {
                        if let Some(piece) = stream.step(id).unwrap() {
                            assert!(
                                !piece.contains('\u{FFFD}'),
                                "partial character leaked: {piece:?}"
                            );
                            out.push_str(&piece);
                        }
                    }
                    if let Some(rest) = stream.finish().unwrap() {
                        flushed_partial += usize::from(rest.ends_with('\u{FFFD}'));
                        out.push_str(&rest);
                    }
                    assert_eq!(out, t.decode(ids, skip).unwrap());
                }
            }
        }
        assert!(flushed_partial > 0, "no prefix ended inside a character");
    }

    #[test]
    fn save_pretrained_round_trips() {
        let Some(mut t) = tiny() else { return };
        t.set_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}".into());
        t.set_padding_side(PaddingSide::Right);
        let dir = std::env::temp_dir().join(format!("trl_like_tok_save_{}", std::process::id()));
        let files = t.save_pretrained(&dir).unwrap();
        assert_eq!(files.len(), 3);
        let u = PreTrainedTokenizer::from_pretrained(&dir).unwrap();
        assert_eq!(u.chat_template(), t.chat_template());
        assert_eq!(u.padding_side(), PaddingSide::Right);
        assert_eq!(u.pad_token(), t.pad_token());
        assert_eq!(u.vocab_size(), t.vocab_size());
        assert_eq!(
            u.encode("hello 你好", true).unwrap(),
            t.encode("hello 你好", true).unwrap()
        );
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["chat_template"].as_str(), t.chat_template());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn extra_and_model_specific_special_tokens() {
        if !tiny_dir().join("tokenizer.json").is_file() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("trl_like_tok_extra_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            tiny_dir().join("tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<|endoftext|>",
                "bos_token": {"__type": "AddedToken", "content": "[gMASK]", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true},
                "additional_special_tokens": ["<|user|>", "<sop>", "<|brand_new|>"],
                "image_token": "<|begin_of_image|>",
                "chat_template": "{{ bos_token }}|{{ image_token }}|{{ eos_token }}"}"#,
        )
        .unwrap();
        let t = PreTrainedTokenizer::from_pretrained(&dir).unwrap();
        // transformers 5.23 on the same directory:
        //   t.all_special_tokens, t.all_special_ids, len(t), t.pad_token, t.padding_side ->
        //   ['[gMASK]', '<|endoftext|>', '<|begin_of_image|>', '<|user|>', '<sop>', '<|brand_new|>']
        //   [1902, 1900, 1910, 1907, 1904, 1914] 1915 None right
        //   t.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        //     -> '[gMASK]|<|begin_of_image|>|<|endoftext|>'
        //   t("<|brand_new|> hi").input_ids -> [1902, 1904, 1914, 1477]
        assert_eq!(
            t.all_special_tokens(),
            [
                "[gMASK]",
                "<|endoftext|>",
                "<|begin_of_image|>",
                "<|user|>",
                "<sop>",
                "<|brand_new|>"
            ]
        );
        assert_eq!(
            t.all_special_ids(),
            vec![1902, 1900, 1910, 1907, 1904, 1914]
        );
        assert_eq!(t.vocab_size(), 1915);
        assert_eq!(t.pad_token(), None);
        assert_eq!(t.padding_side(), PaddingSide::Right);
        let m = [json!({"role": "user", "content": "x"})];
        assert_eq!(
            t.apply_chat_template(&m, None, false).unwrap(),
            "[gMASK]|<|begin_of_image|>|<|endoftext|>"
        );
        assert_eq!(
            t.encode("<|brand_new|> hi", true).unwrap(),
            vec![1902, 1904, 1914, 1477]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let dir = std::env::temp_dir().join(format!("trl_like_tok_bad_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = PreTrainedTokenizer::from_pretrained(&dir).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let err = PreTrainedTokenizer::from_pretrained(&dir).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        if tiny_dir().join("tokenizer.json").is_file() {
            std::fs::copy(
                tiny_dir().join("tokenizer.json"),
                dir.join("tokenizer.json"),
            )
            .unwrap();
            std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": 5}"#).unwrap();
            let err = PreTrainedTokenizer::from_pretrained(&dir).unwrap_err();
            assert!(
                err.to_string().contains("tokenizer_config.json")
                    && err.to_string().contains("eos_token"),
                "{err}"
            );
            std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": [{"name": "default", "template": "A{{ messages | length }}"}, {"name": "tool_use", "template": "T"}]}"#).unwrap();
            let t = PreTrainedTokenizer::from_pretrained(&dir).unwrap();
            let m = [json!({"role": "user", "content": "x"})];
            assert_eq!(t.apply_chat_template(&m, None, false).unwrap(), "A1");
            assert_eq!(
                t.apply_chat_template(&m, Some(&json!([])), false).unwrap(),
                "T"
            );
            assert!(t
                .apply_chat_template(&m, Some(&json!({"name": "f"})), false)
                .is_err());
            assert!(t.pad_token_id().is_none());
            assert!(t
                .apply_chat_template_batch(&[m.to_vec(), vec![]], false, PaddingSide::Left)
                .is_err());
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
