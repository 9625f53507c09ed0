//! `metrics.jsonl`: one JSON object per log call, keys as the trainer logs
//! them, readable with `pandas.read_json(path, lines=True)` or `jq`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::Tracker;

/// Appends to `logging_dir/metrics.jsonl`.
///
/// Scalars become `{"step": N, "loss": 1.2, "learning_rate": 0.0005, …}`, keys
/// unchanged (the same names as `trainer_state.json`'s `log_history`, so the
/// file's scalar lines can be fed to [`super::plot_training_curves`]); text
/// becomes `{"step": N, "tag": "…", "text": "…"}`. Non-finite numbers (a NaN
/// loss) are written as `null`, since JSON has no NaN. The file is opened for
/// appending, so a resumed run continues the same file; each line is flushed
/// as it is written.
pub struct JsonlTracker {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlTracker {
    /// The file name inside the logging directory.
    pub const FILE_NAME: &'static str = "metrics.jsonl";

    /// Creates `logging_dir` if needed and opens `metrics.jsonl` for appending.
    pub fn new(logging_dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(logging_dir)?;
        let path = logging_dir.join(Self::FILE_NAME);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(JsonlTracker {
            path,
            out: BufWriter::new(file),
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_line(&mut self, record: Map<String, Value>) -> io::Result<()> {
        let line = serde_json::to_string(&Value::Object(record)).map_err(io::Error::other)?;
        // One write per line, so a reader never sees half a record from a buffer boundary.
        self.out.write_all(format!("{line}\n").as_bytes())?;
        self.out.flush()
    }
}

impl Tracker for JsonlTracker {
    fn log_scalars(&mut self, step: u64, logs: &[(String, f64)]) -> io::Result<()> {
        let mut record = Map::with_capacity(logs.len() + 1);
        record.insert("step".into(), step.into());
        for (key, value) in logs {
            if key == "step" {
                continue; // the step argument is authoritative
            }
            // `from_f64` is None for NaN/±inf, which JSON cannot hold.
            let v = serde_json::Number::from_f64(*value).map_or(Value::Null, Value::Number);
            record.insert(key.clone(), v);
        }
        self.write_line(record)
    }

    fn log_text(&mut self, step: u64, tag: &str, text: &str) -> io::Result<()> {
        let mut record = Map::with_capacity(3);
        record.insert("step".into(), step.into());
        record.insert("tag".into(), tag.into());
        record.insert("text".into(), text.into());
        self.write_line(record)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}
