//! Datasets as the tutorial uses them through 🤗 `datasets`: JSON / JSONL
//! files of records, a deterministic `train_test_split`, conversion of the
//! common instruction formats to chat conversations, tokenization with TRL's
//! rules, packing, and the (padding or padding-free) collator.

pub mod collator;
pub mod formats;
pub mod packing;
pub mod preference;
pub mod tokenize;
pub mod unpad;

pub use collator::{collate, collate_padding_free, collate_with, Batch};
pub use formats::{DatasetFormat, Example};
pub use packing::pack_examples;
pub use tokenize::{TokenizeOptions, TokenizedExample, TruncationMode};

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where a record came from, for error messages ("file.json, record 12").
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub file: PathBuf,
    /// 0-based index of the record in its file.
    pub index: usize,
    /// 1-based line for JSONL files.
    pub line: Option<usize>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {line}", self.file.display()),
            None => write!(f, "{} record {}", self.file.display(), self.index),
        }
    }
}

/// One raw record (a JSON object) and its origin.
#[derive(Debug, Clone)]
pub struct Record {
    pub value: Value,
    pub origin: Origin,
}

/// Problems with data files or records. Each names the file and the record or line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // The underlying errors below are part of the message, not `source()`:
    // printing both (as `{:#}` of anyhow does) repeated them.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// A data file that is not UTF-8 text, with where the first bad byte is.
    #[error("{path}: not UTF-8 text: invalid byte at line {line} (byte offset {offset}); convert the file to UTF-8, e.g. `iconv -f GBK -t UTF-8 FILE > FILE.utf8`")]
    NotUtf8 {
        path: String,
        line: usize,
        offset: usize,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Record { origin: Origin, message: String },
    #[error("{0}: the dataset is empty")]
    Empty(String),
    #[error("{0}")]
    Invalid(String),
    /// A record the tokenizer or chat template could not process. A template
    /// that does not compile is not the record's fault: the message then names
    /// only the template's file and line.
    #[error("{}", tokenizer_message(origin, error))]
    Tokenizer {
        origin: Origin,
        error: crate::tokenizer::TokenizerError,
    },
}

fn tokenizer_message(origin: &Origin, error: &crate::tokenizer::TokenizerError) -> String {
    match error {
        crate::tokenizer::TokenizerError::ChatTemplateAt { compile: true, .. } => error.to_string(),
        _ => format!("{origin}: {error}"),
    }
}

/// An in-memory dataset of raw records (🤗 `datasets.Dataset` for our purposes).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub records: Vec<Record>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// `load_dataset("json", data_files=[...])["train"]`: JSON arrays or JSONL,
    /// files concatenated in the given order.
    pub fn from_json_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, DataError> {
        let mut records = Vec::new();
        for path in paths {
            records.extend(read_json_file(path.as_ref())?);
        }
        let ds = Dataset { records };
        if ds.is_empty() {
            let names: Vec<String> = paths
                .iter()
                .map(|p| p.as_ref().display().to_string())
                .collect();
            return Err(DataError::Empty(names.join(", ")));
        }
        Ok(ds)
    }

    /// The first `n` records (or all of them).
    pub fn take(mut self, n: usize) -> Self {
        self.records.truncate(n);
        self
    }

    /// `Dataset.train_test_split(test_size, seed=seed)`: a float in (0, 1) is the
    /// fraction of records for the test split (rounded up, as 🤗 datasets does),
    /// a value >= 1 a record count. The split is a seeded shuffle, deterministic
    /// across runs and machines (its own RNG, not numpy's, so the exact records
    /// differ from Python's).
    pub fn train_test_split(
        &self,
        test_size: f64,
        seed: u64,
    ) -> Result<(Dataset, Dataset), DataError> {
        let n = self.len();
        let n_test = if test_size <= 0.0 {
            0
        } else if test_size < 1.0 {
            (test_size * n as f64).ceil() as usize
        } else if test_size.fract() == 0.0 {
            test_size as usize
        } else {
            return Err(DataError::Invalid(format!(
                "test_size {test_size} must be a fraction in (0, 1) or a whole count"
            )));
        };
        if n_test >= n && n_test > 0 {
            return Err(DataError::Invalid(format!(
                "test_size {test_size} leaves no training records ({n} records, {n_test} for the test split)"
            )));
        }
        let order = permutation(n, seed);
        let pick = |idx: &[usize]| Dataset {
            records: idx.iter().map(|&i| self.records[i].clone()).collect(),
        };
        Ok((pick(&order[n_test..]), pick(&order[..n_test])))
    }
}

