//! `glm4 bench`: training-step throughput and peak memory of LoRA fine-tuning
//! on any GLM-4 shape, without downloading weights.
//!
//! The recipe is the tutorial's (SFTTrainer + LoRA + AdamW) driven through the
//! trainer's public API only: build the model (`GlmForCausalLM::new` +
//! `init_random`), make a dataset (synthetic ids of exactly `seq_len`, or real
//! records tokenized with the tiny tokenizer), train `warmup + steps`
//! optimizer steps with sequential sampling and nothing else switched on (no
//! evaluation, checkpoints, predictions or trackers), and time the steps after
//! the warm-up with a [`TrainerCallback`]. `--method dpo` runs the same loop as
//! TRL's DPOTrainer + LoRA on a preference file instead (the reference forward
//! is the base with the adapters disabled; tokens count both rows of each pair).
//!
//! What is reported, and how it is measured:
//! - **tokens/s**: real (attention-mask) tokens of the measured steps divided by
//!   the wall time from the end of the last warm-up step to the end of the last
//!   step, so everything in the loop counts (collation, forward, backward,
//!   clipping, the optimizer). `scripts/bench_trl.py` measures TRL the same way.
//! - **peak RSS**: the process's high-water resident set (`VmHWM` of
//!   `/proc/self/status`, which is what `getrusage(RUSAGE_SELF).ru_maxrss` reports).
//! - **GPU memory** (CUDA only, a cross-check): the device's `memory.used` as
//!   `nvidia-smi` reports it, sampled every 100 ms by a child
//!   `nvidia-smi -lms 100`, maximum over the run. PyTorch's caching
//!   allocator keeps the blocks it has reserved, so this is close to the
//!   allocator's peak *reserved* memory plus the CUDA context (about 0.5 GB) —
//!   not `max_memory_allocated`, which is lower.
//! - **CUDA allocator peaks** (CUDA only): `cuda_max_memory_allocated_mb` /
//!   `cuda_max_memory_reserved_mb`, the caching allocator's own counters
//!   (`trl_like::ops::cuda_memory_stats`, the numbers
//!   `torch.cuda.max_memory_allocated/reserved` give) since the process started.
//! - **MFU** (CUDA only): `tokens/s × 4·N / peak`, with N the base model's
//!   parameters (forward 2N + backward through the activations 2N; the frozen base
//!   computes no weight gradients) and the peak 989 TFLOP/s (H100/H200 dense bf16)
//!   unless `--peak_tflops` says otherwise.

use crate::runtime;
use anyhow::{bail, Context, Result};
use clap::builder::BoolishValueParser;
use clap::ArgAction;
use glm4::glm::{GlmConfig, GlmForCausalLM};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind};
use trl_like::config::{
    DPOConfig, IntervalStrategy, PackingStrategy, SFTConfig, SamplingStrategy, SaveStrategy,
    TorchDtype, TrainingArguments,
};
use trl_like::data::{Dataset, Origin, Record};
use trl_like::peft::{LoraConfig, TargetModules};
use trl_like::trainer::{
    CallbackContext, DPOTrainer, SFTTrainer, TrainerCallback, TrainerControl, TrainerState,
};

/// Dense bf16 peak of an H100 SXM (and H200, the same chip), in TFLOP/s.
pub const H100_BF16_PEAK_TFLOPS: f64 = 989.0;

/// The tokenizer every benchmark uses (committed with the repository).
const TINY_DIR: &str = "weights/tiny-glm";

