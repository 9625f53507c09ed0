//! Checkpoints: `output_dir/checkpoint-{step}/` with the adapter (or full
//! weights), optimizer state, `trainer_state.json`, loop counters and the
//! tokenizer. Each is written under a temporary name and renamed when
//! complete, so a crash never leaves a half checkpoint that looks finished.

use super::output_dir::RunRecord;
use super::step::LoopState;
use super::{io_err, Trainer, TrainerError, TrainingHooks};
use crate::config::{ResumeFrom, TrainingArguments};
use crate::fsutil::write_atomic;
use crate::modeling::PreTrainedModel;
use crate::optim::{TrainOptimizer, ZeroOptimizer, ZERO_LAYOUT_FILE};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const PREFIX: &str = "checkpoint-";
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const LOOP_FILE: &str = "trainer_extra.json";
const ARGS_FILE: &str = "training_args.json";
const FULL_WEIGHTS_DIR: &str = ".";

/// Why a checkpoint without its optimizer state cannot be resumed: written
/// with `save_only_model` (its `training_args.json` says so), or damaged.
fn missing_optimizer_message(dir: &Path) -> String {
    let save_only_model = std::fs::read_to_string(dir.join(ARGS_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|args| args.get("save_only_model").and_then(Value::as_bool))
        .unwrap_or(false);
    if save_only_model {
        "holds only model weights (written with save_only_model), so training cannot resume from it; \
         start over with --overwrite_output_dir, or resume from a checkpoint saved without save_only_model"
            .into()
    } else {
        format!(
            "{OPTIMIZER_FILE} is missing, so training cannot resume from this checkpoint; \
             restore the file, remove the checkpoint to resume from an earlier one, or start over with --overwrite_output_dir"
        )
    }
}

/// Complete checkpoints in `output_dir`, oldest first (by step).
pub fn list_checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(PREFIX)?.parse().ok()?;
            let path = e.path();
            path.join(STATE_FILE).is_file().then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// What to resume from: `resume_from_checkpoint`, or — like the tutorial's
/// script — the newest checkpoint of a non-empty `output_dir` unless
/// `overwrite_output_dir`. A non-empty `output_dir` without checkpoints is an
/// error (it would be overwritten), as transformers' examples treat it.
pub fn resolve_resume(
    args: &TrainingArguments,
    output_dir: &Path,
) -> Result<Option<PathBuf>, TrainerError> {
    match args.resume_from() {
        Some(ResumeFrom::Path(p)) => {
            if !p.join(STATE_FILE).is_file() {
                return Err(TrainerError::Checkpoint(format!(
                    "resume_from_checkpoint {}: not a checkpoint directory (no {STATE_FILE})",
                    p.display()
                )));
            }
            return Ok(Some(p));
        }
        Some(ResumeFrom::Latest) => {
            return match list_checkpoints(output_dir).pop() {
                Some((_, p)) => Ok(Some(p)),
                None => Err(TrainerError::Checkpoint(format!(
                    "resume_from_checkpoint true: no checkpoint-* directory in {}",
                    output_dir.display()
                ))),
            };
        }
        None => {}
    }
    if args.overwrite_output_dir || !output_dir.is_dir() {
        return Ok(None);
    }
    if let Some((_, p)) = list_checkpoints(output_dir).pop() {
        log::info!("found checkpoint {} in output_dir; resuming (pass --overwrite_output_dir to start over)", p.display());
        return Ok(Some(p));
    }
    if !super::output_dir::is_empty(output_dir) {
        return Err(TrainerError::Checkpoint(format!(
            "output_dir {} already exists and is not empty, but holds no checkpoint to resume from; \
             use --overwrite_output_dir to train into it anyway, or choose another --output_dir",
            output_dir.display()
        )));
    }
    Ok(None)
}

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// Writes `checkpoint-{global_step}` and rotates old ones (transformers' `_save_checkpoint`).
    pub(super) fn save_checkpoint(
        &mut self,
        output_dir: &Path,
        optimizer: &TrainOptimizer,
        metrics: Option<&Map<String, Value>>,
    ) -> Result<(), TrainerError> {
        let step = self.state.global_step;
        let name = format!("{PREFIX}{step}");
        let final_dir = output_dir.join(&name);
        self.update_best(metrics, &final_dir);
        if self.writes_optimizer_state() {
            self.stage_zero_shards(output_dir, &name, optimizer)?;
        }
        if self.is_world_process_zero() {
            self.write_checkpoint(output_dir, &name, optimizer)?;
        }
        // The other ranks go on only once the checkpoint is complete (they may read it:
        // load_best_model_at_end). If rank 0 failed to write, it has left and this errs.
        self.barrier()?;
        self.fire(super::Event::Save, super::Payload::Checkpoint(&final_dir));
        self.control.should_save = false;
        Ok(())
    }

    /// Rank 0's part of a checkpoint: the files, atomically renamed into place, then rotation.
    fn write_checkpoint(
        &mut self,
        output_dir: &Path,
        name: &str,
        optimizer: &TrainOptimizer,
    ) -> Result<(), TrainerError> {
        let step = self.state.global_step;
        let final_dir = output_dir.join(name);
        let tmp_dir = output_dir.join(format!(".{name}.partial"));
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        }
        std::fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        self.save_model(Some(&tmp_dir))?;
        // An interrupt's checkpoint is the one the rerun resumes from: it always
        // holds the optimizer and loop state, even under save_only_model.
        if self.writes_optimizer_state() {
            match optimizer {
                TrainOptimizer::Plain(o) => o.save(&tmp_dir.join(OPTIMIZER_FILE))?,
                TrainOptimizer::Zero(z) => Self::move_zero_shards(output_dir, name, z, &tmp_dir)?,
            }
            let extra = serde_json::to_string_pretty(&self.loop_state).expect("json");
            let path = tmp_dir.join(LOOP_FILE);
            write_atomic(&path, extra.as_bytes()).map_err(io_err(&path))?;
        }
        super::fault::crash_point("TRL_LIKE_CRASH_DURING_SAVE", step);
        let args = serde_json::to_string_pretty(&self.args).expect("json");
        let path = tmp_dir.join(ARGS_FILE);
        write_atomic(&path, args.as_bytes()).map_err(io_err(&path))?;
        if let Some(record) = &self.run_record {
            let path = tmp_dir.join(super::output_dir::RECORD_FILE);
            record.save(&tmp_dir).map_err(io_err(&path))?;
        }
        // The state file goes last: its presence marks a complete checkpoint.
        self.state
            .save_to_json(&tmp_dir.join(STATE_FILE), &self.control)
            .map_err(io_err(&tmp_dir))?;
        // Every file on disk before the folder gets its final name (power loss).
        crate::fsutil::sync_tree(&tmp_dir).map_err(io_err(&tmp_dir))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        std::fs::rename(&tmp_dir, &final_dir).map_err(io_err(&final_dir))?;
        self.rotate_checkpoints(output_dir)
    }

    /// Whether checkpoints hold the optimizer and loop state.
    fn writes_optimizer_state(&self) -> bool {
        !self.args.save_only_model || self.interrupted_at.is_some()
    }

    /// Tracks `metric_for_best_model` (transformers' `_determine_best_metric`).
    fn update_best(&mut self, metrics: Option<&Map<String, Value>>, checkpoint: &Path) {
        let (Some(metrics), Some(metric)) = (metrics, self.args.resolved_metric_for_best_model())
        else {
            return;
        };
        let key = if metric.starts_with("eval_") {
            metric
        } else {
            format!("eval_{metric}")
        };
        let Some(value) = metrics.get(&key).and_then(Value::as_f64) else {
            log::warn!("metric_for_best_model {key} is not among the evaluation metrics");
            return;
        };
        if !value.is_finite() {
            return;
        }
        let greater = self.args.resolved_greater_is_better().unwrap_or(false);
        let better = match self.state.best_metric {
            None => true,
            Some(best) => {
                if greater {
                    value > best
                } else {
                    value < best
                }
            }
        };
        if better {
            self.state.best_metric = Some(value);
            self.state.best_global_step = Some(self.state.global_step);
            self.state.best_model_checkpoint = Some(checkpoint.display().to_string());
        }
    }

    /// Deletes the oldest checkpoints beyond `save_total_limit`, never the best one.
    fn rotate_checkpoints(&self, output_dir: &Path) -> Result<(), TrainerError> {
        let Some(limit) = self.args.save_total_limit else {
            return Ok(());
        };
        let mut all = list_checkpoints(output_dir);
        let best = self.state.best_model_checkpoint.as_ref().map(PathBuf::from);
        // transformers keeps the best by moving it to the end of the deletion order.
        if let Some(best) = &best {
            if let Some(i) = all.iter().position(|(_, p)| p == best) {
                let b = all.remove(i);
                all.push(b);
            }
        }
        // With a limit of 1 and a best checkpoint that is not the newest, keep both.
        let keep = if limit == 1
            && best.is_some()
            && all
                .last()
                .map(|(_, p)| Some(p) != best.as_ref())
                .unwrap_or(false)
        {
            2
        } else {
            limit.max(1)
        };
        let excess = all.len().saturating_sub(keep);
        for (_, path) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Copies the trained weights (adapter, or full model) of checkpoint `dir` into the parameters.
    pub(super) fn load_weights(&mut self, dir: &Path) -> Result<(), TrainerError> {
        let ckpt = |m: String| TrainerError::Checkpoint(format!("{}: {m}", dir.display()));
        let files: Vec<PathBuf> = match &self.peft {
            Some(_) => vec![dir.join("adapter_model.safetensors")],
            None => {
                let index = dir
                    .join(FULL_WEIGHTS_DIR)
                    .join("model.safetensors.index.json");
                if index.is_file() {
                    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
                        .map_err(io_err(dir))?
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                        .collect();
                    shards.sort();
                    shards
                } else {
                    vec![dir.join(FULL_WEIGHTS_DIR).join("model.safetensors")]
                }
            }
        };
        let mut by_name = std::collections::HashMap::new();
        for f in &files {
            let tensors = tch::Tensor::read_safetensors(f)
                .map_err(|e| ckpt(format!("cannot read {}: {e}", f.display())))?;
            by_name.extend(tensors);
        }
        tch::no_grad(|| -> Result<(), TrainerError> {
            for (name, param) in &self.params {
                let src = by_name
                    .get(name)
                    .ok_or_else(|| ckpt(format!("tensor {name} is missing")))?;
                if src.size() != param.size() {
                    return Err(ckpt(format!(
                        "tensor {name} has shape {:?}, expected {:?}",
                        src.size(),
                        param.size()
                    )));
                }
                let mut p = param.shallow_clone();
                p.copy_(src);
            }
            Ok(())
        })
    }

    /// Restores weights, optimizer, state and loop counters from `dir`.
    pub(super) fn load_checkpoint(
        &mut self,
        dir: &Path,
        optimizer: &mut TrainOptimizer,
    ) -> Result<(), TrainerError> {
        let ckpt = |m: String| TrainerError::Checkpoint(format!("{}: {m}", dir.display()));
        let state = super::TrainerState::load_from_json(&dir.join(STATE_FILE))
            .map_err(|e| TrainerError::Checkpoint(e.to_string()))?;
        if let Some(now) = &self.run_record {
            let messages = super::output_dir::check_resume(dir, &self.args, now)?;
            if self.is_world_process_zero() {
                messages.iter().for_each(|m| log::info!("{m}"));
            }
        }
        let (plain, zero) = (
            dir.join(OPTIMIZER_FILE).is_file(),
            dir.join(ZERO_LAYOUT_FILE).is_file(),
        );
        if !plain && !zero {
            return Err(ckpt(missing_optimizer_message(dir)));
        }
        self.load_weights(dir)?;
        match optimizer {
            TrainOptimizer::Plain(o) if !plain => {
                log::info!(
                    "{}: continuing a ZeRO optimizer state without --deepspeed (shards gathered)",
                    dir.display()
                );
                o.load_state_dict(ZeroOptimizer::plain_state_dict(dir, &self.params)?)?
            }
            TrainOptimizer::Plain(o) => o.load(&dir.join(OPTIMIZER_FILE))?,
            TrainOptimizer::Zero(z) if !zero => {
                log::info!("{}: continuing a plain AdamW state under --deepspeed (moments sharded, masters from the weights)", dir.display());
                z.load_plain(&dir.join(OPTIMIZER_FILE))?
            }
            TrainOptimizer::Zero(z) => z.load(dir)?,
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(LOOP_FILE)) {
            self.loop_state = serde_json::from_str::<LoopState>(&text)
                .map_err(|e| ckpt(format!("{LOOP_FILE}: {e}")))?;
            self.loop_state.window.upgrade_legacy_names();
        } else {
            self.loop_state.last_logged_step = state.global_step;
        }
        // Keep this run's step arithmetic; take progress and history from the checkpoint.
        self.state.global_step = state.global_step;
        self.state.epoch = state.epoch;
        self.state.num_input_tokens_seen = state.num_input_tokens_seen;
        self.state.log_history = state.log_history;
        self.state.best_metric = state.best_metric;
        self.state.best_global_step = state.best_global_step;
        self.state.best_model_checkpoint = state.best_model_checkpoint;
        self.state.total_flos = state.total_flos;
        Ok(())
    }
}

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// What this run's checkpoints record for [`super::output_dir::check_resume`].
    /// Taken before a checkpoint's weights are loaded, so that a full
    /// fine-tune's base weights are the base model's, not the trained ones.
    pub(super) fn make_run_record(&self) -> RunRecord {
        let trained = match &self.peft {
            None => "every weight (full fine-tuning)".to_string(),
            Some(adapter) => {
                let c = &adapter.config;
                let targets = serde_json::to_string(&c.target_modules).unwrap_or_default();
                format!(
                    "LoRA adapters (r {}, lora_alpha {}, target_modules {targets}, use_rslora {}, use_dora {})",
                    c.r, c.lora_alpha, c.use_rslora, c.use_dora
                )
            }
        };
        RunRecord::new(
            &self.args,
            self.rank_and_world_size().1,
            (
                self.train_dataset.len(),
                self.hooks.fingerprint(&self.train_dataset),
            ),
            self.model.name_or_path(),
            &self.model.named_parameters(),
            trained,
        )
    }
}

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// Writes the final model: the adapter (PEFT format) or full weights, plus
    /// the tokenizer (transformers' `trainer.save_model(output_dir)`).
    /// Only rank 0 writes (the others return at once), as in transformers.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<(), TrainerError> {
        if !self.is_world_process_zero() {
            return Ok(());
        }
        // The final save (no dir) is part of the run that holds output_dir.
        let _lock = match dir {
            None => Some(super::output_dir::OutputDirLock::acquire(Path::new(
                &self.args.output_dir,
            ))?),
            Some(_) => None,
        };
        let dir = dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&self.args.output_dir));
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        match &self.peft {
            Some(adapter) => adapter.save_pretrained(&dir)?,
            None => self.model.save_pretrained(&dir).map_err(io_err(&dir))?,
        }
        self.processing_class.save_pretrained(&dir).map_err(|e| {
            TrainerError::Checkpoint(format!("saving the tokenizer to {}: {e}", dir.display()))
        })?;
        Ok(())
    }
}
