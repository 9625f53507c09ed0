//! Keeping `output_dir` consistent: one run at a time ([`OutputDirLock`]),
//! `overwrite_output_dir` that really starts over ([`clear_previous_run`]),
//! model folders that never overwrite their own inputs
//! ([`check_write_target`]), and resumes that continue the same run
//! ([`RunRecord`], [`check_resume`]).

use crate::config::TrainingArguments;
use crate::data::TokenizedExample;
use serde_json::Value;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Kind, Tensor};

/// The lock file inside a locked `output_dir`; removed when the run ends.
pub const LOCK_FILE: &str = ".output_dir.lock";
/// What a checkpoint records about the run that wrote it (see [`RunRecord`]).
pub const RECORD_FILE: &str = "run_record.json";

/// Why an output folder cannot be used as asked.
#[derive(Debug, thiserror::Error)]
pub enum OutputDirError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "output_dir {dir} is in use by another run ({holder}); wait for it to finish, \
         or choose another --output_dir"
    )]
    Locked { dir: String, holder: String },
    /// The target of a model write is, or contains, one of the write's inputs.
    #[error("{0}")]
    Overlap(String),
    #[error(
        "output_dir {dir} already exists and is not empty; pass --overwrite_output_dir to \
         replace the model files in it, or choose a new --output_dir"
    )]
    NotEmpty { dir: String },
    #[error("cannot resume from {checkpoint}: {problems}. {hint}")]
    IncompatibleResume {
        checkpoint: String,
        problems: String,
        hint: String,
    },
    #[error("{checkpoint}/{RECORD_FILE}: {message}")]
    BadRecord { checkpoint: String, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutputDirError + '_ {
    move |error| OutputDirError::Io {
        path: path.display().to_string(),
        error,
    }
}

// ---------------------------------------------------------------------------
// Locking
// ---------------------------------------------------------------------------

/// Locks this process holds, by canonical folder: a second `acquire` of the same
/// folder in the same process (the app around the trainer, the trainer around
/// its final save) shares the lock instead of deadlocking on it.
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

struct Held {
    dir: PathBuf,
    file: File,
    count: usize,
    /// The folder did not exist before the lock created it.
    created: bool,
}

/// An exclusive lock on an output folder for as long as the value lives
/// (`flock` on [`LOCK_FILE`], which names the holder's pid and command line).
/// The kernel drops the lock when its process dies, so a crashed run never
/// leaves a lock behind, only a stale file that the next run takes over.
#[derive(Debug)]
pub struct OutputDirLock {
    dir: PathBuf,
}

impl OutputDirLock {
    /// Creates `dir` if needed and locks it, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, OutputDirError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = dir.canonicalize().map_err(io_err(dir))?;
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.iter_mut().find(|h| h.dir == key) {
            h.count += 1;
            return Ok(Self { dir: key });
        }
        let path = key.join(LOCK_FILE);
        // The holder unlinks the file when it is done; a file locked after that
        // unlink is no longer the lock, so check and retry.
        for _ in 0..100 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err(&path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Err(OutputDirError::Locked {
                        dir: dir.display().to_string(),
                        holder: describe_holder(&text),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
            }
            if !same_file(&file, &path) {
                continue;
            }
            let command: Vec<String> = std::env::args().collect();
            let text = format!(
                "pid {}\ncommand {}\n",
                std::process::id(),
                command.join(" ")
            );
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(text.as_bytes()))
                .map_err(io_err(&path))?;
            held.push(Held {
                dir: key.clone(),
                file,
                count: 1,
                created,
            });
            return Ok(Self { dir: key });
        }
        Err(OutputDirError::Locked {
            dir: dir.display().to_string(),
            holder: "another process keeps taking the lock".into(),
        })
    }
}

impl Drop for OutputDirLock {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = held.iter().position(|h| h.dir == self.dir) else {
            return;
        };
        held[i].count -= 1;
        if held[i].count > 0 {
            return;
        }
        let h = held.remove(i);
        // Unlink while still holding the lock, so no one locks a file about to vanish.
        let _ = std::fs::remove_file(h.dir.join(LOCK_FILE));
        drop(h.file);
        if h.created {
            // A run that failed before writing anything leaves no empty folder behind.
            let _ = std::fs::remove_dir(&h.dir);
        }
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

fn describe_holder(text: &str) -> String {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
    };
    match (field("pid "), field("command ")) {
        (Some(pid), Some(cmd)) => format!("pid {pid}: {cmd}"),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "a process that has not written its name yet".into(),
    }
}