/// `glm4 bench` options (`--name value`, `--name=value`, snake or kebab case).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "glm4 bench",
    about = "LoRA training-step throughput and peak memory on any GLM-4 shape (no weights needed)"
)]
pub struct BenchArgs {
    /// glm-4-9b, small, tiny, or a config.json / model directory.
    #[arg(long = "model_config", aliases = ["model-config", "model", "config"], value_name = "NAME|PATH")]
    pub model_config: String,
    /// Random weights (needed for glm-4-9b and small, which have none here).
    #[arg(long = "random_init", alias = "random-init", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(),
        hide_possible_values = true)]
    pub random_init: bool,
    /// Measured optimizer steps.
    #[arg(long, aliases = ["max_steps", "max-steps"], value_name = "N", default_value_t = 20)]
    pub steps: usize,
    /// Steps run before measuring.
    #[arg(long, aliases = ["warmup_steps", "warmup-steps"], value_name = "N", default_value_t = 3)]
    pub warmup: usize,
    /// Sequences per step.
    #[arg(long = "batch_size", aliases = ["batch-size", "per_device_train_batch_size", "per-device-train-batch-size"],
          value_name = "N", default_value_t = 4)]
    pub batch_size: usize,
    /// Synthetic sequence length, and max_length for real data.
    #[arg(long = "seq_len", aliases = ["seq-len", "max_length", "max-length", "max_seq_length", "max-seq-length"],
          value_name = "N", default_value_t = 512)]
    pub seq_len: usize,
    /// LoRA rank.
    #[arg(
        long = "lora_r",
        alias = "lora-r",
        value_name = "N",
        default_value_t = 8
    )]
    pub lora_r: i64,
    /// LoRA alpha (the tutorial's).
    #[arg(
        long = "lora_alpha",
        alias = "lora-alpha",
        value_name = "X",
        default_value_t = 32.0
    )]
    pub lora_alpha: f64,
    /// LoRA dropout (the tutorial's).
    #[arg(
        long = "lora_dropout",
        alias = "lora-dropout",
        value_name = "X",
        default_value_t = 0.1
    )]
    pub lora_dropout: f64,
    /// Modules with adapters (space- or comma-separated), or all-linear.
    #[arg(long = "lora_target_modules", alias = "lora-target-modules", value_name = "M",
          num_args = 1.., value_delimiter = ',', default_values = ["q_proj", "k_proj", "v_proj"])]
    pub lora_target_modules: Vec<String>,
    /// Base weights' dtype: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA).
    #[arg(
        long,
        alias = "torch_dtype",
        alias = "torch-dtype",
        value_name = "DTYPE"
    )]
    pub dtype: Option<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: String,
    /// synthetic (random ids of exactly seq_len) or a JSON/JSONL file of records
    /// (alpaca, sharegpt, messages, text or {"input_ids": [...]}).
    #[arg(long, aliases = ["data_files", "data-files"], value_name = "synthetic|PATH", default_value = "synthetic")]
    pub data: String,
    /// Use the first N records of --data PATH (default: all).
    #[arg(long = "num_records", aliases = ["num-records", "max_samples", "max-samples"], value_name = "N")]
    pub num_records: Option<usize>,
    /// Recompute each layer's activations in the backward pass.
    #[arg(long = "gradient_checkpointing", alias = "gradient-checkpointing", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(),
        hide_possible_values = true)]
    pub gradient_checkpointing: bool,
    /// Each batch as one unpadded row, positions restarting per sequence, attention kept within each.
    #[arg(long = "padding_free", alias = "padding-free", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(),
        hide_possible_values = true)]
    pub padding_free: bool,
    /// Compute padded batches on their real tokens only (SFTConfig's unpad_batches; false: dense padded compute).
    #[arg(long = "unpad_batches", alias = "unpad-batches", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", default_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(),
        hide_possible_values = true)]
    pub unpad_batches: bool,
    /// Pack records into seq_len blocks (TRL's packing; bfd implies padding-free batches).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", action = ArgAction::Set, value_parser = BoolishValueParser::new(),
        hide_possible_values = true)]
    pub packing: bool,
    /// bfd, bfd_split or wrapped.
    #[arg(long = "packing_strategy", alias = "packing-strategy", value_name = "S", default_value = "bfd",
          value_parser = |s: &str| s.parse::<PackingStrategy>())]
    pub packing_strategy: PackingStrategy,
    /// Learning rate (the tutorial's).
    #[arg(
        long = "learning_rate",
        alias = "learning-rate",
        value_name = "X",
        default_value_t = 5e-4
    )]
    pub learning_rate: f64,
    /// Model init, LoRA init, synthetic data.
    #[arg(long, value_name = "N", default_value_t = 42)]
    pub seed: u64,
    /// CPU threads for libtorch (default: libtorch's own choice).
    #[arg(long = "num_threads", alias = "num-threads", value_name = "N")]
    pub num_threads: Option<i32>,
    /// Peak TFLOP/s for MFU (default 989 on CUDA: H100/H200 dense bf16).
    #[arg(long = "peak_tflops", alias = "peak-tflops", value_name = "X")]
    pub peak_tflops: Option<f64>,
    /// Write the tokenized training records as JSON ({"input_ids", "labels"} each),
    /// so another implementation can train on exactly the same ids.
    #[arg(long = "dump_dataset", alias = "dump-dataset", value_name = "PATH")]
    pub dump_dataset: Option<PathBuf>,
    /// QLoRA: quantize the base's linear layers to 4 bits (bitsandbytes NF4/FP4) while loading
    /// or initialising, one layer at a time.
    #[arg(long = "load_in_4bit", alias = "load-in-4bit", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), hide_possible_values = true)]
    pub load_in_4bit: bool,
    /// nf4 or fp4 (with --load_in_4bit).
    #[arg(long = "bnb_4bit_quant_type", alias = "bnb-4bit-quant-type", value_name = "T",
          default_value = "nf4", value_parser = ["nf4", "fp4"])]
    pub bnb_4bit_quant_type: String,
    /// Nested quantization of the 4-bit absmax values (with --load_in_4bit).
    #[arg(long = "use_bnb_nested_quant", alias = "use-bnb-nested-quant", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), hide_possible_values = true)]
    pub use_bnb_nested_quant: bool,
    /// sft (SFTTrainer, the tutorial's recipe) or dpo (DPOTrainer on a preference file; the
    /// reference is the base with the LoRA adapters disabled, no second copy).
    #[arg(long, value_name = "sft|dpo", default_value = "sft", value_parser = ["sft", "dpo"])]
    pub method: String,
    /// Print one JSON object on stdout instead of the report.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true",
          default_value = "false", action = ArgAction::Set, value_parser = BoolishValueParser::new(),
        hide_possible_values = true)]
    pub json: bool,
}

