//! The tutorial's `instruct_train.py` in Rust: its defaults (the
//! `ChatGLM4ModelConfig` / `DataTrainingArguments` / `MySFTConfig` subclasses),
//! data loading and split, the `SavePredictCallback`, and `main()`.

use crate::runtime;
use anyhow::{bail, Context, Result};
use glm4::glm::{GlmConfig, GlmForCausalLM};
use glm4::tutorial::{tutorial_defaults, AppFlags, SftFlags, TUTORIAL_PROMPTS};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::{Device, Kind};
use trl_like::config::{
    DataArguments, IntervalStrategy, ModelConfig, NoArgs, ParseError, SFTConfig, TrainingArguments,
    TrlParser,
};
use trl_like::data::{Dataset, DatasetFormat};
use trl_like::distributed::{Backend, DistEnv, ProcessGroup};
use trl_like::generation::{generate, GenerationConfig};
use trl_like::peft::get_peft_config;
use trl_like::tokenizer::PaddingSide;
use trl_like::trainer::{
    CallbackContext, SFTTrainer, Trainer, TrainerCallback, TrainerControl, TrainerState,
    TrainingHooks,
};

/// Options of `glm4 sft` that are not TRL fields, as the run uses them.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// Questions for the prediction callback (one user message each).
    pub predict_prompts: Vec<String>,
    /// A system message with tools for the prediction prompts (the tool-call variant).
    pub predict_tools: Option<Value>,
    pub predict_max_new_tokens: usize,
    pub predict: bool,
    pub device: String,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            predict_prompts: TUTORIAL_PROMPTS.iter().map(|s| s.to_string()).collect(),
            predict_tools: None,
            predict_max_new_tokens: 512,
            predict: true,
            device: "auto".into(),
        }
    }
}

/// The options the run uses; reads the `--predict_tools` file.
pub fn resolve_app_flags(flags: AppFlags) -> Result<AppOptions> {
    let this = flags;
    {
        let predict_tools = match &this.predict_tools {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--predict_tools {}", path.display()))?;
                Some(
                    serde_json::from_str(&text)
                        .with_context(|| format!("--predict_tools {}: not JSON", path.display()))?,
                )
            }
        };
        Ok(AppOptions {
            predict_prompts: this.predict_prompt,
            predict_tools,
            predict_max_new_tokens: this.predict_max_new_tokens,
            predict: !this.no_predict,
            device: this.device,
        })
    }
}

/// The tutorial's `SavePredictCallback`: at every checkpoint, answer the test
/// questions with the current adapter (a left-padded batch, greedy), print the
/// answers, append them to `output_dir/predictions.jsonl` and send them to the trackers.
pub struct SavePredictCallback {
    pub conversations: Vec<Vec<Value>>,
    pub generation: GenerationConfig,
    pub output_file: PathBuf,
}

impl SavePredictCallback {
    pub fn new(app: &AppOptions, generation: GenerationConfig, output_dir: &Path) -> Self {
        let conversations = app
            .predict_prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut conv = Vec::new();
                // Like the toolcall script: the tools ride on a system message of the second question.
                if let (Some(tools), 1) = (&app.predict_tools, i) {
                    conv.push(json!({"role": "system", "content": "", "tools": tools}));
                }
                conv.push(json!({"role": "user", "content": p}));
                conv
            })
            .collect();
        let mut generation = generation;
        generation.max_new_tokens = Some(app.predict_max_new_tokens);
        generation.do_sample = false;
        Self {
            conversations,
            generation,
            output_file: output_dir.join("predictions.jsonl"),
        }
    }

    fn predict(&self, state: &TrainerState, ctx: &mut CallbackContext) -> Result<()> {
        let tok = ctx.processing_class;
        let batch = tok.apply_chat_template_batch(&self.conversations, true, PaddingSide::Left)?;
        let (ids, mask) = batch.to_tensors(ctx.model.device())?;
        let out = generate(ctx.model, &ids, Some(&mask), &self.generation, None)?;
        let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&out.sequences)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.output_file)
            .with_context(|| format!("opening {}", self.output_file.display()))?;
        let prompt_len = batch.input_ids.first().map_or(0, Vec::len);
        for (conv, row) in self.conversations.iter().zip(&rows) {
            // As the tutorial: the whole sequence decoded with its special tokens.
            let full = tok.decode(row, false)?;
            let answer_ids: Vec<i64> = row[prompt_len..]
                .iter()
                .copied()
                .take_while(|t| !self.generation.eos_token_id.contains(t))
                .collect();
            // GLM-4 answers start with the newline after <|assistant|>.
            let answer = tok.decode(&answer_ids, true)?.trim().to_string();
            let question = conv
                .last()
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default();
            eprintln!("[step {}] {question} -> {answer}", state.global_step);
            writeln!(
                file,
                "{}",
                json!({"step": state.global_step, "prompt": question, "response": answer, "text": full})
            )?;
            ctx.text_logs.push(("Prediction".into(), full));
        }
        Ok(())
    }
}

