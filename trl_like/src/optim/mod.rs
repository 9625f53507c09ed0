//! Optimisation building blocks mirroring PyTorch and transformers.
//!
//! * [`AdamW`] mirrors `torch.optim.AdamW` (single-tensor path, `amsgrad=False`,
//!   `maximize=False`) over plain tch tensors, with a readable and
//!   checkpointable state (tch's own `nn::AdamW` state cannot be read);
//! * [`clip_grad_norm`] mirrors `torch.nn.utils.clip_grad_norm_`;
//! * [`decay_groups`] mirrors `Trainer.get_decay_parameter_names` and the two
//!   parameter groups of `Trainer.create_optimizer`;
//! * [`ZeroOptimizer`] is DeepSpeed's ZeRO-1/2 with fp32 master weights over
//!   the c10d process group, and [`TrainOptimizer`] picks it or [`AdamW`];
//! * [`LrScheduler`] gives the `LambdaLR` schedules of transformers'
//!   `optimization.py` (`get_scheduler`) as a pure function of the step.

mod adamw;
mod scheduler;
mod zero;

pub use adamw::{applies_weight_decay, clip_grad_norm, decay_groups, AdamW, ParamGroup};
pub use scheduler::{LrScheduler, SCHEDULER_NAMES};
pub use zero::{
    shard_file_name, zero_state_bytes, TrainOptimizer, ZeroError, ZeroOptimizer, ZERO_LAYOUT_FILE,
};

/// Errors of the optimiser, its state files and the learning-rate schedulers.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// The scheduler name is not one transformers' `get_scheduler` knows, or
    /// is one that this crate cannot express as a function of the step.
    #[error("unknown lr scheduler `{name}` (supported: {})", SCHEDULER_NAMES.join(", "))]
    UnknownScheduler {
        /// The name that was asked for.
        name: String,
    },
    /// A `lr_scheduler_kwargs` entry is unknown, has the wrong type or an
    /// invalid value (transformers raises `TypeError`/`ValueError` there).
    #[error("lr scheduler `{scheduler}`: {message}")]
    SchedulerKwargs {
        /// The scheduler being built.
        scheduler: String,
        /// What is wrong, naming the keyword.
        message: String,
    },
    /// A hyper-parameter torch's `Adam.__init__` rejects (the message is torch's).
    #[error("{0}")]
    InvalidHyperparameter(String),
    /// Two parameters share a name, so their optimiser state could not be
    /// saved and restored unambiguously.
    #[error("duplicate parameter name `{0}` in the optimizer's parameter groups")]
    DuplicateParam(String),
    /// A state entry (`<param>.exp_avg`, `.exp_avg_sq` or `.step`) is missing.
    #[error("optimizer state has no entry `{0}` (the state was saved for other parameters?)")]
    MissingState(String),
    /// A state entry names no parameter of this optimiser, or has an unknown suffix.
    #[error("optimizer state entry `{0}` does not belong to any parameter of this optimizer")]
    UnexpectedState(String),
    /// A state tensor does not fit its parameter.
    #[error("optimizer state entry `{name}`: {message}")]
    BadState {
        /// The state entry.
        name: String,
        /// What does not fit (shape, step value, ...).
        message: String,
    },
    /// Reading or writing a state file failed.
    #[error("optimizer state file {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// The underlying tch/safetensors error.
        error: tch::TchError,
    },
    /// Any other libtorch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