impl BenchArgs {
    /// The checks clap's types cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if self.batch_size == 0 || self.seq_len < 2 {
            bail!("--batch_size must be at least 1 and --seq_len at least 2");
        }
        if self.num_threads.is_some_and(|n| n < 1) {
            bail!("--num_threads must be at least 1");
        }
        if self.lora_target_modules.iter().all(|m| m.is_empty()) {
            bail!("--lora_target_modules expects module names or all-linear");
        }
        if self.method == "dpo" {
            if self.data == "synthetic" {
                bail!("--method dpo needs --data PATH to a preference file (e.g. data/demo_dpo.json); synthetic ids have no chosen/rejected pairs");
            }
            // SFT-only layouts: refused by name rather than silently ignored.
            for (set, flag) in [
                (self.packing, "--packing"),
                (self.padding_free, "--padding_free"),
                (!self.unpad_batches, "--unpad_batches false"),
                (self.dump_dataset.is_some(), "--dump_dataset"),
            ] {
                if set {
                    bail!("{flag} is not supported with --method dpo (it benchmarks padded preference batches); remove it");
                }
            }
        }
        Ok(())
    }
}

/// A path in the repository: relative to the working directory, else to the
/// source tree the binary was built from (so tests and `make` work from anywhere).
fn repo_path(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if built.exists() {
        built
    } else {
        here
    }
}

/// The `small` preset: the tiny model's config (tokenizer ids, rotary settings)
/// widened to hidden 512, 8 layers, 8 heads (2 key/value heads), head_dim 64,
/// intermediate 1536, vocabulary 2048 — about 26 M parameters, a CPU-sized GLM-4.
pub fn small_config() -> Result<GlmConfig> {
    let mut cfg = GlmConfig::from_pretrained(repo_path(TINY_DIR))?;
    cfg.hidden_size = 512;
    cfg.num_hidden_layers = 8;
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = 2;
    cfg.head_dim = 64;
    cfg.intermediate_size = 1536;
    cfg.vocab_size = 2048;
    Ok(cfg)
}

/// Resolves `--model_config`: a preset name, a config.json, or a model directory.
/// Returns the config and the directory to load weights from (when there is one).
pub fn resolve_config(name: &str) -> Result<(GlmConfig, Option<PathBuf>)> {
    match name {
        "glm-4-9b" | "glm4-9b" | "glm-4-9b-hf" => Ok((GlmConfig::glm4_9b(), None)),
        "small" => Ok((small_config()?, None)),
        "tiny" => {
            let dir = repo_path(TINY_DIR);
            Ok((GlmConfig::from_pretrained(&dir)?, Some(dir)))
        }
        path => {
            let p = PathBuf::from(path);
            if !p.exists() {
                bail!(
                    "--model_config {path:?} is neither a preset (glm-4-9b, small, tiny) nor an existing config.json or model directory"
                );
            }
            let cfg = GlmConfig::from_pretrained(&p)?;
            let dir = if p.is_dir() { Some(p) } else { None };
            Ok((cfg, dir))
        }
    }
}

/// SplitMix64: the same stream in `scripts/bench_trl.py`, so both sides can
/// train on identical synthetic ids.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `count` records of exactly `seq_len` ids drawn uniformly from `0..vocab`.
pub fn synthetic_records(count: usize, seq_len: usize, vocab: i64, seed: u64) -> Dataset {
    let mut rng = SplitMix64::new(seed);
    let records = (0..count)
        .map(|index| {
            let ids: Vec<i64> = (0..seq_len)
                .map(|_| (rng.next_u64() % vocab as u64) as i64)
                .collect();
            Record {
                value: json!({ "input_ids": ids }),
                origin: Origin {
                    file: PathBuf::from("<synthetic>"),
                    index,
                    line: None,
                },
            }
        })
        .collect();
    Dataset { records }
}

/// Step timestamps and token counts, shared between the callback and `run_bench`.
#[derive(Debug, Default)]
struct Timings {
    /// `(global_step, time, tokens seen)` at the end of every step.
    ends: Vec<(usize, Instant, i64)>,
    /// Step begins, for per-step durations (excludes the loop's bookkeeping between steps).
    begins: Vec<(usize, Instant)>,
    /// After clipping, before the optimizer update (`on_pre_optimizer_step`).
    pre_optimizer: Vec<(usize, Instant)>,
    /// After the optimizer update (`on_optimizer_step`).
    optimizer: Vec<(usize, Instant)>,
    /// `(global_step, CPU seconds of this process)` at the end of every step:
    /// unlike wall time, barely moved by other processes on a busy machine.
    cpu_ends: Vec<(usize, f64)>,
}

/// User + system CPU seconds of this process so far.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

impl Timings {
    /// Mean seconds of three phases over the measured steps (those starting at
    /// `from`): forward + backward (with collation and clipping), the optimizer
    /// update, and the rest of the step (zero_grad, bookkeeping).
    fn phases(&self, from: usize) -> Option<(f64, f64, f64)> {
        let at =
            |v: &[(usize, Instant)], s: usize| v.iter().find(|(k, _)| *k == s).map(|(_, t)| *t);
        let mut sums = (0.0, 0.0, 0.0);
        let mut n = 0;
        for &(s, begin) in self.begins.iter().filter(|(s, _)| *s >= from) {
            let (Some(pre), Some(opt), Some(end)) = (
                at(&self.pre_optimizer, s),
                at(&self.optimizer, s),
                self.ends
                    .iter()
                    .find(|(k, _, _)| *k == s + 1)
                    .map(|(_, t, _)| *t),
            ) else {
                continue;
            };
            sums.0 += (pre - begin).as_secs_f64();
            sums.1 += (opt - pre).as_secs_f64();
            sums.2 += (end - opt).as_secs_f64();
            n += 1;
        }
        (n > 0).then(|| (sums.0 / n as f64, sums.1 / n as f64, sums.2 / n as f64))
    }
}

