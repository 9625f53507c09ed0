//! Jinja chat templates rendered the way Hugging Face transformers renders them.
//!
//! Mirrors `transformers/utils/chat_template_utils.py::_cached_compile_jinja_template`
//! (transformers 5.x): a Jinja2 `ImmutableSandboxedEnvironment` with
//! `trim_blocks=True`, `lstrip_blocks=True` and the `loopcontrols` extension, plus
//!
//! * a `tojson` filter that is Python's `json.dumps(x, ensure_ascii=False, indent=None,
//!   separators=None, sort_keys=False)` — no HTML escaping, Python's separators
//!   (`", "`/`": "` without indent, `","`/`": "` with one), key order preserved;
//! * `raise_exception(message)`, which aborts rendering with `message`;
//! * `strftime_now(format)`, the current local time formatted with a C `strftime` format.
//!
//! minijinja is a close but not identical re-implementation of Jinja2, so a few
//! more things are set up here to make templates print what Python prints:
//! Python-style string methods (`.strip()`, `.split()`, `.items()`, …) through
//! `minijinja_contrib::pycompat`, undefined values that render as empty strings
//! (Jinja2's default `Undefined`), and a formatter that prints lists, dicts and
//! floats the way Python's `str()` does (`['a', 1]`, `{'k': None}`, `1e+20`).

use std::fmt::Write as _;

use chrono::format::{Item, StrftimeItems};
use chrono::{NaiveDateTime, TimeZone as _};
use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};
use serde::Serialize;

/// Name under which the template is registered in its private environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Errors from compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template source is not valid Jinja (as understood by minijinja).
    #[error("chat template does not compile: {0:#}")]
    Compile(minijinja::Error),
    /// Rendering failed: an error in the template, a `raise_exception(...)` call
    /// (its message is part of this error's message), or a bad `tojson` argument.
    #[error("chat template failed to render: {0:#}")]
    Render(minijinja::Error),
}

/// A chat template compiled once and reused for every render.
///
/// ```
/// use trl_like::chat_template::ChatTemplate;
/// let t = ChatTemplate::new("{% for m in messages %}<|{{ m.role }}|>{{ m['content'] }}{% endfor %}").unwrap();
/// let out = t.render(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
/// assert_eq!(out, "<|user|>hi");
/// ```
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` in a transformers-compatible Jinja environment.
    pub fn new(source: impl Into<String>) -> Result<Self, ChatTemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, ...).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Jinja2's default `Undefined`: printing a missing key gives "", `is defined` works,
        // iterating it gives nothing, but reading an attribute of it is an error.
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        // Chat templates produce plain text; Jinja2's env has autoescape off.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(python_formatter);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(ChatTemplateError::Compile)?;
        Ok(Self { env, source })
    }

    /// The Jinja source this template was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the template with `context` (any serialisable map: typically
    /// `messages`, `tools`, `add_generation_prompt` and the special-token strings).
    ///
    /// Map key order is kept (`preserve_order`), which matters for `tojson` output.
    pub fn render<S: Serialize>(&self, context: S) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Render)?;
        template.render(context).map_err(ChatTemplateError::Render)
    }
}

// ---------------------------------------------------------------------------
// Template globals
// ---------------------------------------------------------------------------

/// `raise_exception(message)`: transformers raises `jinja2.TemplateError(message)`.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: transformers calls `datetime.now().strftime(format)` (local time).
fn strftime_now(format: String) -> String {
    python_strftime(&format, &chrono::Local::now().naive_local())
}

// ---------------------------------------------------------------------------
// Rendering `{{ value }}` like Python's str()
// ---------------------------------------------------------------------------

/// Jinja2 prints values with Python's `str()`; minijinja would print lists and
/// dicts in Rust `Debug` style and large floats without an exponent.
fn python_formatter(
    out: &mut minijinja::Output,
    _state: &State,
    value: &Value,
) -> Result<(), Error> {
    let text = match value.kind() {
        // Jinja2's default Undefined prints as "".
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => {
            return out
                .write_str(value.as_str().unwrap_or_default())
                .map_err(write_err)
        }
        ValueKind::Number if !value.is_integer() => {
            python_float_repr(f64::try_from(value.clone())?)
        }
        ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(value, &mut s)?;
            s
        }
        _ => value.to_string(),
    };
    out.write_str(&text).map_err(write_err)
}

fn write_err(_: std::fmt::Error) -> Error {
    Error::new(ErrorKind::WriteFailure, "failed to write template output")
}

/// Python `repr()` of a JSON-like value (used inside lists and dicts).
fn python_repr(value: &Value, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(value.clone())?)),
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, out)?;
                out.push_str(": ");
                python_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the string contains `'` and no `"`.
fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !python_isprintable(c) => {
                let cp = c as u32;
                // Infallible: writing to a String.
                let _ = if cp < 0x100 {
                    write!(out, "\\x{cp:02x}")
                } else if cp < 0x10000 {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Approximates Python's `str.isprintable()` for one character: control
/// characters, non-space separators and the common format characters are not
/// printable. (Unassigned code points, which Python also escapes, are kept.)
fn python_isprintable(c: char) -> bool {
    let cp = c as u32;
    !(cp < 0x20
        || (0x7f..=0xa0).contains(&cp)
        || cp == 0xad
        || cp == 0x1680
        || (0x2000..=0x200f).contains(&cp)
        || (0x2028..=0x202f).contains(&cp)
        || (0x205f..=0x206f).contains(&cp)
        || cp == 0x3000
        || cp == 0xfeff
        || (0xfff9..=0xfffb).contains(&cp)
        || (0xe000..=0xf8ff).contains(&cp))
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for
/// decimal exponents in [-4, 16), otherwise `d.ddde+XX`; `nan`, `inf`.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's `{:e}` prints the shortest digits that round-trip, like Python's repr.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{sign}{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                let (a, b) = digits.split_at(int_len as usize);
                format!("{sign}{a}.{b}")
            }
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

// ---------------------------------------------------------------------------
// tojson: Python json.dumps
// ---------------------------------------------------------------------------

/// Options of Python's `json.dumps` that transformers' `tojson` exposes;
/// `Default` is transformers' default (`ensure_ascii=False`, no indent, Python separators).
#[derive(Debug, Clone, Default)]
pub struct JsonDumpsOptions {
    /// Escape every non-ASCII character as `\uXXXX` (transformers' default: false).
    pub ensure_ascii: bool,
    /// `None`: one line. `Some(s)`: one item per line, nested levels indented by `s`
    /// (Python's `indent=4` is `Some("    ")`; `indent=0` is `Some("")`, still multi-line).
    pub indent: Option<String>,
    /// `(item_separator, key_separator)`; `None` gives Python's defaults:
    /// `(", ", ": ")` without indent, `(",", ": ")` with one.
    pub separators: Option<(String, String)>,
    /// Sort object keys (default false: insertion order is kept).
    pub sort_keys: bool,
}

/// `x | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`;
/// positional arguments bind in that order, as in transformers' Python function.
fn tojson_filter(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let (positional, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let arg = |pos: usize, name: &str| -> Result<Option<Value>, Error> {
        let kw: Option<Value> = kwargs.get(name)?;
        match (positional.get(pos), kw) {
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson got multiple values for argument '{name}'"),
            )),
            (Some(v), None) => Ok(Some(v.clone())),
            (None, kw) => Ok(kw),
        }
    };
    let mut opts = JsonDumpsOptions::default();
    if let Some(v) = arg(0, "ensure_ascii")? {
        opts.ensure_ascii = v.is_true();
    }
    if let Some(v) = arg(1, "indent")? {
        opts.indent = match v.kind() {
            ValueKind::None | ValueKind::Undefined => None,
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            // Python: `' ' * indent` (negative counts give "").
            ValueKind::Number if v.is_integer() => {
                Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize))
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer, a string or none",
                ))
            }
        };
    }
    if let Some(v) = arg(2, "separators")? {
        if !v.is_none() && !v.is_undefined() {
            let items: Vec<Value> = v.try_iter()?.collect();
            match items.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    opts.separators = Some((
                        a.as_str().unwrap_or_default().into(),
                        b.as_str().unwrap_or_default().into(),
                    ));
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
    }
    if let Some(v) = arg(3, "sort_keys")? {
        opts.sort_keys = v.is_true();
    }
    kwargs.assert_all_used()?;
    // Marked safe so that auto-escaping (off here anyway) could never touch it.
    Ok(Value::from_safe_string(json_dumps(value, &opts)?))
}

