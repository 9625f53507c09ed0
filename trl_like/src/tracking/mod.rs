//! Experiment tracking: where the trainer's logs go, in formats the Python
//! tools read.
//!
//! transformers sends every `Trainer.log` call (`on_log`) to the callbacks
//! named in `report_to`. This module is the Rust side of that: a [`Tracker`]
//! receives the same flat `key → number` maps, and [`make_trackers`] turns a
//! `report_to` list into trackers.
//!
//! | `report_to`    | writes                                                                 |
//! |----------------|------------------------------------------------------------------------|
//! | `tensorboard`  | `events.out.tfevents.*` in `logging_dir` ([`TensorBoardTracker`]), tags as transformers' `TensorBoardCallback` names them |
//! | `jsonl`        | `logging_dir/metrics.jsonl` ([`JsonlTracker`]), one JSON object per call, keys unchanged |
//! | `all`          | both                                                                   |
//! | `none` or `[]` | nothing                                                                |
//!
//! Other integrations (`swanlab`, `wandb`, …) need their Python clients; the
//! error for them says how to import the TensorBoard files instead.
//!
//! [`plot_training_curves`] draws a `log_history` (or `metrics.jsonl`) as an
//! SVG or PNG picture.

mod font;
mod jsonl;
mod plot;
mod raster;
mod scene;
mod tensorboard;

use std::path::{Path, PathBuf};

pub use jsonl::JsonlTracker;
pub use plot::{plot_training_curves, render_training_curves_png, render_training_curves_svg};
pub use tensorboard::TensorBoardTracker;

/// The integrations [`make_trackers`] knows, besides `all` and `none`.
pub const AVAILABLE_INTEGRATIONS: &[&str] = &["tensorboard", "jsonl"];

/// A sink for scalar logs, like transformers' integration callbacks
/// (`TensorBoardCallback` etc.).
pub trait Tracker: Send {
    /// `logs` are flat key → number maps as in transformers' `on_log`, e.g.
    /// `{"loss": 1.2, "learning_rate": 5e-4, "epoch": 0.1}` or
    /// `{"eval_loss": …}`; `step` is the optimizer step (`state.global_step`).
    fn log_scalars(&mut self, step: u64, logs: &[(String, f64)]) -> std::io::Result<()>;
    /// Free-form text (e.g. the prediction callback's generated answers).
    fn log_text(&mut self, step: u64, tag: &str, text: &str) -> std::io::Result<()>;
    /// Pushes buffered records to disk.
    fn flush(&mut self) -> std::io::Result<()>;
}

/// Errors from [`make_trackers`].
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// A `report_to` name this port has no tracker for.
    #[error(
        "report_to names \"{name}\", which this trainer cannot log to: it writes \"tensorboard\" \
         (event files in the logging dir) and \"jsonl\" (logging_dir/metrics.jsonl); \"all\" means both \
         and \"none\" neither. Other trackers have no Rust client here, but SwanLab (like W&B) \
         imports TensorBoard event files: train with report_to tensorboard, then for SwanLab run \
         `swanlab login` once and `swanlab convert -t tensorboard --tb-log-dir {dir} --tb-types scalar,text` \
         (swanlab releases before the flag was renamed spell it --tb_logdir; see `swanlab convert --help`)",
        dir = .logging_dir.display()
    )]
    UnknownIntegration {
        /// The name as given.
        name: String,
        /// Where the TensorBoard files would go, for the import command.
        logging_dir: PathBuf,
    },
    /// `none` together with other names, which transformers also rejects.
    #[error("report_to cannot combine \"none\" with other integrations ({0})")]
    NoneWithOthers(String),
    /// A tracker's file could not be created.
    #[error("cannot create the {integration} log in {}: {error}", .dir.display())]
    Io {
        integration: &'static str,
        dir: PathBuf,
        error: std::io::Error,
    },
}

/// Builds the trackers that `report_to` names, writing into `logging_dir`
/// (transformers' default is `output_dir/runs/<date>_<hostname>`; the caller
/// picks it). Names are matched case-insensitively; `"none"` or an empty list
/// gives no trackers, `"all"` gives every available one, duplicates collapse.
///
/// A non-empty `run_name` is recorded once at step 0 as a text entry tagged
/// `run_name`, so that runs in one TensorBoard or one jsonl file can be told
/// apart.
pub fn make_trackers(
    report_to: &[String],
    logging_dir: &Path,
    run_name: &str,
) -> Result<Vec<Box<dyn Tracker>>, TrackingError> {
    let mut wanted: Vec<&'static str> = Vec::new();
    let names: Vec<String> = report_to
        .iter()
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    if names.iter().any(|n| n == "none") {
        if names.iter().all(|n| n == "none") {
            return Ok(Vec::new());
        }
        return Err(TrackingError::NoneWithOthers(report_to.join(", ")));
    }
    for (name, original) in names.iter().zip(report_to) {
        let integrations: &[&'static str] = match name.as_str() {
            "all" => AVAILABLE_INTEGRATIONS,
            "tensorboard" => &["tensorboard"],
            "jsonl" => &["jsonl"],
            _ => {
                return Err(TrackingError::UnknownIntegration {
                    name: original.clone(),
                    logging_dir: logging_dir.to_path_buf(),
                })
            }
        };
        for i in integrations {
            if !wanted.contains(i) {
                wanted.push(i);
            }
        }
    }

    let mut trackers: Vec<Box<dyn Tracker>> = Vec::with_capacity(wanted.len());
    for integration in wanted {
        let io_err = |source| TrackingError::Io {
            integration,
            dir: logging_dir.to_path_buf(),
            error: source,
        };
        let mut tracker: Box<dyn Tracker> = match integration {
            "tensorboard" => Box::new(TensorBoardTracker::new(logging_dir).map_err(io_err)?),
            "jsonl" => Box::new(JsonlTracker::new(logging_dir).map_err(io_err)?),
            _ => unreachable!("every name in AVAILABLE_INTEGRATIONS has a tracker"),
        };
        if !run_name.is_empty() {
            tracker.log_text(0, "run_name", run_name).map_err(io_err)?;
        }
        trackers.push(tracker);
    }
    Ok(trackers)
}

/// The TensorBoard tag transformers gives a log key (`rewrite_logs` in
/// `transformers/integrations/integration_utils.py`): `eval_*` → `eval/*`,
/// `test_*` → `test/*`, everything else → `train/*`. So `loss` is
/// `train/loss`, `eval_loss` is `eval/loss`, and `epoch` is `train/epoch` even
/// in an evaluation log.
pub fn tensorboard_tag(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("eval_") {
        format!("eval/{rest}")
    } else if let Some(rest) = key.strip_prefix("test_") {
        format!("test/{rest}")
    } else {
        format!("train/{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_transformers_rewrite_logs() {
        assert_eq!(tensorboard_tag("loss"), "train/loss");
        assert_eq!(tensorboard_tag("learning_rate"), "train/learning_rate");
        assert_eq!(tensorboard_tag("eval_loss"), "eval/loss");
        assert_eq!(tensorboard_tag("eval_runtime"), "eval/runtime");
        assert_eq!(tensorboard_tag("test_loss"), "test/loss");
        assert_eq!(tensorboard_tag("epoch"), "train/epoch");
    }
}