/// Records when each optimizer step begins and ends. On CUDA it synchronises
/// first, so a timestamp is taken after the GPU finished the step's work.
struct TimingCallback {
    timings: Rc<RefCell<Timings>>,
    cuda: Option<i64>,
}

impl TimingCallback {
    fn sync(&self) {
        if let Some(i) = self.cuda {
            tch::Cuda::synchronize(i);
        }
    }
}

impl TrainerCallback for TimingCallback {
    fn on_step_begin(
        &mut self,
        _a: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        self.sync();
        self.timings
            .borrow_mut()
            .begins
            .push((state.global_step, Instant::now()));
    }

    fn on_pre_optimizer_step(
        &mut self,
        _a: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        self.sync();
        self.timings
            .borrow_mut()
            .pre_optimizer
            .push((state.global_step, Instant::now()));
    }

    fn on_optimizer_step(
        &mut self,
        _a: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        self.sync();
        self.timings
            .borrow_mut()
            .optimizer
            .push((state.global_step, Instant::now()));
    }

    fn on_step_end(
        &mut self,
        _a: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        self.sync();
        let mut timings = self.timings.borrow_mut();
        timings.ends.push((
            state.global_step,
            Instant::now(),
            state.num_input_tokens_seen,
        ));
        timings
            .cpu_ends
            .push((state.global_step, process_cpu_seconds()));
    }
}