/// Serialises a template value exactly like Python's `json.dumps(value, **opts)`.
pub fn json_dumps(value: &Value, opts: &JsonDumpsOptions) -> Result<String, Error> {
    let (item_sep, key_sep) = match &opts.separators {
        Some((i, k)) => (i.as_str(), k.as_str()),
        None if opts.indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let mut out = String::new();
    let mut w = JsonWriter {
        opts,
        item_sep,
        key_sep,
        out: &mut out,
    };
    w.value(value, 0)?;
    Ok(out)
}

struct JsonWriter<'a> {
    opts: &'a JsonDumpsOptions,
    item_sep: &'a str,
    key_sep: &'a str,
    out: &'a mut String,
}

impl JsonWriter<'_> {
    fn newline(&mut self, level: usize) {
        if let Some(indent) = &self.opts.indent {
            self.out.push('\n');
            for _ in 0..level {
                self.out.push_str(indent);
            }
        }
    }

    fn value(&mut self, value: &Value, level: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => self.out.push_str(&value.to_string()),
            ValueKind::Number => {
                let x = f64::try_from(value.clone())?;
                // json.dumps spells non-finite floats NaN / Infinity / -Infinity.
                let s = if x.is_nan() {
                    "NaN".to_string()
                } else if x.is_infinite() {
                    if x > 0.0 {
                        "Infinity".into()
                    } else {
                        "-Infinity".into()
                    }
                } else {
                    python_float_repr(x)
                };
                self.out.push_str(&s);
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push_str(self.item_sep);
                    }
                    self.newline(level + 1);
                    self.value(item, level + 1)?;
                }
                self.newline(level);
                self.out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    keys.push((json_key(&key)?, key));
                }
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                if self.opts.sort_keys {
                    keys.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.out.push('{');
                for (i, (name, key)) in keys.iter().enumerate() {
                    if i > 0 {
                        self.out.push_str(self.item_sep);
                    }
                    self.newline(level + 1);
                    self.string(name);
                    self.out.push_str(self.key_sep);
                    self.value(&value.get_item(key)?, level + 1)?;
                }
                self.newline(level);
                self.out.push('}');
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("Object of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// JSON string with Python's escaping (`py_encode_basestring[_ascii]`).
    fn string(&mut self, s: &str) {
        let out = &mut *self.out;
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.opts.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// json.dumps converts non-string keys: ints as decimal, floats by repr,
/// True/False/None as "true"/"false"/"null"; anything else is a TypeError.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => python_float_repr(f64::try_from(key.clone())?),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("keys must be str, int, float, bool or None, not {kind}"),
            ))
        }
    })
}

// ---------------------------------------------------------------------------
// strftime like CPython's datetime.strftime
// ---------------------------------------------------------------------------

/// Conversions glibc's `strftime` knows in the C locale; anything else is copied
/// through unchanged, as glibc does (chrono knows a few more, such as `%q`, which
/// CPython on glibc would print verbatim).
const GLIBC_CONVERSIONS: &str = "aAbBcCdDeFgGhHIjklmMnpPrRStTuUVwWxXyY%";