impl TrainerCallback for SavePredictCallback {
    fn on_save(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        _control: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        if !state.is_world_process_zero {
            return;
        }
        if let Err(e) = self.predict(state, ctx) {
            log::warn!(
                "the prediction callback failed at step {}: {e:#}",
                state.global_step
            );
        }
    }
}

/// Where an interrupt goes: the trainer's stop flag, once there is a trainer.
pub(crate) type InterruptTarget =
    std::sync::Arc<std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>>>;

/// Ctrl-C / SIGTERM: the first asks the trainer to finish its step, save a
/// checkpoint and stop; a second one (or one before training has started)
/// exits at once with status 130.
///
/// The handler runs on ctrlc's own thread while the main thread may be inside
/// libtorch. `std::process::exit` would run the exit handlers (libtorch's static
/// destructors among them) under the main thread's feet, which crashed with
/// SIGSEGV or a panic; `_exit` ends the process without running anything.
/// Checkpoints are renamed into place only when complete, so nothing is lost
/// that a resume needs.
pub(crate) fn install_interrupt_handler() -> InterruptTarget {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let target = InterruptTarget::default();
    let handler_target = target.clone();
    let count = AtomicUsize::new(0);
    let result = ctrlc::set_handler(move || {
        let first = count.fetch_add(1, Ordering::SeqCst) == 0;
        // Writes ignore errors: a closed stderr must not kill the handler thread.
        let mut err = std::io::stderr();
        match handler_target.get() {
            Some(flag) if first => {
                flag.store(true, Ordering::SeqCst);
                let _ = writeln!(err, "\ninterrupt: finishing the current step and saving a checkpoint (interrupt again to quit at once)");
            }
            _ => {
                let _ = writeln!(
                    err,
                    "\n{}: exiting now (the last complete checkpoint is kept)",
                    if first {
                        "interrupt before training started"
                    } else {
                        "second interrupt"
                    }
                );
                // SAFETY: _exit is async-signal-safe and touches no Rust state.
                unsafe { libc::_exit(130) };
            }
        }
    });
    if let Err(e) = result {
        log::warn!("cannot install the Ctrl-C handler ({e}); an interrupt will stop training without a checkpoint");
    }
    target
}

/// Loads the data files (JSON/JSONL paths, or a Hub dataset id downloaded first).
pub fn load_data(data: &DataArguments) -> Result<Dataset> {
    if data.data_files.is_empty() {
        bail!("--data_files: no data files given");
    }
    let mut paths = Vec::new();
    for f in &data.data_files {
        let p = PathBuf::from(f);
        if p.exists() {
            paths.push(p);
        } else if looks_like_hub_id(f) {
            let local = PathBuf::from("data").join(f.replace('/', "__"));
            eprintln!(
                "{f} is not a local file; downloading the dataset {f} to {}",
                local.display()
            );
            let req = trl_like::hub::SnapshotRequest {
                repo_id: f.clone(),
                repo_type: "dataset".into(),
                revision: None,
                local_dir: local.clone(),
                allow_suffixes: vec![".json".into(), ".jsonl".into()],
                token: None,
            };
            trl_like::hub::snapshot_download(&req)?;
            let mut found: Vec<PathBuf> = walk_json(&local);
            found.sort();
            if found.is_empty() {
                bail!("dataset {f} has no .json/.jsonl files");
            }
            paths.extend(found);
        } else {
            bail!("--data_files {f}: no such file");
        }
    }
    let mut ds = Dataset::from_json_files(&paths)?;
    if let Some(n) = data.max_samples {
        ds = ds.take(n);
    }
    Ok(ds)
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
        && !s.ends_with(".json")
        && !s.ends_with(".jsonl")
}

