//! Why training could not start or continue.

use std::path::Path;

/// Why training could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Peft(#[from] crate::peft::PeftError),
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    #[error(transparent)]
    Zero(#[from] crate::optim::ZeroError),
    #[error(transparent)]
    DeepSpeed(#[from] crate::config::DeepSpeedError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tracking(#[from] crate::tracking::TrackingError),
    #[error(transparent)]
    Distributed(#[from] crate::distributed::DistError),
    #[error(transparent)]
    OutputDir(#[from] super::output_dir::OutputDirError),
    #[error("{0}")]
    Checkpoint(String),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// Maps an I/O error on `path` to [`TrainerError::Io`].
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.display().to_string(),
        error: source,
    }
}