/// `datetime.strftime(format)` of a naive local datetime, as CPython on glibc
/// prints it in the C locale.
///
/// CPython handles `%f` itself and prints nothing for `%z`/`%Z` (a naive datetime
/// has no zone); every other directive goes to glibc, which accepts the flags
/// `-` (no padding), `_` (space padding), `0` (zero padding) and `^` (upper case),
/// and ignores the `E`/`O` modifiers in the C locale.
fn python_strftime(format: &str, t: &NaiveDateTime) -> String {
    let mut out = String::with_capacity(format.len() + 16);
    let mut rest = format;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let directive = directive_len(rest);
        let (text, len) = match directive {
            Some(len) => (format_directive(&rest[..len], t), len),
            None => (None, 1),
        };
        match text {
            Some(text) => out.push_str(&text),
            None => out.push_str(&rest[..len]),
        }
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

/// Byte length of the directive at the start of `s` (which begins with `%`):
/// `%`, an optional flag, an optional `E`/`O`, one conversion character.
fn directive_len(s: &str) -> Option<usize> {
    let mut len = 1;
    let bytes = s.as_bytes();
    if matches!(bytes.get(len), Some(b'-' | b'_' | b'0' | b'^')) {
        len += 1;
    }
    if matches!(bytes.get(len), Some(b'E' | b'O')) {
        len += 1;
    }
    let c = s[len..].chars().next()?;
    Some(len + c.len_utf8())
}

/// One directive, or `None` when glibc would copy it through.
fn format_directive(directive: &str, t: &NaiveDateTime) -> Option<String> {
    let conversion = directive.chars().last()?;
    let flag = directive[1..]
        .chars()
        .next()
        .filter(|c| "-_0^".contains(*c));
    match conversion {
        'z' | 'Z' => return Some(String::new()),
        'f' => return Some(format!("{:06}", t.and_utc().timestamp_subsec_micros())),
        // glibc's mktime: the naive datetime read as local time.
        's' => {
            return chrono::Local
                .from_local_datetime(t)
                .earliest()
                .map(|d| d.timestamp().to_string())
        }
        c if !GLIBC_CONVERSIONS.contains(c) => return None,
        _ => {}
    }
    let chrono_spec = match flag {
        Some(f @ ('-' | '_' | '0')) => format!("%{f}{conversion}"),
        _ => format!("%{conversion}"),
    };
    let items: Vec<Item<'_>> = StrftimeItems::new(&chrono_spec).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return None;
    }
    let mut text = String::new();
    write!(text, "{}", t.format_with_items(items.into_iter())).ok()?;
    if flag == Some('^') {
        text = text.to_uppercase();
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, ctx: serde_json::Value) -> String {
        ChatTemplate::new(src).unwrap().render(ctx).unwrap()
    }

    fn dumps(v: serde_json::Value, opts: JsonDumpsOptions) -> String {
        json_dumps(&Value::from_serialize(&v), &opts).unwrap()
    }

    fn indent(n: usize) -> JsonDumpsOptions {
        JsonDumpsOptions {
            indent: Some(" ".repeat(n)),
            ..Default::default()
        }
    }

    // ---- tojson: expectations printed by CPython 3.11's json module ----

    #[test]
    fn tojson_default_separators_and_no_html_escaping() {
        // python3 -c 'import json; print(json.dumps({"a": [1, 2.5, None, True], "b": "<tag> & \u0027q\u0027 中文"}, ensure_ascii=False))'
        let expected = r#"{"a": [1, 2.5, null, true], "b": "<tag> & 'q' 中文"}"#;
        let v = json!({"a": [1, 2.5, null, true], "b": "<tag> & 'q' 中文"});
        assert_eq!(dumps(v.clone(), JsonDumpsOptions::default()), expected);
        assert_eq!(render("{{ x | tojson }}", json!({ "x": v })), expected);
    }

    #[test]
    fn tojson_indent_matches_python_pretty_print() {
        // python3 -c 'import json; print(json.dumps({"name": "get_weather", "parameters": {"type": "object", "properties": {}, "required": []}, "tags": ["a", {"x": 1}], "n": -0.0}, ensure_ascii=False, indent=4))'
        let expected = "{\n    \"name\": \"get_weather\",\n    \"parameters\": {\n        \"type\": \"object\",\n        \"properties\": {},\n        \"required\": []\n    },\n    \"tags\": [\n        \"a\",\n        {\n            \"x\": 1\n        }\n    ],\n    \"n\": -0.0\n}";
        let v = json!({"name": "get_weather", "parameters": {"type": "object", "properties": {}, "required": []}, "tags": ["a", {"x": 1}], "n": -0.0});
        assert_eq!(dumps(v.clone(), indent(4)), expected);
        assert_eq!(
            render("{{ x | tojson(indent=4) }}", json!({ "x": v })),
            expected
        );
    }

    #[test]
    fn tojson_indent_zero_and_string_indent() {
        // python3 -c 'import json; print(json.dumps([1, [2]], indent=0))'
        assert_eq!(dumps(json!([1, [2]]), indent(0)), "[\n1,\n[\n2\n]\n]");
        // python3 -c 'import json; print(json.dumps({"a": 1}, indent="\t"))'
        assert_eq!(
            render("{{ x | tojson(indent='\t') }}", json!({"x": {"a": 1}})),
            "{\n\t\"a\": 1\n}"
        );
    }

    #[test]
    fn tojson_escapes_like_python() {
        // python3 -c 'import json; print(json.dumps("q\"b\\s\n\r\t\b\f\x01\x7f\u2028é😀", ensure_ascii=False))'
        let s = "q\"b\\s\n\r\t\u{8}\u{c}\u{1}\u{7f}\u{2028}é😀";
        assert_eq!(
            dumps(json!(s), JsonDumpsOptions::default()),
            "\"q\\\"b\\\\s\\n\\r\\t\\b\\f\\u0001\u{7f}\u{2028}é😀\""
        );
        // python3 -c 'import json; print(json.dumps("é😀"))'   (ensure_ascii=True)
        let opts = JsonDumpsOptions {
            ensure_ascii: true,
            ..Default::default()
        };
        assert_eq!(dumps(json!("é😀"), opts), r#""\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn tojson_floats_like_python() {
        // python3 -c 'import json; print(json.dumps([1.0, 0.1, 1e16, 1e20, 1.5e-7, 0.0001, 123456789.125, 1e-5, 2.5e100, 1e15]))'
        assert_eq!(
            dumps(json!([1.0, 0.1, 1e16, 1e20, 1.5e-7, 0.0001, 123456789.125, 1e-5, 2.5e100, 1e15]), JsonDumpsOptions::default()),
            "[1.0, 0.1, 1e+16, 1e+20, 1.5e-07, 0.0001, 123456789.125, 1e-05, 2.5e+100, 1000000000000000.0]"
        );
    }

    #[test]
    fn tojson_separators_sort_keys_and_positional_args() {
        // python3 -c 'import json; print(json.dumps({"b": 1, "a": [1, 2]}, separators=(",", ":"), sort_keys=True))'
        assert_eq!(
            render(
                "{{ x | tojson(separators=(',', ':'), sort_keys=true) }}",
                json!({"x": {"b": 1, "a": [1, 2]}})
            ),
            r#"{"a":[1,2],"b":1}"#
        );
        // Positional binding follows the Python signature: tojson(x, ensure_ascii, indent, ...).
        // python3 -c 'import json; print(json.dumps({"k": "é"}, ensure_ascii=False, indent=2))'
        assert_eq!(
            render("{{ x | tojson(false, 2) }}", json!({"x": {"k": "é"}})),
            "{\n  \"k\": \"é\"\n}"
        );
        // Key order is insertion order, not sorted (preserve_order).
        assert_eq!(
            render("{{ x | tojson }}", json!({"x": {"z": 1, "a": 2}})),
            r#"{"z": 1, "a": 2}"#
        );
        assert!(ChatTemplate::new("{{ x | tojson(bogus=1) }}")
            .unwrap()
            .render(json!({"x": 1}))
            .is_err());
    }

    // ---- template globals ----

    #[test]
    fn raise_exception_carries_the_message() {
        let t = ChatTemplate::new("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}ok").unwrap();
        let err = t
            .render(json!({"messages": [{"role": "system"}]}))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate user/assistant"),
            "{err}"
        );
        assert_eq!(
            t.render(json!({"messages": [{"role": "user"}]})).unwrap(),
            "ok"
        );
    }

    #[test]
    fn strftime_now_formats_current_date() {
        let out = render("{{ strftime_now('%Y-%m-%d|%d %b %Y|%%|%Q') }}", json!({}));
        let parts: Vec<&str> = out.split('|').collect();
        assert_eq!(parts.len(), 4, "{out}");
        assert_eq!(parts[0].len(), 10);
        assert!(parts[1].ends_with(&parts[0][..4]));
        assert_eq!(parts[2], "%");
        assert_eq!(parts[3], "%Q");
    }

    /// `tests/fixtures/strftime.json` (scripts/make_strftime_fixture.py): what
    /// Python's `datetime.strftime` prints at fixed instants.
    #[test]
    fn strftime_matches_python_at_fixed_instants() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/strftime.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert!(cases.len() > 100);
        for case in cases {
            let t: NaiveDateTime = case["datetime"].as_str().unwrap().parse().unwrap();
            let format = case["format"].as_str().unwrap();
            assert_eq!(
                python_strftime(format, &t),
                case["output"].as_str().unwrap(),
                "{t} {format:?}"
            );
        }
    }

    #[test]
    fn strftime_odd_formats_do_not_panic() {
        let t: NaiveDateTime = "2024-07-26T15:04:05".parse().unwrap();
        // Python: '%', 'abc%', '%-', '%E'
        for (format, python) in [("%", "%"), ("abc%", "abc%"), ("%-", "%-"), ("%E", "%E")] {
            assert_eq!(python_strftime(format, &t), python);
        }
        assert_eq!(python_strftime("%-é%_", &t), "%-é%_");
    }

    // ---- Jinja2 semantics ----

    #[test]
    fn undefined_attributes_render_empty_and_is_defined_works() {
        // transformers' _cached_compile_jinja_template(src).render(messages=[{"role": "user"}, {"tools": []}]) == "[][]T"
        let src = "{% for item in messages %}[{{ item['metadata'] }}]{% if item['tools'] is defined %}T{% endif %}{% endfor %}";
        assert_eq!(
            render(src, json!({"messages": [{"role": "user"}, {"tools": []}]})),
            "[][]T"
        );
        // Jinja2's Undefined: reading an attribute of an undefined value is an error.
        assert!(ChatTemplate::new("{{ nothing.x.y }}")
            .unwrap()
            .render(json!({}))
            .is_err());
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        // Jinja2(trim_blocks=True, lstrip_blocks=True).from_string(src).render(xs=[1, 2]) == "a\nv1\nv2\nb"
        let src = "a\n  {% for x in xs %}\nv{{ x }}\n  {% endfor %}\nb";
        assert_eq!(render(src, json!({"xs": [1, 2]})), "a\nv1\nv2\nb");
        // A single trailing newline is dropped, as Jinja2 does by default.
        assert_eq!(render("x\n", json!({})), "x");
    }

    #[test]
    fn python_string_methods_and_loop_controls() {
        let src = "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}{{ m.content.strip().split(' ')[0].upper() }}{% if m.content.startswith(' h') %}!{% endif %};{% endfor %}";
        assert_eq!(
            render(
                src,
                json!({"messages": [{"content": " hello world "}, {"content": "bye now"}, {"content": "x"}]})
            ),
            "HELLO!;BYE;"
        );
        assert_eq!(
            render(
                "{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}",
                json!({"d": {"b": 1, "a": 2}})
            ),
            "b=1,a=2,"
        );
    }

    #[test]
    fn values_print_like_python_str() {
        // jinja2.Template("{{ a }}|{{ b }}|{{ c }}|{{ d }}|{{ e }}").render(a=[1, "x", None, True], b={"k": "it's"}, c=None, d=1e20, e=False)
        assert_eq!(
            render(
                "{{ a }}|{{ b }}|{{ c }}|{{ d }}|{{ e }}|{{ f }}",
                json!({"a": [1, "x", null, true], "b": {"k": "it's"}, "c": null, "d": 1e20, "e": false, "f": 2.5})
            ),
            "[1, 'x', None, True]|{'k': \"it's\"}|None|1e+20|False|2.5"
        );
    }

    #[test]
    fn python_float_repr_cases() {
        // python3 -c 'print([1.0, 1e16, 123.456, 5e-324, 1.7976931348623157e308, 0.001, -2.0, 9999999999999998.0])'
        let xs = [
            1.0,
            1e16,
            123.456,
            5e-324,
            1.7976931348623157e308,
            0.001,
            -2.0,
            9999999999999998.0,
        ];
        let got: Vec<String> = xs.iter().map(|&x| python_float_repr(x)).collect();
        assert_eq!(
            got.join(", "),
            "1.0, 1e+16, 123.456, 5e-324, 1.7976931348623157e+308, 0.001, -2.0, 9999999999999998.0"
        );
    }

    #[test]
    fn compile_errors_are_reported() {
        let err = ChatTemplate::new("{% for x in %}").unwrap_err();
        assert!(matches!(err, ChatTemplateError::Compile(_)));
    }
}