/// `(VmHWM, VmRSS)` of this process in MiB, from `/proc/self/status`.
pub fn rss_mb() -> (Option<f64>, Option<f64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Samples the GPU's `memory.used` every 100 ms through a child `nvidia-smi -lms 100`
/// and keeps the maximum (MiB). See the module docs for what this number means.
struct GpuMemoryMonitor {
    child: Child,
    max_mib: Arc<AtomicU64>,
    first_mib: Arc<AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl GpuMemoryMonitor {
    fn start(index: usize) -> Option<Self> {
        let mut child = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
                "-i",
                &index.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let max_mib = Arc::new(AtomicU64::new(0));
        let first_mib = Arc::new(AtomicU64::new(u64::MAX));
        let (max2, first2) = (max_mib.clone(), first_mib.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = line.trim().parse::<u64>() {
                    let _ =
                        first2.compare_exchange(u64::MAX, v, Ordering::SeqCst, Ordering::SeqCst);
                    max2.fetch_max(v, Ordering::SeqCst);
                }
            }
        });
        Some(Self {
            child,
            max_mib,
            first_mib,
            reader: Some(reader),
        })
    }

    /// Waits for at least one sample (nvidia-smi takes a moment to start).
    fn wait_first(&self) {
        let t0 = Instant::now();
        while self.first_mib.load(Ordering::SeqCst) == u64::MAX && t0.elapsed().as_secs_f64() < 5.0
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// `(first sample, maximum)` in MiB; stops the sampler.
    fn finish(mut self) -> (Option<u64>, Option<u64>) {
        // One more sampling period so the last step's memory is seen.
        std::thread::sleep(std::time::Duration::from_millis(250));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let first = self.first_mib.load(Ordering::SeqCst);
        let max = self.max_mib.load(Ordering::SeqCst);
        (
            (first != u64::MAX).then_some(first),
            (max > 0).then_some(max),
        )
    }
}

/// Token slots the model computes over one epoch of sequential batches, and the
/// share of them that is padding: a padded batch costs `rows × longest`, a
/// padding-free one only its tokens.
fn token_slots(lens: &[usize], batch_size: usize, padding_free: bool) -> (usize, f64) {
    let tokens: usize = lens.iter().sum();
    let slots: usize = if padding_free {
        tokens
    } else {
        lens.chunks(batch_size.max(1))
            .map(|b| b.len() * b.iter().copied().max().unwrap_or(0))
            .sum()
    };
    (slots, 1.0 - tokens as f64 / slots.max(1) as f64)
}

/// Results of one benchmark run (what `--json` prints).
#[allow(clippy::too_many_arguments)]
fn report(
    a: &BenchArgs,
    cfg: &GlmConfig,
    device: Device,
    kind: Kind,
    trainable: i64,
    tokens_per_record: (usize, usize, f64),
    slots: (usize, f64),
    timings: &Timings,
    setup_s: f64,
    train_s: f64,
    rss_after_model: Option<f64>,
    gpu: Option<(Option<u64>, Option<u64>)>,
    train_loss: Option<f64>,
) -> Result<Value> {
    let ends = &timings.ends;
    // The end of the last warm-up step (or the first begin when there is no warm-up).
    let start = if a.warmup == 0 {
        timings.begins.first().map(|(_, t)| (*t, 0i64))
    } else {
        ends.iter()
            .find(|(s, _, _)| *s == a.warmup)
            .map(|(_, t, n)| (*t, *n))
    };
    let (Some((t0, n0)), Some(&(last_step, t1, n1))) = (start, ends.last()) else {
        bail!("training ended before any measured step");
    };
    let measured_steps = last_step.saturating_sub(a.warmup);
    if measured_steps == 0 {
        bail!("training stopped after {last_step} steps, before the measured ones");
    }
    let seconds = (t1 - t0).as_secs_f64();
    let tokens = n1 - n0;
    let cpu_at = |step: usize| {
        timings
            .cpu_ends
            .iter()
            .find(|(s, _)| *s == step)
            .map(|(_, c)| *c)
    };
    let cpu_seconds = match (cpu_at(a.warmup), cpu_at(last_step)) {
        (Some(c0), Some(c1)) if a.warmup > 0 => Some(c1 - c0),
        _ => None,
    };
    let tps = tokens as f64 / seconds;
    let step_seconds: Vec<f64> = timings
        .begins
        .iter()
        .filter(|(s, _)| *s >= a.warmup)
        .filter_map(|(s, b)| {
            ends.iter()
                .find(|(e, _, _)| *e == s + 1)
                .map(|(_, t, _)| (*t - *b).as_secs_f64())
        })
        .collect();
    let mut sorted = step_seconds.clone();
    sorted.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    let median = sorted.get(sorted.len() / 2).copied();
    let n_params = cfg.num_parameters();
    let flops_per_token = 4.0 * n_params as f64;
    let peak = a
        .peak_tflops
        .or_else(|| matches!(device, Device::Cuda(_)).then_some(H100_BF16_PEAK_TFLOPS));
    let mfu = peak.map(|p| tps * flops_per_token / (p * 1e12));
    let (peak_rss, _) = rss_mb();
    let (gpu_first, gpu_max) = gpu.unwrap_or((None, None));
    const MIB: f64 = 1024.0 * 1024.0;
    // None on CPU-only machines; an error reading them is reported, not fatal.
    let cuda_mem = trl_like::ops::cuda_memory_stats().unwrap_or_else(|e| {
        log::warn!("{e}");
        None
    });
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    let fields: Vec<(&str, Value)> = vec![
        ("side", json!("rust")),
        ("implementation", json!("glm4 (tch-rs, libtorch)")),
        ("method", json!(a.method)),
        // DPO's reference forward: the same weights with the adapters switched off.
        ("reference_model", json!((a.method == "dpo").then_some("adapters disabled (no copy)"))),
        ("model_config", json!(a.model_config)),
        ("num_parameters", json!(n_params)),
        ("trainable_parameters", json!(trainable)),
        ("hidden_size", json!(cfg.hidden_size)),
        ("num_hidden_layers", json!(cfg.num_hidden_layers)),
        ("vocab_size", json!(cfg.vocab_size)),
        ("dtype", json!(TorchDtype::from_kind(kind).as_str())),
        ("device", json!(format!("{device:?}"))),
        ("gpu_name", json!(runtime::gpu_names().into_iter().next())),
        ("num_threads", json!(tch::get_num_threads())),
        ("batch_size", json!(a.batch_size)),
        ("seq_len", json!(a.seq_len)),
        ("data", json!(a.data)),
        ("num_records", json!(tokens_per_record.0)),
        ("dataset_tokens", json!(tokens_per_record.1)),
        ("mean_record_tokens", json!(round(tokens_per_record.2, 1))),
        ("lora_r", json!(a.lora_r)),
        ("lora_alpha", json!(a.lora_alpha)),
        ("lora_dropout", json!(a.lora_dropout)),
        ("lora_target_modules", json!(a.lora_target_modules)),
        ("gradient_checkpointing", json!(a.gradient_checkpointing)),
        ("padding_free", json!(a.padding_free)),
        ("unpad_batches", json!(a.unpad_batches)),
        ("packing", json!(a.packing)),
        ("packing_strategy", json!(a.packing.then(|| a.packing_strategy.as_str()))),
        ("token_slots_per_epoch", json!(slots.0)),
        ("padding_fraction", json!(round(slots.1, 4))),
        ("warmup_steps", json!(a.warmup)),
        ("measured_steps", json!(measured_steps)),
        ("measured_tokens", json!(tokens)),
        ("measured_seconds", json!(round(seconds, 4))),
        ("measured_cpu_seconds", json!(cpu_seconds.map(|c| round(c, 3)))),
        ("tokens_per_second", json!(round(tps, 2))),
        ("seconds_per_step", json!(round(seconds / measured_steps as f64, 4))),
        ("median_step_seconds", json!(median.map(|m| round(m, 4)))),
        ("step_seconds", json!(step_seconds.iter().map(|s| round(*s, 4)).collect::<Vec<_>>())),
        ("phase_seconds", json!(timings.phases(a.warmup).map(|(fb, opt, rest)| json!({
            "forward_backward": round(fb, 4), "optimizer": round(opt, 4), "rest": round(rest, 4)
        })))),
        ("train_loss", json!(train_loss)),
        ("setup_seconds", json!(round(setup_s, 2))),
        ("train_seconds", json!(round(train_s, 2))),
        ("peak_rss_mb", json!(peak_rss.map(|m| round(m, 1)))),
        ("rss_after_model_mb", json!(rss_after_model.map(|m| round(m, 1)))),
        ("gpu_memory_used_max_mb", json!(gpu_max)),
        ("gpu_memory_used_before_mb", json!(gpu_first)),
        ("gpu_memory_note", json!(gpu.map(|_| "nvidia-smi memory.used of the whole GPU, max of 100 ms samples (≈ caching allocator's peak reserved + CUDA context)"))),
        // The caching allocator's own counters, as bench_trl.py reads them from torch.cuda.
        ("cuda_max_memory_allocated_mb", json!(cuda_mem.map(|m| (m.peak_allocated as f64 / MIB).round()))),
        ("cuda_max_memory_reserved_mb", json!(cuda_mem.map(|m| (m.peak_reserved as f64 / MIB).round()))),
        ("flops_per_token", json!(flops_per_token)),
        ("peak_tflops", json!(peak)),
        ("mfu", json!(mfu.map(|m| round(m, 4)))),
    ];
    Ok(Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    ))
}

