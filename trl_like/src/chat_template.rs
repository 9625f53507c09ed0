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
use std::time::{SystemTime, UNIX_EPOCH};

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
fn strftime_now(format: String) -> Result<String, Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "system clock is before 1970"))?
        .as_secs() as i64;
    let zone = local_zone_at(now);
    Ok(strftime(format.as_str(), now + zone.offset_s, &zone))
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
// strftime over std time
// ---------------------------------------------------------------------------

/// The local UTC offset and zone abbreviation at some instant.
#[derive(Debug, Clone, PartialEq)]
struct Zone {
    offset_s: i64,
    abbrev: String,
}

impl Zone {
    fn utc() -> Self {
        Zone {
            offset_s: 0,
            abbrev: "UTC".into(),
        }
    }
}

/// Local time zone at unix time `t`, from `$TZ` (a zoneinfo name or path) or
/// `/etc/localtime`. Falls back to UTC when no TZif file can be read (e.g. a
/// POSIX-rule `TZ` string). After the file's last transition the last listed
/// offset is used (the footer's DST rule is not evaluated).
fn local_zone_at(t: i64) -> Zone {
    let path = match std::env::var("TZ") {
        Ok(tz) if tz.is_empty() => return Zone::utc(),
        Ok(tz) => {
            let tz = tz.strip_prefix(':').unwrap_or(&tz).to_string();
            if tz.starts_with('/') {
                tz
            } else {
                format!("/usr/share/zoneinfo/{tz}")
            }
        }
        Err(_) => "/etc/localtime".to_string(),
    };
    std::fs::read(path)
        .ok()
        .and_then(|bytes| parse_tzif(&bytes, t))
        .unwrap_or_else(Zone::utc)
}

/// Minimal TZif (RFC 8536) reader: the offset in effect at unix time `t`.
fn parse_tzif(b: &[u8], t: i64) -> Option<Zone> {
    fn be32(b: &[u8], at: usize) -> Option<i64> {
        Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as i64)
    }
    fn be64(b: &[u8], at: usize) -> Option<i64> {
        Some(i64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
    }
    struct Header {
        isutcnt: usize,
        isstdcnt: usize,
        leapcnt: usize,
        timecnt: usize,
        typecnt: usize,
        charcnt: usize,
    }
    let header = |at: usize| -> Option<Header> {
        if b.get(at..at + 4)? != b"TZif" {
            return None;
        }
        let c = |i: usize| be32(b, at + 20 + 4 * i).map(|v| v as usize);
        Some(Header {
            isutcnt: c(0)?,
            isstdcnt: c(1)?,
            leapcnt: c(2)?,
            timecnt: c(3)?,
            typecnt: c(4)?,
            charcnt: c(5)?,
        })
    };
    let h1 = header(0)?;
    let version = *b.get(4)?;
    // Version 2+ files repeat the data with 64-bit times after the v1 block.
    let (h, start, tsize) = if version >= b'2' {
        let v1_len = h1.timecnt * 5
            + h1.typecnt * 6
            + h1.charcnt
            + h1.leapcnt * 8
            + h1.isstdcnt
            + h1.isutcnt;
        let at = 44 + v1_len;
        (header(at)?, at + 44, 8)
    } else {
        (h1, 44, 4)
    };
    if h.typecnt == 0 {
        return None;
    }
    let times_at = start;
    let idx_at = times_at + h.timecnt * tsize;
    let types_at = idx_at + h.timecnt;
    let chars_at = types_at + h.typecnt * 6;
    let mut type_idx = 0usize;
    for i in 0..h.timecnt {
        let tt = if tsize == 8 {
            be64(b, times_at + 8 * i)?
        } else {
            be32(b, times_at + 4 * i)?
        };
        if tt > t {
            break;
        }
        type_idx = *b.get(idx_at + i)? as usize;
    }
    if type_idx >= h.typecnt {
        return None;
    }
    let rec = types_at + 6 * type_idx;
    let offset_s = be32(b, rec)?;
    let abbr_i = *b.get(rec + 5)? as usize;
    let chars = b.get(chars_at..chars_at + h.charcnt)?;
    let abbrev = chars
        .get(abbr_i..)
        .and_then(|s| s.split(|&c| c == 0).next())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    Some(Zone { offset_s, abbrev })
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// C-locale `strftime` of local seconds `local` (unix time shifted by the zone offset).
///
/// Supports %Y %y %C %m %d %e %H %I %M %S %p %B %b %h %A %a %j %w %u %F %T %D %R
/// %z %Z %s %n %t %% and glibc's `%-X` (no padding) flag. Unknown specifiers are
/// copied through unchanged, as glibc does.
fn strftime(format: &str, local: i64, zone: &Zone) -> String {
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let s = match spec {
            'Y' => year.to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'C' => num(year.div_euclid(100), 2),
            'm' => num(month as i64, 2),
            'd' => num(day as i64, 2),
            'e' => {
                if no_pad {
                    day.to_string()
                } else {
                    format!("{day:>2}")
                }
            }
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'M' => num(minute, 2),
            'S' => num(second, 2),
            'j' => num(yday, 3),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'B' => MONTHS[month as usize - 1].to_string(),
            'b' | 'h' => MONTHS[month as usize - 1][..3].to_string(),
            'A' => WEEKDAYS[weekday].to_string(),
            'a' => WEEKDAYS[weekday][..3].to_string(),
            'w' => weekday.to_string(),
            'u' => (if weekday == 0 { 7 } else { weekday }).to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            'R' => format!("{hour:02}:{minute:02}"),
            'D' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'z' => {
                let o = zone.offset_s;
                let sign = if o < 0 { '-' } else { '+' };
                format!("{sign}{:02}{:02}", o.abs() / 3600, (o.abs() / 60) % 60)
            }
            'Z' => zone.abbrev.clone(),
            's' => (local - zone.offset_s).to_string(),
            'n' => "\n".to_string(),
            't' => "\t".to_string(),
            '%' => "%".to_string(),
            other => {
                if no_pad {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&s);
    }
    out
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

    #[test]
    fn strftime_known_instant() {
        // python3 -c 'import datetime; print(datetime.datetime(2024, 7, 26, 15, 4, 5).strftime("%Y %y %m %d %H %I %M %S %p %B %b %A %a %j %-d %e %F %T %%"))'
        let t = days_from_civil(2024, 7, 26) * 86_400 + 15 * 3600 + 4 * 60 + 5;
        assert_eq!(
            strftime(
                "%Y %y %m %d %H %I %M %S %p %B %b %A %a %j %-d %e %F %T %%",
                t,
                &Zone::utc()
            ),
            "2024 24 07 26 15 03 04 05 PM July Jul Friday Fri 208 26 26 2024-07-26 15:04:05 %"
        );
        // python3 -c 'import datetime; print(datetime.datetime(2000, 1, 1, 0, 30).strftime("%I %p %j %a %w"))'
        let t = days_from_civil(2000, 1, 1) * 86_400 + 30 * 60;
        assert_eq!(
            strftime("%I %p %j %a %w", t, &Zone::utc()),
            "12 AM 001 Sat 6"
        );
        assert_eq!(
            civil_from_days(days_from_civil(1969, 12, 31)),
            (1969, 12, 31)
        );
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