// ---------------------------------------------------------------------------
// Emptiness, overwrite
// ---------------------------------------------------------------------------

/// Whether `dir` holds anything besides its lock file (a missing folder is empty).
pub fn is_empty(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .all(|e| e.file_name() == LOCK_FILE),
        Err(_) => true,
    }
}

/// Files a saved model (weights, config, tokenizer, adapter) consists of.
fn is_model_file(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "model.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "chat_templates",
    ];
    NAMES.contains(&name) || is_weight_shard(name) || crate::fsutil::is_tmp_name(name)
}

/// `model-00001-of-00004.safetensors`.
pub fn is_weight_shard(name: &str) -> bool {
    name.strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
}

/// Everything a training run writes into its `output_dir`: checkpoints (and
/// their temporary folders), the final model, state, logs, plots, predictions.
fn is_run_output(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "trainer_state.json",
        "training_args.json",
        "trainer_extra.json",
        "training_curves.svg",
        "training_curves.png",
        "predictions.jsonl",
        "runs",
    ];
    let checkpoint = |s: &str| {
        s.strip_prefix(super::checkpoint::PREFIX)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
    };
    NAMES.contains(&name)
        || is_model_file(name)
        || checkpoint(name)
        || name
            .strip_prefix('.')
            .and_then(|s| s.strip_suffix(".partial"))
            .is_some_and(checkpoint)
}

fn remove_entries(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, OutputDirError> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if keep(&name) {
            continue;
        }
        let path = e.path();
        let result = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(io_err(&path))?;
        removed.push(name);
    }
    Ok(removed)
}

/// `overwrite_output_dir`: removes the previous run's checkpoints, final model,
/// state, logs, plots and predictions from `dir`, so that nothing of it can be
/// resumed or mistaken for this run's. Other files (the user's) stay. Returns
/// the names removed.
pub fn clear_previous_run(dir: &Path) -> Result<Vec<String>, OutputDirError> {
    remove_entries(dir, |name| !is_run_output(name))
}

/// Removes the model files (weights, shards, index, config, tokenizer, adapter)
/// from `dir`, before a new model is written there with `--overwrite_output_dir`.
pub fn clear_model_files(dir: &Path) -> Result<Vec<String>, OutputDirError> {
    remove_entries(dir, |name| !is_model_file(name))
}

/// Path as the file system resolves it, also for a path that does not exist
/// yet (its nearest existing ancestor resolved, the rest appended).
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    // `a/missing/../b` names `a/b` once created (create_dir_all goes through it).
    let mut absolute = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                absolute.pop();
            }
            std::path::Component::CurDir => {}
            c => absolute.push(c),
        }
    }
    let mut rest = Vec::new();
    let mut cur = absolute.as_path();
    loop {
        if let Ok(p) = cur.canonicalize() {
            return rest.iter().rev().fold(p, |acc, c| acc.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return absolute,
        }
    }
}

/// Refuses to write a model into `target` when it is, or contains, one of
/// `inputs` (`(flag, folder)`: the base model, the adapter — writing there
/// would destroy them), or when it is not empty and `overwrite` is off.
pub fn check_write_target(
    target: &Path,
    inputs: &[(&str, &Path)],
    overwrite: bool,
) -> Result<(), OutputDirError> {
    let t = resolve(target);
    for (flag, input) in inputs {
        let i = resolve(input);
        if t == i {
            return Err(OutputDirError::Overlap(format!(
                "--output_dir {} is the {flag} folder; writing there would overwrite {}; choose another --output_dir",
                target.display(),
                input.display()
            )));
        }
        if i.starts_with(&t) {
            return Err(OutputDirError::Overlap(format!(
                "--output_dir {} contains the {flag} folder {}; choose a folder of its own as --output_dir",
                target.display(),
                input.display()
            )));
        }
    }
    if !overwrite && !is_empty(target) {
        return Err(OutputDirError::NotEmpty {
            dir: target.display().to_string(),
        });
    }
    Ok(())
}