fn print_report(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "glm4 bench — {} ({:.1} M parameters, {} trainable), {} on {}",
        r["model_config"].as_str().unwrap_or("?"),
        f("num_parameters") / 1e6,
        r["trainable_parameters"],
        r["dtype"].as_str().unwrap_or("?"),
        r["device"].as_str().unwrap_or("?")
    );
    println!(
        "  batch {} x seq_len {}, data {}, LoRA r {} on {}, gradient_checkpointing {}, {} threads",
        r["batch_size"],
        r["seq_len"],
        r["data"].as_str().unwrap_or("?"),
        r["lora_r"],
        r["lora_target_modules"]
            .as_array()
            .map(|v| v
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
        r["gradient_checkpointing"],
        r["num_threads"]
    );
    println!(
        "  batches            {}{}, {:.1} % of the token slots are padding",
        match (
            r["padding_free"].as_bool() == Some(true),
            r["unpad_batches"].as_bool() != Some(false),
        ) {
            (true, _) => "padding-free",
            (false, true) => "padded (computed unpadded)",
            (false, false) => "padded (dense compute)",
        },
        r["packing_strategy"]
            .as_str()
            .map(|s| format!(", packed ({s})"))
            .unwrap_or_default(),
        100.0 * r["padding_fraction"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "  measured steps     {} (after {} warm-up)",
        r["measured_steps"], r["warmup_steps"]
    );
    println!("  tokens/s           {:.1}", f("tokens_per_second"));
    println!(
        "  s/step             {:.4} (median {:.4})",
        f("seconds_per_step"),
        f("median_step_seconds")
    );
    println!(
        "  peak RSS           {:.1} MB (after model creation {:.1} MB)",
        f("peak_rss_mb"),
        f("rss_after_model_mb")
    );
    if let Some(g) = r["gpu_memory_used_max_mb"].as_f64() {
        println!(
            "  GPU memory used    {g:.0} MiB max (before the model {} MiB; nvidia-smi samples, ≈ peak reserved + context)",
            r["gpu_memory_used_before_mb"]
        );
    }
    if let (Some(a), Some(b)) = (
        r["cuda_max_memory_allocated_mb"].as_f64(),
        r["cuda_max_memory_reserved_mb"].as_f64(),
    ) {
        println!("  CUDA allocator     {a:.0} MiB max allocated, {b:.0} MiB max reserved");
    }
    if let Some(m) = r["mfu"].as_f64() {
        println!(
            "  MFU                {:.1} % (4·N FLOPs/token, peak {} TFLOP/s)",
            m * 100.0,
            r["peak_tflops"]
        );
    }
    if let Some(p) = r["phase_seconds"].as_object() {
        let g = |k: &str| p.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        println!(
            "  per step           forward+backward {:.4} s, optimizer {:.4} s, rest {:.4} s",
            g("forward_backward"),
            g("optimizer"),
            g("rest")
        );
    }
    if let Some(l) = r["train_loss"].as_f64() {
        println!("  train loss         {l:.4}");
    }
}

/// `glm4 bench ...`.
pub fn run_bench(a: BenchArgs) -> Result<()> {
    a.validate()?;
    let t_setup = Instant::now();
    if let Some(n) = a.num_threads {
        tch::set_num_threads(n);
    }
    let (cfg, weights_dir) = resolve_config(&a.model_config)?;
    let device = runtime::parse_device(&a.device)?;
    let kind = match a.dtype.as_deref() {
        None | Some("auto") => {
            if device == Device::Cpu {
                Kind::Float
            } else {
                Kind::BFloat16
            }
        }
        Some(name) => TorchDtype::from_name(name)
            .and_then(TorchDtype::to_kind)
            .with_context(|| {
                format!("--dtype {name:?} is not one of float32, bfloat16, float16")
            })?,
    };
    if device == Device::Cpu && kind != Kind::Float {
        log::info!(
            "note: {kind:?} matmuls on CPUs without AMX/AVX512-BF16 are far slower than float32"
        );
    }
    let has_weights = weights_dir.as_ref().is_some_and(|d| {
        d.join("model.safetensors").exists() || d.join("model.safetensors.index.json").exists()
    });
    if !a.random_init && !has_weights {
        bail!("--model_config {}: no weights to load here; pass --random_init to benchmark this shape with random weights", a.model_config);
    }

    let gpu_monitor = match device {
        Device::Cuda(i) => GpuMemoryMonitor::start(i),
        _ => None,
    };
    if let Some(m) = &gpu_monitor {
        m.wait_first();
    }

    let tokenizer = glm4::load_tokenizer(&repo_path(TINY_DIR))?;
    let dataset = if a.data == "synthetic" {
        // Enough distinct sequences that no measured step repeats a batch.
        let count = a.batch_size * (a.warmup + a.steps);
        synthetic_records(count, a.seq_len, cfg.vocab_size, a.seed)
    } else {
        let path = PathBuf::from(&a.data);
        if !path.exists() {
            bail!("--data {}: no such file (or use --data synthetic)", a.data);
        }
        let mut ds = Dataset::from_json_files(&[path])?;
        if let Some(n) = a.num_records {
            ds.records.truncate(n);
        }
        ds
    };

    let quant = a.load_in_4bit.then(|| trl_like::quant::Quant4bitConfig {
        quant_type: trl_like::quant::QuantType::parse(&a.bnb_4bit_quant_type)
            .unwrap_or(trl_like::quant::QuantType::Nf4),
        nested: a.use_bnb_nested_quant,
    });
    let mut model = if a.random_init {
        let m = GlmForCausalLM::new_quantized(cfg.clone(), device, kind, quant);
        m.init_random(a.seed as i64);
        m
    } else {
        let dir = weights_dir.clone().expect("checked above");
        GlmForCausalLM::from_pretrained_quantized(&dir, Some(kind), device, quant)?
    };
    // LoRA trains the adapters only. `new` + `init_random` leaves the base weights
    // trainable (only `from_pretrained` freezes them), and the trainer does not
    // freeze them either, so without this every step would also compute (and
    // keep) a gradient for all N base weights.
    model.vs.freeze();
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let (_, rss_after_model) = rss_mb();
    // Printed at once: a 9B model's memory is worth knowing before (or without) a step.
    let model_mb = model
        .vs
        .variables()
        .values()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as f64)
        .sum::<f64>()
        / 1e6;
    eprintln!(
        "model memory after load: {model_mb:.1} MB of tensors{} (process RSS {} MB)",
        if quant.is_some() {
            ", linear layers 4-bit"
        } else {
            ""
        },
        rss_after_model.map_or("?".to_string(), |m| format!("{m:.1}"))
    );

    let targets = if a.lora_target_modules.iter().any(|m| m == "all-linear") {
        TargetModules::AllLinear
    } else {
        TargetModules::Names(a.lora_target_modules.clone())
    };
    let lora = LoraConfig::new(a.lora_r, a.lora_alpha, a.lora_dropout, targets);
    let output_dir = std::env::temp_dir().join(format!("glm4-bench-{}", std::process::id()));
    // The same loop settings for both methods; each config fills the rest with its own defaults.
    let training_args = |defaults: TrainingArguments| TrainingArguments {
        output_dir: output_dir.display().to_string(),
        max_steps: (a.warmup + a.steps) as i64,
        per_device_train_batch_size: a.batch_size,
        gradient_accumulation_steps: 1,
        learning_rate: a.learning_rate,
        bf16: Some(kind == Kind::BFloat16),
        gradient_checkpointing: a.gradient_checkpointing,
        logging_strategy: IntervalStrategy::No,
        eval_strategy: IntervalStrategy::No,
        save_strategy: SaveStrategy::No,
        report_to: vec!["none".into()],
        disable_tqdm: true,
        train_sampling_strategy: SamplingStrategy::Sequential,
        seed: a.seed,
        use_cpu: device == Device::Cpu,
        ..defaults
    };
    let timings = Rc::new(RefCell::new(Timings::default()));
    let callback = TimingCallback {
        timings: timings.clone(),
        cuda: match device {
            Device::Cuda(i) => Some(i as i64),
            _ => None,
        },
    };
    let finish = |a: &BenchArgs,
                  trainable: i64,
                  record_stats: (usize, usize, f64),
                  slots: (usize, f64),
                  setup_s: f64,
                  train_s: f64,
                  gpu: Option<(Option<u64>, Option<u64>)>,
                  loss: f64|
     -> Result<()> {
        let r = report(
            a,
            &cfg,
            device,
            kind,
            trainable,
            record_stats,
            slots,
            &timings.borrow(),
            setup_s,
            train_s,
            rss_after_model,
            gpu,
            Some(loss),
        )?;
        if a.json {
            println!("{r}");
        } else {
            print_report(&r);
        }
        Ok(())
    };
    if a.method == "dpo" {
        let args = DPOConfig {
            args: training_args(DPOConfig::default().args),
            max_length: Some(a.seq_len),
            ..DPOConfig::default()
        };
        let mut trainer = DPOTrainer::builder(model, args)
            .train_dataset(&dataset)
            .processing_class(tokenizer)
            .peft_config(Some(lora))
            .callbacks(vec![Box::new(callback)])
            .build()?;
        let (trainable, _) = trainer.trainable_parameters();
        // Each pair is two rows (prompt + chosen, prompt + rejected), padded per batch of 2 × batch_size.
        let lens: Vec<usize> = trainer
            .train_dataset
            .iter()
            .flat_map(|p| {
                let n = p.prompt_ids.len();
                [n + p.chosen_ids.len(), n + p.rejected_ids.len()]
            })
            .collect();
        let total: usize = lens.iter().sum();
        let pairs = trainer.train_dataset.len();
        let record_stats = (pairs, total, total as f64 / pairs.max(1) as f64);
        let slots = token_slots(&lens, 2 * a.batch_size, false);
        let setup_s = t_setup.elapsed().as_secs_f64();
        let t_train = Instant::now();
        let out = trainer.train();
        let train_s = t_train.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&output_dir);
        let out = out?;
        let gpu = gpu_monitor.map(GpuMemoryMonitor::finish);
        return finish(
            &a,
            trainable,
            record_stats,
            slots,
            setup_s,
            train_s,
            gpu,
            out.training_loss,
        );
    }
    let args = SFTConfig {
        args: training_args(SFTConfig::default().args),
        max_length: Some(a.seq_len),
        padding_free: a.padding_free,
        unpad_batches: a.unpad_batches,
        packing: a.packing,
        packing_strategy: a.packing_strategy,
        ..SFTConfig::default()
    };
    let mut trainer = SFTTrainer::builder(model, args)
        .train_dataset(&dataset)
        .processing_class(tokenizer)
        .peft_config(Some(lora))
        .callbacks(vec![Box::new(callback)])
        .build()?;
    let (trainable, _) = trainer.trainable_parameters();
    let lens: Vec<usize> = trainer
        .train_dataset
        .iter()
        .map(|e| e.input_ids.len())
        .collect();
    let total_tokens: usize = lens.iter().sum();
    let record_stats = (
        lens.len(),
        total_tokens,
        total_tokens as f64 / lens.len().max(1) as f64,
    );
    let slots = token_slots(&lens, a.batch_size, trainer.args.uses_padding_free());
    // Packing with bfd implies padding-free batches: report what ran.
    let a = BenchArgs {
        padding_free: trainer.args.uses_padding_free(),
        ..a
    };
    if let Some(path) = &a.dump_dataset {
        let records: Vec<Value> = trainer
            .train_dataset
            .iter()
            .map(|e| json!({"input_ids": e.input_ids, "labels": e.labels}))
            .collect();
        std::fs::write(path, serde_json::to_string(&records)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let setup_s = t_setup.elapsed().as_secs_f64();

    let t_train = Instant::now();
    let out = trainer.train();
    let train_s = t_train.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&output_dir);
    let out = out?;
    let gpu = gpu_monitor.map(GpuMemoryMonitor::finish);
    finish(
        &a,
        trainable,
        record_stats,
        slots,
        setup_s,
        train_s,
        gpu,
        out.training_loss,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(s: &str) -> Result<BenchArgs, clap::Error> {
        use clap::Parser;
        BenchArgs::try_parse_from(std::iter::once("bench").chain(s.split_whitespace()))
    }

    #[test]
    fn parses_flags_lists_and_bare_switches() {
        let a = parse_args(
            "--model_config small --random_init --steps 5 --lora-target-modules q_proj v_proj --json --seq_len=64 --gradient_checkpointing true",
        )
        .unwrap();
        assert!(a.random_init && a.json && a.gradient_checkpointing);
        assert_eq!((a.steps, a.seq_len), (5, 64));
        assert_eq!(a.lora_target_modules, ["q_proj", "v_proj"]);
        let c = parse_args("--model_config tiny --lora_target_modules q_proj,k_proj").unwrap();
        assert_eq!(c.lora_target_modules, ["q_proj", "k_proj"]);
        assert!(parse_args("--model_config tiny --bogus 1")
            .unwrap_err()
            .to_string()
            .contains("--bogus"));
        assert!(parse_args("--steps 3")
            .unwrap_err()
            .to_string()
            .contains("--model_config"));
        let h = parse_args("--help").unwrap_err();
        assert_eq!(h.kind(), clap::error::ErrorKind::DisplayHelp);
        let b = parse_args("--model_config tiny --json false --random_init=false").unwrap();
        assert!(!b.json && !b.random_init);
        let c = parse_args(
            "--model_config tiny --padding_free true --packing=true --packing_strategy bfd_split",
        )
        .unwrap();
        assert!(c.padding_free && c.packing);
        assert_eq!(c.packing_strategy, PackingStrategy::BfdSplit);
        let e = parse_args("--model_config tiny --packing_strategy best")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--packing_strategy") && e.contains("bfd_split"),
            "{e}"
        );
        let d = parse_args("--model_config tiny --max_steps 2 --max-seq-length 32").unwrap();
        assert_eq!((d.steps, d.seq_len, d.batch_size), (2, 32, 4));
        assert!(parse_args("--model_config tiny --steps 0")
            .unwrap()
            .validate()
            .is_err());
    }

    #[test]
    fn padding_share_of_the_token_slots() {
        // Batches [4, 2] and [3]: padded 8 + 3 slots for 9 tokens.
        let (slots, pad) = token_slots(&[4, 2, 3], 2, false);
        assert_eq!(slots, 11);
        assert!((pad - 2.0 / 11.0).abs() < 1e-12);
        assert_eq!(token_slots(&[4, 2, 3], 2, true), (9, 0.0));
    }

    #[test]
    fn splitmix_matches_the_reference_stream() {
        // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn small_preset_has_the_documented_shape() {
        let c = small_config().unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads
            ),
            (512, 8, 8, 2)
        );
        assert_eq!(
            (c.head_dim, c.intermediate_size, c.vocab_size),
            (64, 1536, 2048)
        );
    }
}