fn walk_json(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_json(&p));
            } else if p.extension().is_some_and(|x| x == "json" || x == "jsonl") {
                out.push(p);
            }
        }
    }
    out
}

/// Converts every record once up front: a bad record stops the run with its file,
/// index and field — or, with `--skip_bad_records`, is left out and counted.
pub fn check_records(data: Dataset, setup: &SftSetup) -> Result<Dataset> {
    let Some(first) = data.records.first() else {
        return Ok(data);
    };
    let format = setup.data_args.dataset_format.resolve(first)?;
    let total = data.len();
    let mut kept = Vec::with_capacity(total);
    let mut skipped = 0usize;
    for record in data.records {
        match trl_like::data::formats::to_example(&record, format, &setup.args.dataset_text_field) {
            Ok(_) => kept.push(record),
            Err(e) if setup.data_args.skip_bad_records => {
                if skipped < 5 {
                    log::warn!("skipping {e}");
                }
                skipped += 1;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context("bad record (pass --skip_bad_records true to skip such records)"))
            }
        }
    }
    if skipped > 0 {
        eprintln!(
            "skipped {skipped} of {total} records that do not fit the {} format",
            format.name()
        );
    }
    if kept.is_empty() {
        bail!("no usable records: all {total} were skipped");
    }
    Ok(Dataset { records: kept })
}

/// Everything `glm4 sft` / `glm4 preview` parse from their arguments.
pub struct SftSetup {
    pub model_args: ModelConfig,
    pub data_args: DataArguments,
    pub args: SFTConfig,
    pub app: AppOptions,
}

/// Parses `glm4 sft` arguments; `Ok(None)` after printing `--help`.
pub fn parse(raw: &[String]) -> Result<Option<SftSetup>> {
    Ok(parse_with::<NoArgs>(raw)?.map(|(setup, _)| setup))
}