/// The start of `train()`: rank 0 (`writer`) locks `output_dir` for the run,
/// then the checkpoint to resume from is resolved, and with
/// `overwrite_output_dir` rank 0 clears the previous run's outputs. A resume
/// the user asked for explicitly (`resume_from_checkpoint`) wins over
/// `overwrite_output_dir`: its run is continued, not cleared.
pub fn prepare(
    args: &TrainingArguments,
    output_dir: &Path,
    writer: bool,
) -> Result<(Option<OutputDirLock>, Option<PathBuf>), super::TrainerError> {
    let lock = if writer {
        Some(OutputDirLock::acquire(output_dir)?)
    } else {
        None
    };
    let resume = super::checkpoint::resolve_resume(args, output_dir)?;
    if writer && args.overwrite_output_dir {
        let inside = resume
            .as_ref()
            .is_some_and(|p| resolve(p).starts_with(resolve(output_dir)));
        if inside {
            log::info!(
                "note: resuming from {} as resume_from_checkpoint asks; overwrite_output_dir leaves its run in place",
                resume.as_ref().expect("checked").display()
            );
        } else {
            let removed = clear_previous_run(output_dir)?;
            if !removed.is_empty() {
                log::info!(
                    "overwrite_output_dir: removed the previous run's {} from {}",
                    removed.join(", "),
                    output_dir.display()
                );
            }
        }
    }
    Ok((lock, resume))
}

// ---------------------------------------------------------------------------
// Resume checks
// ---------------------------------------------------------------------------

/// What a resumed run must share with the run that wrote the checkpoint for
/// the resume to continue it rather than silently change it. Saved in every
/// checkpoint as [`RECORD_FILE`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub world_size: usize,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Examples in the tokenized training set.
    pub train_examples: usize,
    /// Hash of the tokenized training set (ids, labels, packing), in order.
    pub train_fingerprint: String,
    pub base_model: String,
    /// Hash of sampled base-model weights (rounded to bf16, so the same model
    /// loaded in another dtype matches).
    pub base_fingerprint: String,
    /// What is trained: "full", or the LoRA settings that give the adapter its meaning.
    pub trained: String,
}

impl RunRecord {
    pub fn new(
        args: &TrainingArguments,
        world_size: usize,
        (train_examples, train_fingerprint): (usize, String),
        base_model: String,
        base_params: &[(String, Tensor)],
        trained: String,
    ) -> Self {
        Self {
            world_size,
            per_device_train_batch_size: args.per_device_train_batch_size,
            gradient_accumulation_steps: args.gradient_accumulation_steps.max(1),
            train_examples,
            train_fingerprint,
            base_model,
            base_fingerprint: fingerprint_weights(base_params),
            trained,
        }
    }

    fn global_batch(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("json") + "\n";
        crate::fsutil::write_atomic(&dir.join(RECORD_FILE), text.as_bytes())
    }
}

/// 64-bit FNV-1a: stable across builds and platforms (unlike std's hasher).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// A fingerprint of tokenized rows: ids, labels and packed sequence lengths.
pub fn fingerprint_examples(train: &[TokenizedExample]) -> String {
    let mut h = Fnv::new();
    h.u64(train.len() as u64);
    for ex in train {
        h.u64(ex.input_ids.len() as u64);
        for &t in &ex.input_ids {
            h.u64(t as u64);
        }
        for &l in &ex.labels {
            h.u64(l as u64);
        }
        match &ex.seq_lengths {
            None => h.u64(0),
            Some(s) => {
                h.u64(s.len() as u64 + 1);
                s.iter().for_each(|&n| h.u64(n as u64));
            }
        }
    }
    h.hex()
}

/// Values sampled from each weight: enough to tell two checkpoints of the
/// same architecture apart, cheap enough for 9B parameters on a GPU.
const SAMPLES_PER_TENSOR: i64 = 64;

fn fingerprint_weights(params: &[(String, Tensor)]) -> String {
    let mut sorted: Vec<&(String, Tensor)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Fnv::new();
    tch::no_grad(|| {
        for (name, t) in sorted {
            h.bytes(name.as_bytes());
            for d in t.size() {
                h.u64(d as u64);
            }
            let n = t.numel() as i64;
            if n == 0 {
                continue;
            }
            let step = (n / SAMPLES_PER_TENSOR).max(1);
            let sample = t
                .detach()
                .reshape([-1])
                .slice(0, 0, n, step)
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu);
            if let Ok(values) = Vec::<f32>::try_from(&sample) {
                for v in values {
                    h.u64(v.to_bits() as u64);
                }
            }
        }
    });
    h.hex()
}

