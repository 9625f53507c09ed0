//! `TrainerState` and `TrainerControl` as transformers defines them; the state
//! is written to `trainer_state.json` with transformers' field names, so the
//! Python tooling (and people used to it) can read our checkpoints.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// Errors from [`TrainerState::load_from_json`].
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a trainer_state.json: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Progress of a training run (transformers' `TrainerState`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Fractional epoch reached (e.g. 1.5 = half-way through the second epoch).
    pub epoch: Option<f64>,
    /// Optimizer steps done.
    pub global_step: usize,
    pub max_steps: usize,
    pub logging_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub train_batch_size: usize,
    pub num_train_epochs: usize,
    /// Tokens (attention-mask ones) fed to the model so far.
    pub num_input_tokens_seen: i64,
    pub total_flos: f64,
    /// Every log and evaluation entry, in order.
    pub log_history: Vec<Map<String, Value>>,
    pub best_metric: Option<f64>,
    pub best_global_step: Option<usize>,
    pub best_model_checkpoint: Option<String>,
    pub is_local_process_zero: bool,
    pub is_world_process_zero: bool,
    pub is_hyper_param_search: bool,
    pub trial_name: Option<String>,
    pub trial_params: Option<Value>,
    #[serde(default)]
    pub stateful_callbacks: Map<String, Value>,
}

impl Default for TrainerState {
    fn default() -> Self {
        Self {
            epoch: Some(0.0),
            global_step: 0,
            max_steps: 0,
            logging_steps: 500,
            eval_steps: 500,
            save_steps: 500,
            train_batch_size: 8,
            num_train_epochs: 0,
            num_input_tokens_seen: 0,
            total_flos: 0.0,
            log_history: Vec::new(),
            best_metric: None,
            best_global_step: None,
            best_model_checkpoint: None,
            is_local_process_zero: true,
            is_world_process_zero: true,
            is_hyper_param_search: false,
            trial_name: None,
            trial_params: None,
            stateful_callbacks: Map::new(),
        }
    }
}

impl TrainerState {
    /// Writes `trainer_state.json` (pretty, sorted like Python's `json.dumps(indent=2, sort_keys=True)`).
    pub fn save_to_json(&self, path: &Path, control: &TrainerControl) -> std::io::Result<()> {
        let mut state = self.clone();
        state.stateful_callbacks.insert(
            "TrainerControl".into(),
            json!({"args": control.as_json(), "attributes": {}}),
        );
        let value = sort_keys(serde_json::to_value(&state).expect("state serialises"));
        let text = serde_json::to_string_pretty(&value).expect("json") + "\n";
        crate::fsutil::write_atomic(path, text.as_bytes())
    }

    pub fn load_from_json(path: &Path) -> Result<Self, StateFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| StateFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| StateFileError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Recursively sorts object keys (transformers writes trainer_state.json with sort_keys=True).
fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// What the training loop should do next; callbacks set these flags
/// (transformers' `TrainerControl`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainerControl {
    pub should_training_stop: bool,
    pub should_epoch_stop: bool,
    pub should_save: bool,
    pub should_evaluate: bool,
    pub should_log: bool,
}

impl TrainerControl {
    fn as_json(&self) -> Value {
        json!({
            "should_epoch_stop": self.should_epoch_stop,
            "should_evaluate": self.should_evaluate,
            "should_log": self.should_log,
            "should_save": self.should_save,
            "should_training_stop": self.should_training_stop,
        })
    }
}