/// Parses `glm4 sft` arguments plus a subcommand's own options `E`, all in
/// one clap command (one `--help`); `Ok(None)` after printing `--help`.
pub fn parse_with<E: clap::Args>(raw: &[String]) -> Result<Option<(SftSetup, E)>> {
    let (m, d, s) = tutorial_defaults();
    match TrlParser::new(m, d, s).parse_with::<SftFlags<E>>(raw) {
        Ok((parsed, flags)) => {
            for (k, v) in &parsed.env {
                std::env::set_var(k, v);
            }
            let setup = SftSetup {
                model_args: parsed.model,
                data_args: parsed.data,
                args: parsed.sft,
                app: resolve_app_flags(flags.app)?,
            };
            Ok(Some((setup, flags.extra)))
        }
        Err(ParseError::Help(text)) => {
            println!("{text}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The device a training command runs on: the CPU with `--use_cpu`, under
/// torchrun the GPU of this rank's LOCAL_RANK (as transformers does), else `--device`.
fn pick_device(use_cpu: bool, device_flag: &str, dist: Option<&DistEnv>) -> Result<Device> {
    if use_cpu {
        return Ok(Device::Cpu);
    }
    match (dist, device_flag) {
        (Some(env), "auto" | "cuda") if tch::Cuda::is_available() => {
            runtime::parse_device(&format!("cuda:{}", env.local_rank))
                .with_context(|| format!("LOCAL_RANK={}", env.local_rank))
        }
        _ => runtime::parse_device(device_flag),
    }
}

/// What a training command (`glm4 sft`, `glm4 dpo`) holds from its first step
/// to its last: the Ctrl-C target, the device, the process group and, on rank
/// 0, the output directory's lock.
pub(crate) struct Run {
    pub interrupt: InterruptTarget,
    pub device: Device,
    pub model_dir: PathBuf,
    /// Handed to the trainer once it exists.
    pub group: Option<ProcessGroup>,
    pub world: usize,
    pub is_main: bool,
    /// One run per output_dir, from before the first file is read until the last
    /// is written (only rank 0 writes, so only rank 0 locks).
    _lock: Option<trl_like::trainer::output_dir::OutputDirLock>,
}

impl Run {
    /// Installs the interrupt handler, picks the device, checks that the model
    /// fits it, joins the torchrun launch (if any) and locks the output directory.
    pub(crate) fn start(
        model_args: &ModelConfig,
        args: &TrainingArguments,
        device_flag: &str,
    ) -> Result<Self> {
        let interrupt = install_interrupt_handler();
        let dist_env = DistEnv::from_env()?;
        let device = pick_device(args.use_cpu, device_flag, dist_env.as_ref())?;
        let model_dir = PathBuf::from(model_args.model_name_or_path.clone().unwrap_or_default());
        check_device_fits(&model_dir, device)?;
        check_attn_implementation(model_args, device)?;
        let group = init_process_group(dist_env.as_ref(), args, device)?;
        let is_main = group.as_ref().is_none_or(|g| g.rank() == 0);
        let world = group.as_ref().map_or(1, |g| g.world_size());
        let _lock = if is_main {
            Some(trl_like::trainer::output_dir::OutputDirLock::acquire(
                Path::new(&args.output_dir),
            )?)
        } else {
            None
        };
        Ok(Self {
            interrupt,
            device,
            model_dir,
            group,
            world,
            is_main,
            _lock,
        })
    }

    /// Loads the model to train ([`load_model`]; bf16 under `--deepspeed`'s bf16
    /// mode) and logs the memory estimate of this run on rank 0.
    pub(crate) fn load_model(
        &self,
        model_args: &ModelConfig,
        args: &TrainingArguments,
        max_length: Option<usize>,
    ) -> Result<GlmForCausalLM> {
        let model = load_model_for(model_args, self.device, deepspeed_bf16(args, self.world)?)?;
        if self.is_main {
            crate::estimate::log_for_run(&model.config, model_args, args, max_length, self.world);
        }
        Ok(model)
    }
}

impl Run {
    /// The recipe's end, shared by `sft` and `dpo`: hands the process group to
    /// the trainer, trains, saves the final model unless Ctrl-C stopped the run,
    /// and on rank 0 says what was written and how to try it.
    pub(crate) fn train_and_save<H: TrainingHooks<GlmForCausalLM>>(
        mut self,
        mut trainer: Trainer<GlmForCausalLM, H>,
        output_dir: &Path,
        peft: bool,
        predict: bool,
    ) -> Result<()> {
        let _ = self.interrupt.set(trainer.interrupt_handle());
        if let Some(g) = self.group.take() {
            trainer.set_process_group(g);
        }
        trainer.train()?;
        if trainer.interrupted_at.is_none() {
            trainer.save_model(None)?;
        }
        if !self.is_main {
            return Ok(());
        }
        if let Some(step) = trainer.interrupted_at {
            report_interrupted(output_dir, step);
            return Ok(());
        }
        eprint!(
            "\n{}",
            closing_summary(&self.model_dir, output_dir, peft, predict)
        );
        Ok(())
    }
}

/// Says what is on disk after Ctrl-C stopped training after `step`: the
/// checkpoint of that step with its optimizer, or why there is none.
fn report_interrupted(output_dir: &Path, step: usize) {
    let last = trl_like::trainer::checkpoint::list_checkpoints(output_dir).pop();
    match last {
        Some((s, p))
            if s == step
                && (p.join("optimizer.safetensors").is_file()
                    || p.join(trl_like::optim::ZERO_LAYOUT_FILE).is_file()) =>
        {
            eprintln!(
                "\ninterrupted: stopped after step {step}; the checkpoint is {}. Run the same command again to resume.",
                p.display()
            )
        }
        Some((_, p)) => eprintln!(
            "\ninterrupted: stopped after step {step}, but no resumable checkpoint of that step was written; \
             the newest checkpoint is {}",
            p.display()
        ),
        None => eprintln!(
            "\ninterrupted: stopped after step {step}, but no checkpoint was written; running the same \
             command again starts over"
        ),
    }
}

/// Joins the torchrun launch this process belongs to, if any (RANK, WORLD_SIZE, … set).
pub(crate) fn init_process_group(
    env: Option<&DistEnv>,
    args: &TrainingArguments,
    device: Device,
) -> Result<Option<ProcessGroup>> {
    let Some(env) = env else {
        return Ok(None);
    };
    let backend = Backend::resolve(args.ddp_backend.as_deref(), device)?;
    if backend == Backend::Nccl && !device.is_cuda() {
        bail!("--ddp_backend nccl needs CUDA tensors, but this rank trains on the CPU; use --ddp_backend gloo");
    }
    if !backend.is_available() {
        bail!("--ddp_backend {}: this glm4 build has no NCCL support (see docs/DISTRIBUTED.md); use gloo", backend.name());
    }
    if env.rank == 0 {
        eprintln!(
            "joining {} ranks at {}:{} ({} backend, timeout {} s)",
            env.world_size,
            env.master_addr,
            env.master_port,
            backend.name(),
            args.ddp_timeout
        );
    }
    let group = ProcessGroup::init(env, backend, Duration::from_secs(args.ddp_timeout))?;
    Ok(Some(group))
}

/// `--deepspeed`'s bf16 mode, checked against the flags before anything is
/// loaded (None without --deepspeed).
fn deepspeed_bf16(args: &TrainingArguments, world: usize) -> Result<Option<bool>> {
    let Some(path) = args.deepspeed.as_deref() else {
        return Ok(None);
    };
    let config = trl_like::config::DeepSpeedConfig::from_file(Path::new(path))?;
    Ok(Some(config.resolve(args, world)?.bf16))
}

/// [`load_model`], except that DeepSpeed's bf16 mode (`Some(true)`) casts the
/// model to bf16 as DeepSpeed does, on a CPU too (fp32 master weights keep
/// the updates exact; bf16 matmuls are slow there).
fn load_model_for(
    model_args: &ModelConfig,
    device: Device,
    deepspeed_bf16: Option<bool>,
) -> Result<GlmForCausalLM> {
    let dir = PathBuf::from(model_args.model_name_or_path.as_deref().unwrap_or_default());
    if deepspeed_bf16 != Some(true) || !dir.is_dir() {
        return load_model(model_args, device);
    }
    if device == Device::Cpu {
        log::info!("note: --deepspeed with bf16: bf16 working weights with fp32 masters, on CPU too (slow)");
    }
    Ok(GlmForCausalLM::from_pretrained(
        &dir,
        Some(Kind::BFloat16),
        device,
    )?)
}

/// Loads the base model in the dtype the config asks for (fp32 on CPU, where bf16 is very slow).
pub fn load_model(model_args: &ModelConfig, device: Device) -> Result<GlmForCausalLM> {
    let dir = PathBuf::from(
        model_args
            .model_name_or_path
            .as_deref()
            .unwrap_or("./weights/glm-4-9b-hf"),
    );
    if !dir.is_dir() {
        bail!(
            "model directory {} does not exist; download it with `glm4 download THUDM/glm-4-9b-hf --local_dir {}`",
            dir.display(),
            dir.display()
        );
    }
    let config = GlmConfig::from_pretrained(&dir)?;
    let mut kind = runtime::resolve_dtype(model_args.dtype, config.checkpoint_dtype(), device);
    if device == Device::Cpu && kind != Kind::Float {
        log::info!("note: training on CPU in float32 (bf16/fp16 matmuls are very slow on CPUs)");
        kind = Kind::Float;
    }
    Ok(GlmForCausalLM::from_pretrained_quantized(
        &dir,
        Some(kind),
        device,
        model_args.quantization_config(),
    )?)
}

/// Where the tutorial's files come from when they are missing.
const TUTORIAL_MODEL: (&str, &str) = ("./weights/glm-4-9b-hf", "THUDM/glm-4-9b-hf");
const TUTORIAL_DATA: (&str, &str) = (
    "./data/alpaca_gpt4_data_zh.json",
    "llamafactory/alpaca_gpt4_zh",
);
const TOOLCALL_DATA: (&str, &str) = (
    "./data/glaive_toolcall_zh_1k.json",
    "llamafactory/glaive_toolcall_zh",
);

/// Models above this size are not trained on a CPU.
const CPU_PARAMETER_LIMIT: i64 = 1_000_000_000;

/// Refuses to start a multi-billion-parameter run without CUDA, before anything
/// is downloaded or loaded.
pub(crate) fn check_device_fits(model_dir: &Path, device: Device) -> Result<()> {
    if device != Device::Cpu {
        return Ok(());
    }
    let params = match GlmConfig::from_pretrained(model_dir) {
        Ok(cfg) => cfg.num_parameters(),
        // Not downloaded yet: the tutorial's default is GLM-4-9B.
        Err(_) if same_path(model_dir, TUTORIAL_MODEL.0) => GlmConfig::glm4_9b().num_parameters(),
        Err(_) => return Ok(()),
    };
    if params > CPU_PARAMETER_LIMIT {
        bail!(
            "{} has {:.1}B parameters and there is no CUDA device here (see `glm4 env`): fine-tuning GLM-4-9B \
             needs an NVIDIA GPU with about 24 GB of memory (LoRA, bf16). To see the whole pipeline run on this \
             machine, try `make demo` (the embedded tiny GLM-4 on CPU, a few minutes).",
            model_dir.display(),
            params as f64 / 1e9
        );
    }
    Ok(())
}

/// `attn_implementation` (already one of the known values, see
/// `ModelConfig::validate`) against the device: every value runs SDPA here.
pub(crate) fn check_attn_implementation(model_args: &ModelConfig, device: Device) -> Result<()> {
    match model_args.attn_implementation.as_deref() {
        Some("flash_attention_2") if !device.is_cuda() => bail!(
            "--attn_implementation flash_attention_2 needs a CUDA device (this run is on the CPU); \
             use --attn_implementation sdpa"
        ),
        Some("flash_attention_2") => log::info!(
            "note: --attn_implementation flash_attention_2 runs as scaled-dot-product attention, \
             whose flash kernel libtorch picks for unmasked bf16/fp16 batches"
        ),
        Some("eager") => log::info!(
            "note: --attn_implementation eager runs as scaled-dot-product attention \
             (the same computation; only rounding differs)"
        ),
        _ => {}
    }
    Ok(())
}

fn same_path(a: &Path, b: &str) -> bool {
    let norm = |p: &Path| {
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect::<PathBuf>()
    };
    norm(a) == norm(Path::new(b))
}

/// Downloads the tutorial's model or data when the default path is missing,
/// as the tutorial's README tells its readers to.
fn fetch_tutorial_files(setup: &SftSetup) -> Result<()> {
    let model_dir = PathBuf::from(
        setup
            .model_args
            .model_name_or_path
            .clone()
            .unwrap_or_default(),
    );
    if !model_dir.exists() && same_path(&model_dir, TUTORIAL_MODEL.0) {
        eprintln!(
            "{} is missing; downloading {}",
            model_dir.display(),
            TUTORIAL_MODEL.1
        );
        trl_like::hub::snapshot_download(&trl_like::hub::SnapshotRequest {
            repo_id: TUTORIAL_MODEL.1.into(),
            repo_type: "model".into(),
            revision: None,
            local_dir: model_dir,
            allow_suffixes: vec![],
            token: None,
        })?;
    }
    for file in &setup.data_args.data_files {
        for (default, repo) in [TUTORIAL_DATA, TOOLCALL_DATA] {
            let path = PathBuf::from(file);
            if !path.exists() && same_path(&path, default) {
                download_data_file(repo, &path)?;
            }
        }
    }
    Ok(())
}

/// Fetches a dataset repository and writes its records as one JSON array at `target`.
fn download_data_file(repo: &str, target: &Path) -> Result<()> {
    eprintln!(
        "{} is missing; downloading the dataset {repo}",
        target.display()
    );
    let cache = PathBuf::from("data").join(format!(".{}", repo.replace('/', "__")));
    trl_like::hub::snapshot_download(&trl_like::hub::SnapshotRequest {
        repo_id: repo.into(),
        repo_type: "dataset".into(),
        revision: None,
        local_dir: cache.clone(),
        allow_suffixes: vec![".json".into(), ".jsonl".into()],
        token: None,
    })?;
    let mut files = walk_json(&cache);
    files.sort();
    let ds = Dataset::from_json_files(&files)?;
    let records: Vec<&Value> = ds.records.iter().map(|r| &r.value).collect();
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(target, serde_json::to_string_pretty(&records)?)?;
    eprintln!("wrote {} records to {}", records.len(), target.display());
    Ok(())
}

/// `glm4 sft`: the tutorial's `main(model_args, data_args, training_args)`.
pub fn run_sft(raw: &[String]) -> Result<()> {
    let Some(setup) = parse(raw)? else {
        return Ok(());
    };
    let run = Run::start(&setup.model_args, &setup.args, &setup.app.device)?;
    let model_dir = run.model_dir.clone();
    // Rank 0 downloads what is missing while the others wait (main_process_first).
    if run.is_main {
        fetch_tutorial_files(&setup)?;
    }
    if let Some(g) = &run.group {
        g.barrier()?;
    }
    let tokenizer = glm4::load_tokenizer(&model_dir)?;
    let raw_data = load_data(&setup.data_args)?;
    let raw_data = check_records(raw_data, &setup)?;
    let seed = setup.args.seed;
    let (train, test) = raw_data.train_test_split(setup.data_args.test_size, seed)?;
    let eval =
        (setup.args.eval_strategy != IntervalStrategy::No && !test.is_empty()).then_some(&test);
    if setup.args.eval_strategy != IntervalStrategy::No && eval.is_none() {
        bail!("eval_strategy is {} but there is no evaluation split (test_size 0); set --eval_strategy no or --test_size", setup.args.eval_strategy);
    }
    let model = run.load_model(&setup.model_args, &setup.args, setup.args.max_length)?;
    let mut generation = GenerationConfig::from_pretrained(&model_dir)?.unwrap_or_default();
    if generation.eos_token_id.is_empty() {
        generation.eos_token_id = model.config.eos_token_ids();
    }
    generation.pad_token_id = generation.pad_token_id.or(tokenizer.pad_token_id());
    let output_dir = PathBuf::from(&setup.args.output_dir);
    let mut callbacks: Vec<Box<dyn TrainerCallback>> = Vec::new();
    if setup.app.predict {
        callbacks.push(Box::new(SavePredictCallback::new(
            &setup.app,
            generation,
            &output_dir,
        )));
    }
    let mut data_format = setup.data_args.dataset_format;
    if let (DatasetFormat::Auto, Some(first)) = (data_format, train.records.first()) {
        data_format = data_format.resolve(first)?;
        if run.is_main {
            eprintln!(
                "dataset format: {} (detected; set --dataset_format to override)",
                data_format.name()
            );
        }
    }
    let mut builder = SFTTrainer::builder(model, setup.args.clone())
        .train_dataset(&train)
        .processing_class(tokenizer)
        .peft_config(get_peft_config(&setup.model_args)?)
        .callbacks(callbacks);
    if let Some(eval) = eval {
        builder = builder.eval_dataset(eval);
    }
    let trainer = builder.build()?;
    run.train_and_save(
        trainer,
        &output_dir,
        setup.model_args.use_peft,
        setup.app.predict,
    )
}

/// What a finished run wrote and the command to try it: the base model plus
/// the adapter after LoRA, the output folder itself after full fine-tuning
/// (it holds the whole model); paths quoted for the shell.
pub fn closing_summary(model_dir: &Path, output_dir: &Path, peft: bool, predict: bool) -> String {
    let q = |p: &Path| glm4::shell_quote(&p.display().to_string());
    let mut out = String::new();
    if peft {
        out += &format!("adapter:         {}\n", output_dir.display());
    } else {
        out += &format!("model:           {}\n", output_dir.display());
    }
    if predict {
        out += &format!(
            "predictions:     {}\n",
            output_dir.join("predictions.jsonl").display()
        );
    }
    out += &format!(
        "loss curves:     {}\n",
        output_dir.join("training_curves.svg").display()
    );
    if peft {
        out += &format!(
            "try it:          glm4 chat --model_name_or_path {} --adapter_path {}\n",
            q(model_dir),
            q(output_dir)
        );
    } else {
        out += &format!(
            "try it:          glm4 chat --model_name_or_path {}\n",
            q(output_dir)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_summary_fits_what_the_run_wrote() {
        let lora = closing_summary(
            Path::new("weights/tiny glm"),
            Path::new("out/my run"),
            true,
            true,
        );
        assert!(
            lora.contains(
                "glm4 chat --model_name_or_path 'weights/tiny glm' --adapter_path 'out/my run'"
            ),
            "{lora}"
        );
        assert!(lora.contains("predictions.jsonl"), "{lora}");
        let full = closing_summary(
            Path::new("weights/tiny-glm"),
            Path::new("out/full"),
            false,
            false,
        );
        assert!(
            full.contains("glm4 chat --model_name_or_path out/full\n"),
            "{full}"
        );
        assert!(!full.contains("--adapter_path"), "{full}");
        assert!(!full.contains("predictions.jsonl"), "{full}");
        assert_eq!(glm4::shell_quote("it's"), "'it'\\''s'");
    }
}