/// Settings that only change what happens from the resumed step on: a warning.
const FUTURE_ONLY: &[&str] = &[
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "max_steps",
    "num_train_epochs",
    "optim",
    "seed",
];

/// Settings that decide which batches the skipped steps consumed: resuming
/// with other values skips the wrong data (refused unless `ignore_data_skip`).
const DATA_ORDER: &[&str] = &[
    "data_seed",
    "train_sampling_strategy",
    "group_by_length",
    "dataloader_drop_last",
];

type Args = serde_json::Map<String, Value>;

/// What a resume check found, each list in the order it is printed.
#[derive(Default)]
struct ResumeFindings {
    /// Reasons to refuse whatever `ignore_data_skip` says.
    refused: Vec<String>,
    /// Reasons the skipped steps would cover other samples: refused, or a
    /// warning under `ignore_data_skip`.
    data_problems: Vec<String>,
    warnings: Vec<String>,
}

/// Compares this run with the one that wrote `checkpoint` (its
/// [`RECORD_FILE`] and `training_args.json`): refuses what would make the
/// resumed run wrong — another base model or adapter shape, other training
/// data, another global batch (the steps to skip would cover other samples) —
/// and warns about what only changes the rest of the run. `ignore_data_skip`
/// turns the data and batch refusals into warnings (nothing is skipped then).
/// Returns the warnings and notes to print, one line each.
pub fn check_resume(
    checkpoint: &Path,
    args: &TrainingArguments,
    now: &RunRecord,
) -> Result<Vec<String>, OutputDirError> {
    let ckpt = checkpoint.display().to_string();
    let mut found = ResumeFindings::default();

    let then_args: Option<Args> = std::fs::read_to_string(checkpoint.join("training_args.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let now_args = match serde_json::to_value(args) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    match read_record(checkpoint, &ckpt)? {
        Some(then) => {
            check_model(&then, now, &mut found);
            check_data(&then, now, &mut found);
            check_batch_geometry(&then, now, args, &mut found);
        }
        None => check_unrecorded(&ckpt, then_args.as_ref(), &now_args, &mut found),
    }
    if let Some(then_args) = &then_args {
        check_data_order(then_args, &now_args, &mut found);
        check_future_settings(then_args, &now_args, &ckpt, &mut found);
    }
    resume_verdict(found, args, ckpt)
}

/// The checkpoint's [`RECORD_FILE`]; `None` when an older writer left none.
fn read_record(checkpoint: &Path, ckpt: &str) -> Result<Option<RunRecord>, OutputDirError> {
    match std::fs::read_to_string(checkpoint.join(RECORD_FILE)) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| OutputDirError::BadRecord {
                checkpoint: ckpt.to_string(),
                message: e.to_string(),
            }),
        Err(_) => Ok(None),
    }
}

/// Another base model or another adapter shape: the saved weights mean
/// something else on top of it.
fn check_model(then: &RunRecord, now: &RunRecord, found: &mut ResumeFindings) {
    if then.base_fingerprint != now.base_fingerprint {
        found.refused.push(format!(
            "it was trained on the base model {} and this run loads {}, whose weights differ",
            then.base_model, now.base_model
        ));
    }
    if then.trained != now.trained {
        found.refused.push(format!(
            "it trained {} and this run trains {}",
            then.trained, now.trained
        ));
    }
}

fn check_data(then: &RunRecord, now: &RunRecord, found: &mut ResumeFindings) {
    if then.train_examples != now.train_examples || then.train_fingerprint != now.train_fingerprint
    {
        found.data_problems.push(format!(
            "its training data differ ({} tokenized examples, fingerprint {}; now {}, {}: \
             another data file, split, template or max_length)",
            then.train_examples, then.train_fingerprint, now.train_examples, now.train_fingerprint
        ));
    }
}