/// A seeded permutation of `0..n` (Fisher-Yates over SplitMix64): stable across
/// platforms and crate versions, so splits and epoch orders are reproducible.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn read_json_file(path: &Path) -> Result<Vec<Record>, DataError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| DataError::Io {
        path: shown.clone(),
        error,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        DataError::NotUtf8 {
            path: shown.clone(),
            line: e.as_bytes()[..offset]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1,
            offset,
        }
    })?;
    // A UTF-8 byte order mark (Windows editors write one) is not part of the JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let json_err = |e: serde_json::Error, line_offset: usize| DataError::Json {
        path: shown.clone(),
        line: e.line() + line_offset,
        column: e.column(),
        message: e
            .to_string()
            .split(" at line")
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    let origin = |index, line| Origin {
        file: path.to_path_buf(),
        index,
        line,
    };
    let trimmed = text.trim_start();
    let mut records = Vec::new();
    if trimmed.starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(trimmed).map_err(|e| json_err(e, 0))?;
        for (index, value) in values.into_iter().enumerate() {
            records.push(Record {
                value,
                origin: origin(index, None),
            });
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line).map_err(|e| json_err(e, i))?;
            records.push(Record {
                value,
                origin: origin(records.len(), Some(i + 1)),
            });
        }
    }
    for r in &records {
        if !r.value.is_object() {
            return Err(DataError::Record {
                origin: r.origin.clone(),
                message: "is not a JSON object".into(),
            });
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("trl_like_data_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_arrays_and_jsonl_in_order() {
        let a = write("a.json", r#"[{"text": "one"}, {"text": "two"}]"#);
        let b = write("b.jsonl", "{\"text\": \"three\"}\n\n{\"text\": \"four\"}\n");
        let ds = Dataset::from_json_files(&[a, b]).unwrap();
        let texts: Vec<&str> = ds
            .records
            .iter()
            .map(|r| r.value["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["one", "two", "three", "four"]);
        assert_eq!(ds.records[3].origin.line, Some(3));
    }

    #[test]
    fn bad_jsonl_line_is_named() {
        let p = write("bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": oops}\n");
        let err = Dataset::from_json_files(&[p]).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn jsonl_with_a_byte_order_mark_reads() {
        let p = write(
            "bom.jsonl",
            "\u{feff}{\"text\": \"one\"}\n{\"text\": \"two\"}\n",
        );
        let ds = Dataset::from_json_files(&[p]).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.records[0].value["text"], "one");
    }

    #[test]
    fn non_utf8_file_names_line_and_offset() {
        let dir = std::env::temp_dir().join(format!("trl_like_data_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gbk.jsonl");
        // "{"text": "ok"}\n{"text": "<GBK bytes>"}"
        let mut bytes = b"{\"text\": \"ok\"}\n{\"text\": \"".to_vec();
        bytes.extend([0xC4, 0xE3, 0xBA, 0xC3]);
        bytes.extend(b"\"}\n");
        std::fs::write(&p, bytes).unwrap();
        let err = Dataset::from_json_files(&[p]).unwrap_err().to_string();
        assert!(
            err.contains("gbk.jsonl") && err.contains("line 2") && err.contains("byte offset 25"),
            "{err}"
        );
    }

    #[test]
    fn empty_dataset_is_an_error() {
        let p = write("empty.json", "[]");
        assert!(matches!(
            Dataset::from_json_files(&[p]),
            Err(DataError::Empty(_))
        ));
    }

    #[test]
    fn split_is_deterministic_and_sized_like_datasets() {
        let ds = Dataset {
            records: (0..100)
                .map(|i| Record {
                    value: serde_json::json!({"i": i}),
                    origin: Origin {
                        file: "x".into(),
                        index: i,
                        line: None,
                    },
                })
                .collect(),
        };
        let (train, test) = ds.train_test_split(0.05, 42).unwrap();
        assert_eq!((train.len(), test.len()), (95, 5));
        let (train2, test2) = ds.train_test_split(0.05, 42).unwrap();
        let ids = |d: &Dataset| d.records.iter().map(|r| r.origin.index).collect::<Vec<_>>();
        assert_eq!(ids(&train), ids(&train2));
        assert_eq!(ids(&test), ids(&test2));
        let mut all = [ids(&train), ids(&test)].concat();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let (_, other) = ds.train_test_split(0.05, 7).unwrap();
        assert_ne!(
            ids(&test),
            ids(&other),
            "a different seed gives a different split"
        );
        // 🤗 datasets rounds the test fraction up: ceil(0.05 * 101) = 6.
        let ds101 = Dataset {
            records: [ds.records.clone(), ds.records[..1].to_vec()].concat(),
        };
        assert_eq!(ds101.train_test_split(0.05, 1).unwrap().1.len(), 6);
    }
}