/// Another global batch makes the skipped steps cover other samples; so does
/// another per-device batch under group_by_length, whose length-sorted
/// mega-batches are counted in per-device batches.
/// The same global batch split differently is only a note.
fn check_batch_geometry(
    then: &RunRecord,
    now: &RunRecord,
    args: &TrainingArguments,
    found: &mut ResumeFindings,
) {
    let geometry = |r: &RunRecord| {
        format!(
            "{} per device x {} accumulation x {} processes = {}",
            r.per_device_train_batch_size,
            r.gradient_accumulation_steps,
            r.world_size,
            r.global_batch()
        )
    };
    let group_by_length =
        args.sampling_strategy() == crate::config::SamplingStrategy::GroupByLength;
    if then.global_batch() != now.global_batch()
        || (group_by_length && then.per_device_train_batch_size != now.per_device_train_batch_size)
    {
        found.data_problems.push(format!(
            "its batch was {}, this run's is {}, so the steps already done would skip other samples",
            geometry(then),
            geometry(now)
        ));
    } else if geometry(then) != geometry(now) {
        found.warnings.push(format!(
            "note: the batch is split differently ({} then, {} now); the global batch is the same",
            geometry(then),
            geometry(now)
        ));
    }
}

/// A checkpoint without [`RECORD_FILE`]: only its training_args.json can be
/// compared, so a batch change is a warning, not a refusal.
fn check_unrecorded(
    ckpt: &str,
    then_args: Option<&Args>,
    now_args: &Args,
    found: &mut ResumeFindings,
) {
    found.warnings.push(format!(
        "note: {ckpt} has no {RECORD_FILE} (an older checkpoint): its training data and base model \
         cannot be compared with this run's"
    ));
    let Some(then_args) = then_args else {
        return;
    };
    let batch = |m: &Args| {
        let get = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(1).max(1);
        get("per_device_train_batch_size") * get("gradient_accumulation_steps")
    };
    // Its process count is not recorded: a mismatch may be a changed world size.
    if batch(then_args) != batch(now_args) {
        found.warnings.push(format!(
            "warning: per-device batch x accumulation was {} and is {} now; unless the number \
             of processes changed to make up for it, the resumed run skips other samples than \
             the first run saw",
            batch(then_args),
            batch(now_args)
        ));
    }
}

fn show_setting(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "unset".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// `"k then -> now"` when setting `k` changed. A setting the checkpoint does
/// not record (an older writer) is not compared.
fn changed_setting(then_args: &Args, now_args: &Args, k: &str) -> Option<String> {
    let (a, b) = (then_args.get(k)?, now_args.get(k));
    (Some(a) != b).then(|| format!("{k} {} -> {}", show_setting(Some(a)), show_setting(b)))
}

/// Settings that decide which batches the skipped steps consumed ([`DATA_ORDER`]).
fn check_data_order(then_args: &Args, now_args: &Args, found: &mut ResumeFindings) {
    // The data order follows data_seed, or seed when data_seed is unset.
    let order_seed = |m: &Args| {
        m.get("data_seed")
            .filter(|v| !v.is_null())
            .or_else(|| m.get("seed"))
            .cloned()
    };
    if order_seed(then_args).is_some() && order_seed(then_args) != order_seed(now_args) {
        found.data_problems.push(format!(
            "the data order changed (seed/data_seed {} -> {})",
            show_setting(order_seed(then_args).as_ref()),
            show_setting(order_seed(now_args).as_ref())
        ));
    }
    found
        .data_problems
        .extend(DATA_ORDER.iter().filter_map(|k| {
            changed_setting(then_args, now_args, k)
                .filter(|_| *k != "data_seed")
                .map(|c| format!("the data order changed ({c})"))
        }));
}

/// [`FUTURE_ONLY`] settings that changed: one warning naming them all.
fn check_future_settings(
    then_args: &Args,
    now_args: &Args,
    ckpt: &str,
    found: &mut ResumeFindings,
) {
    let future: Vec<String> = FUTURE_ONLY
        .iter()
        .filter_map(|k| changed_setting(then_args, now_args, k))
        .collect();
    if !future.is_empty() {
        found.warnings.push(format!(
            "warning: settings changed since {ckpt}; they apply from the resumed step on: {}",
            future.join(", ")
        ));
    }
}

/// The warnings to print, or the refusal with the way out that applies.
fn resume_verdict(
    found: ResumeFindings,
    args: &TrainingArguments,
    ckpt: String,
) -> Result<Vec<String>, OutputDirError> {
    let ResumeFindings {
        mut refused,
        data_problems,
        mut warnings,
    } = found;
    if args.ignore_data_skip {
        if !data_problems.is_empty() {
            warnings.push(format!(
                "warning: ignore_data_skip: resuming anyway, and the current epoch restarts from its first batch \
                 ({})",
                data_problems.join("; ")
            ));
        }
    } else {
        refused.extend(data_problems.iter().cloned());
    }
    if refused.is_empty() {
        return Ok(warnings);
    }
    let hint = if !data_problems.is_empty() && !args.ignore_data_skip {
        "Rerun with the checkpoint's settings, pass --ignore_data_skip true to continue without \
         skipping the data already seen, or --overwrite_output_dir to start over"
    } else {
        "Rerun with the checkpoint's settings, or --overwrite_output_dir to start over"
    };
    Err(OutputDirError::IncompatibleResume {
        checkpoint: ckpt,
        problems: refused.join("; "),
        hint: hint.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("outdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_lock_is_shared_within_a_process_and_removed_at_the_end() {
        let d = tmpdir("lock");
        let a = OutputDirLock::acquire(&d).unwrap();
        let text = std::fs::read_to_string(d.join(LOCK_FILE)).unwrap();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        let b = OutputDirLock::acquire(&d).unwrap();
        drop(a);
        assert!(d.join(LOCK_FILE).exists(), "still held by the second guard");
        drop(b);
        assert!(!d.join(LOCK_FILE).exists());
        assert!(is_empty(&d));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_lock_held_elsewhere_is_refused_with_its_holder() {
        let d = tmpdir("held");
        // Another open file description stands for another process.
        let other = File::create(d.join(LOCK_FILE)).unwrap();
        other.lock().unwrap();
        std::fs::write(d.join(LOCK_FILE), "pid 4242\ncommand glm4 sft --x\n").unwrap();
        let err = OutputDirLock::acquire(&d).unwrap_err().to_string();
        assert!(
            err.contains("in use by another run") && err.contains("pid 4242: glm4 sft --x"),
            "{err}"
        );
        drop(other);
        let _ok = OutputDirLock::acquire(&d).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_folder_the_lock_created_is_removed_when_nothing_was_written() {
        let d = tmpdir("created").join("new");
        drop(OutputDirLock::acquire(&d).unwrap());
        assert!(!d.exists());
    }

    #[test]
    fn overwrite_clears_the_previous_run_but_not_other_files() {
        let d = tmpdir("clear");
        for f in [
            "adapter_model.safetensors",
            "trainer_state.json",
            "model-00001-of-00002.safetensors",
            "predictions.jsonl",
            ".adapter_config.json.tmp-12",
            "notes.txt",
        ] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        for sub in [
            "checkpoint-8",
            ".checkpoint-9.partial",
            "runs",
            "checkpoint-best",
            "data",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let removed = clear_previous_run(&d).unwrap();
        assert_eq!(removed.len(), 8, "{removed:?}");
        let mut left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["checkpoint-best", "data", "notes.txt"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn write_targets_that_are_or_contain_an_input_are_refused() {
        let d = tmpdir("target");
        let base = d.join("base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("model.safetensors"), "x").unwrap();
        let inputs = [("--model_name_or_path", base.as_path())];
        let same = base.join(".").join("..").join("base");
        let e = check_write_target(&same, &inputs, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the --model_name_or_path folder"), "{e}");
        let e = check_write_target(&d, &inputs, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("contains the --model_name_or_path folder"),
            "{e}"
        );
        let e = check_write_target(&base.join("../x/../base"), &inputs, true);
        assert!(e.is_err());
        let fresh = d.join("merged/deep");
        check_write_target(&fresh, &inputs, false).unwrap();
        std::fs::create_dir_all(d.join("full")).unwrap();
        std::fs::write(d.join("full/notes"), "x").unwrap();
        let e = check_write_target(&d.join("full"), &inputs, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not empty") && e.contains("--overwrite_output_dir"),
            "{e}"
        );
        check_write_target(&d.join("full"), &inputs, true).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn shard_names() {
        assert!(is_weight_shard("model-00001-of-00004.safetensors"));
        assert!(!is_weight_shard("model-a-of-b.safetensors"));
        assert!(!is_weight_shard("model.safetensors"));
    }
}
