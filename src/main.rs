//! `glm4`: fine-tune and run GLM-4 from Rust. Thin CLI over the `glm4` and
//! `trl_like` crates; every subcommand mirrors a script of the Python tutorial.

mod bench;
mod dpo;
mod estimate;
mod logger;
mod preview;
mod runtime;
mod sft;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand};
use glm4::glm::{GlmConfig, GlmForCausalLM};
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use tch::Tensor;
use trl_like::config::TorchDtype;
use trl_like::generation::{generate, GenerationConfig};
use trl_like::modeling::PreTrainedModel;
use trl_like::peft::{merge_and_unload, PeftAdapter};
use trl_like::tokenizer::PreTrainedTokenizer;
use trl_like::trainer::output_dir;

#[derive(Parser)]
#[command(
    name = "glm4",
    version,
    about = "Fine-tune and chat with GLM-4 from Rust (tch / libtorch)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print versions, the libtorch in use and the CUDA devices (like `trl env`).
    Env,
    /// Download a model or dataset repository from the Hugging Face Hub into a folder.
    Download(DownloadArgs),
    /// Generate a continuation (or a chat answer with --chat) for one prompt.
    Generate(GenerateArgs),
    /// Interactive multi-turn chat (the tutorial's chat_cli.py); reads one turn per line when piped.
    Chat(ChatArgs),
    /// Supervised fine-tuning (the tutorial's train script): `glm4 sft [--config F.yaml] [--FIELD VALUE ...]`.
    // The flags are a clap command built at run time from the config field tables
    // and the tutorial's defaults (trl_like's TrlParser), so they pass through here.
    #[command(disable_help_flag = true)]
    Sft {
        /// TRL arguments: every SFTConfig / ModelConfig / data field as --name VALUE (see `glm4 sft --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Preference tuning (TRL's DPOTrainer): `glm4 dpo [--config F.yaml] [--FIELD VALUE ...]` on prompt/chosen/rejected pairs.
    #[command(disable_help_flag = true)]
    Dpo {
        /// TRL arguments: every DPOConfig / ModelConfig / data field as --name VALUE (see `glm4 dpo --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show the training data as the model will see it: `glm4 preview [same flags as sft] [--num_examples N] [--json]`.
    #[command(disable_help_flag = true)]
    Preview {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fold a LoRA adapter into the base weights and save a plain transformers checkpoint (PEFT's merge_and_unload).
    Merge(MergeArgs),
    /// Per-GPU memory of a fine-tuning run (weights, gradients, fp32 master, moments, activations):
    /// `glm4 estimate-memory --model_config glm-4-9b --use_peft false --zero_stage 2 --world_size 8`.
    #[command(disable_help_flag = true)]
    EstimateMemory {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Training throughput and peak memory on any GLM-4 shape without weights: `glm4 bench --model_config glm-4-9b --random_init ...`.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// Base model directory.
    #[arg(long = "model_name_or_path", alias = "model-name-or-path")]
    model_name_or_path: PathBuf,
    /// LoRA adapter directory (PEFT format).
    #[arg(long = "adapter_path", alias = "adapter-path")]
    adapter_path: PathBuf,
    /// Where to write the merged checkpoint (a new or empty folder).
    #[arg(long = "output_dir", alias = "output-dir")]
    output_dir: PathBuf,
    /// Replace the model files of a non-empty --output_dir (weights, shards, index, config, tokenizer).
    #[arg(long = "overwrite_output_dir", alias = "overwrite-output-dir")]
    overwrite_output_dir: bool,
    /// Dtype of the merged weights (auto: the base checkpoint's).
    #[arg(
        long = "torch_dtype",
        alias = "torch-dtype",
        visible_alias = "dtype",
        default_value = "auto"
    )]
    torch_dtype: String,
    /// A QLoRA run: merge into the 4-bit base, dequantized (as PEFT merges into bitsandbytes layers).
    #[command(flatten)]
    quant: Quant4bitArgs,
}

#[derive(Args)]
struct DownloadArgs {
    /// Repository id, e.g. THUDM/glm-4-9b-hf.
    repo_id: String,
    /// Folder to put the files in (default: ./weights/<repo name>).
    #[arg(long = "local_dir", alias = "local-dir")]
    local_dir: Option<PathBuf>,
    /// model, dataset or space.
    #[arg(long = "repo_type", alias = "repo-type", default_value = "model")]
    repo_type: String,
    /// Branch, tag or commit.
    #[arg(long)]
    revision: Option<String>,
    /// Access token (default: $HF_TOKEN or the token saved by `huggingface-cli login`).
    #[arg(long)]
    token: Option<String>,
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (config.json, safetensors weights, tokenizer files).
    #[arg(
        long = "model_name_or_path",
        alias = "model-name-or-path",
        default_value = "./weights/glm-4-9b-hf"
    )]
    model_name_or_path: PathBuf,
    /// LoRA adapter directory (PEFT format) to apply on top of the model.
    #[arg(long = "adapter_path", alias = "adapter-path")]
    adapter_path: Option<PathBuf>,
    /// auto, bfloat16, float16 or float32 (auto: the checkpoint's dtype on CUDA, float32 on CPU).
    #[arg(
        long = "torch_dtype",
        alias = "torch-dtype",
        visible_alias = "dtype",
        default_value = "auto"
    )]
    torch_dtype: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    #[command(flatten)]
    quant: Quant4bitArgs,
}

/// The 4-bit base of a QLoRA run (TRL's ModelConfig names).
#[derive(Args)]
struct Quant4bitArgs {
    /// Quantize the linear layers to 4 bits while loading, as bitsandbytes does (QLoRA's base).
    #[arg(long = "load_in_4bit", alias = "load-in-4bit", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    load_in_4bit: bool,
    /// 4-bit data type with --load_in_4bit: nf4 or fp4.
    #[arg(long = "bnb_4bit_quant_type", alias = "bnb-4bit-quant-type", default_value = "nf4", value_parser = ["nf4", "fp4"])]
    bnb_4bit_quant_type: String,
    /// Quantize the 4-bit absmax values again (nested quantization) with --load_in_4bit.
    #[arg(long = "use_bnb_nested_quant", alias = "use-bnb-nested-quant", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    use_bnb_nested_quant: bool,
}

impl Quant4bitArgs {
    /// The 4-bit configuration these flags ask for (`None` without --load_in_4bit).
    fn quantization(&self) -> Option<trl_like::quant::Quant4bitConfig> {
        self.load_in_4bit.then(|| trl_like::quant::Quant4bitConfig {
            quant_type: trl_like::quant::QuantType::parse(&self.bnb_4bit_quant_type)
                .unwrap_or(trl_like::quant::QuantType::Nf4),
            nested: self.use_bnb_nested_quant,
        })
    }
}

#[derive(Args)]
struct SamplingArgs {
    /// Sample instead of greedy decoding.
    #[arg(long = "do_sample", alias = "do-sample", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    do_sample: Option<bool>,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long = "top_p", alias = "top-p")]
    top_p: Option<f64>,
    #[arg(long = "top_k", alias = "top-k")]
    top_k: Option<i64>,
    #[arg(long = "repetition_penalty", alias = "repetition-penalty")]
    repetition_penalty: Option<f64>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: i64,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as one user message through the chat template.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    chat: bool,
    #[arg(
        long = "max_new_tokens",
        alias = "max-new-tokens",
        default_value_t = 256
    )]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print {"prompt_ids", "generated_ids", "text"} as JSON.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Maximum number of tokens in each answer (the tutorial's chat_cli passes its
    /// max_length as max_new_tokens).
    #[arg(long = "max_length", alias = "max-length", default_value_t = 1024)]
    max_length: usize,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long = "top_p", alias = "top-p", default_value_t = 0.8)]
    top_p: f64,
    #[arg(long, default_value_t = 0.6)]
    temperature: f64,
    #[arg(
        long = "repetition_penalty",
        alias = "repetition-penalty",
        default_value_t = 1.2
    )]
    repetition_penalty: f64,
    #[arg(long = "do_sample", alias = "do-sample", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    do_sample: bool,
    #[arg(long, default_value_t = 42)]
    seed: i64,
}

/// Output into a closed pipe (`glm4 preview | head`) ends the program quietly
/// with status 0, as command-line tools treat it. Rust ignores SIGPIPE, so the
/// write fails with EPIPE and `print!` panics; the hook catches exactly that
/// panic. `_exit`: nothing is left to flush into a pipe nobody reads, and exit
/// handlers must not race libtorch threads.
fn exit_quietly_on_broken_pipe() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let epipe = format!("(os error {})", libc::EPIPE);
        if message.starts_with("failed printing to stdout") && message.contains(&epipe) {
            // SAFETY: _exit ends the process without touching Rust state.
            unsafe { libc::_exit(0) };
        }
        default_hook(info);
    }));
}

fn main() {
    logger::init();
    exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Env => cmd_env(),
        Command::Download(a) => cmd_download(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Sft { args } => sft::run_sft(&args),
        Command::Dpo { args } => dpo::run_dpo(&args),
        Command::Preview { args } => preview::run_preview(&args),
        Command::Merge(a) => cmd_merge(a),
        Command::Bench(a) => bench::run_bench(a),
        Command::EstimateMemory { args } => estimate::run(&args),
    };
    if let Err(err) = result {
        // A `write!(stdout)?` into a closed pipe: the same quiet end as in the hook above.
        let broken_pipe = err.chain().any(|e| {
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn cmd_env() -> Result<()> {
    println!("glm4 version: {}", env!("CARGO_PKG_VERSION"));
    println!("tch version: 0.24.0");
    match runtime::loaded_libtorch_dir() {
        Some(dir) => {
            let version = runtime::libtorch_version(&dir).unwrap_or_else(|| "unknown".into());
            println!("libtorch version: {version}");
            println!("libtorch path: {}", dir.display());
        }
        None => println!("libtorch path: unknown"),
    }
    let cuda = tch::Cuda::is_available();
    println!("CUDA available: {cuda}");
    println!("CUDA devices: {}", tch::Cuda::device_count());
    println!("cuDNN available: {}", tch::Cuda::cudnn_is_available());
    for (i, name) in runtime::gpu_names().iter().enumerate() {
        println!("  cuda:{i}: {name}");
    }
    println!("CPU threads: {}", tch::get_num_threads());
    let nccl = trl_like::distributed::Backend::Nccl.is_available();
    println!(
        "c10d backends (torchrun): gloo{}",
        if nccl {
            ", nccl"
        } else {
            " (this build has no NCCL)"
        }
    );
    Ok(())
}

fn cmd_download(a: DownloadArgs) -> Result<()> {
    let local_dir = a.local_dir.unwrap_or_else(|| {
        let name = a.repo_id.rsplit('/').next().unwrap_or(&a.repo_id);
        PathBuf::from("weights").join(name)
    });
    let req = trl_like::hub::SnapshotRequest {
        repo_id: a.repo_id,
        repo_type: a.repo_type,
        revision: a.revision,
        local_dir,
        allow_suffixes: vec![],
        token: a.token,
    };
    let dir = trl_like::hub::snapshot_download(&req)?;
    eprintln!("downloaded {} to {}", req.repo_id, dir.display());
    Ok(())
}

/// Model + tokenizer + generation defaults from a model directory.
struct Loaded {
    model: GlmForCausalLM,
    tokenizer: PreTrainedTokenizer,
    generation: GenerationConfig,
}

fn load(args: &ModelArgs) -> Result<Loaded> {
    let dir = &args.model_name_or_path;
    if !dir.is_dir() {
        bail!(
            "model directory {} does not exist (download GLM-4-9B with `glm4 download THUDM/glm-4-9b-hf --local_dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    let device = runtime::parse_device(&args.device)?;
    let config = GlmConfig::from_pretrained(dir)?;
    let kind = runtime::parse_dtype(&args.torch_dtype, config.checkpoint_dtype(), device)?;
    let mut model = GlmForCausalLM::from_pretrained_quantized(
        dir,
        Some(kind),
        device,
        args.quant.quantization(),
    )?;
    let mut tokenizer = glm4::load_tokenizer(dir)?;
    if let Some(adapter) = &args.adapter_path {
        // Like the tutorial's chat_cli: PeftModel.from_pretrained, and the adapter's
        // tokenizer files when it has them.
        PeftAdapter::load(&mut model, adapter, device, false)?;
        if adapter.join("tokenizer.json").exists() {
            tokenizer = glm4::load_tokenizer(adapter)?;
        }
    }
    let mut generation = GenerationConfig::from_pretrained(dir)?.unwrap_or_default();
    if generation.eos_token_id.is_empty() {
        generation.eos_token_id = model.config.eos_token_ids();
    }
    if generation.eos_token_id.is_empty() {
        generation.eos_token_id.extend(tokenizer.eos_token_id());
    }
    if generation.pad_token_id.is_none() {
        generation.pad_token_id = tokenizer.pad_token_id().or(model.config.pad_token_id);
    }
    Ok(Loaded {
        model,
        tokenizer,
        generation,
    })
}

fn apply_sampling(cfg: &mut GenerationConfig, s: &SamplingArgs) {
    if let Some(v) = s.do_sample {
        cfg.do_sample = v;
    }
    if let Some(v) = s.temperature {
        cfg.temperature = v;
    }
    if let Some(v) = s.top_p {
        cfg.top_p = v;
    }
    if let Some(v) = s.top_k {
        cfg.top_k = v;
    }
    if let Some(v) = s.repetition_penalty {
        cfg.repetition_penalty = v;
    }
    tch::manual_seed(s.seed);
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let Loaded {
        model,
        tokenizer,
        mut generation,
    } = load(&a.model)?;
    apply_sampling(&mut generation, &a.sampling);
    // Greedy unless asked: `generate` is for reproducible answers.
    if a.sampling.do_sample.is_none() {
        generation.do_sample = false;
    }
    generation.max_new_tokens = Some(a.max_new_tokens);
    let prompt_ids = if a.chat {
        tokenizer.apply_chat_template_ids(
            &[json!({"role": "user", "content": a.prompt})],
            None,
            true,
        )?
    } else {
        // Like `tokenizer.encode(prompt)`: the tokenizer's own special tokens are added.
        tokenizer.encode(&a.prompt, true)?
    };
    let input = Tensor::from_slice(&prompt_ids).unsqueeze(0);
    let out = generate(&model, &input, None, &generation, None)?;
    let all: Vec<i64> = Vec::try_from(out.sequences.get(0)).context("reading generated ids")?;
    let generated = &all[prompt_ids.len()..];
    // Drop the pad filler after an early stop, keep the stop token itself.
    let stop = generated
        .iter()
        .position(|t| generation.eos_token_id.contains(t))
        .map_or(generated.len(), |i| i + 1);
    let generated = &generated[..stop];
    let text = tokenizer.decode(generated, true)?;
    if a.json {
        println!(
            "{}",
            json!({"prompt_ids": prompt_ids, "generated_ids": generated, "text": text})
        );
    } else {
        println!("{text}");
    }
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let Loaded {
        model,
        tokenizer,
        mut generation,
    } = load(&a.model)?;
    generation.do_sample = a.do_sample;
    generation.top_p = a.top_p;
    generation.temperature = a.temperature;
    generation.repetition_penalty = a.repetition_penalty;
    generation.max_new_tokens = Some(a.max_length);
    tch::manual_seed(a.seed);
    let interactive = std::io::stdin().is_terminal();
    let mut history: Vec<serde_json::Value> = Vec::new();
    if let Some(system) = &a.system {
        history.push(json!({"role": "system", "content": system}));
    }
    if interactive {
        eprintln!("GLM-4 chat — type a message; `exit` or `quit` to leave, `clear` to start over.");
    }
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut raw = Vec::new();
    for line_number in 1u64.. {
        if interactive {
            eprint!("\n用户: ");
        }
        raw.clear();
        if stdin.lock().read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        // One undecodable line (a paste in another encoding) must not end the session.
        let Ok(line) = std::str::from_utf8(&raw) else {
            eprintln!("input line {line_number} is not valid UTF-8 text: skipped (send UTF-8)");
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "exit" || line == "quit" {
            break;
        }
        if line == "clear" {
            history.retain(|m| m["role"] == "system");
            continue;
        }
        history.push(json!({"role": "user", "content": line}));
        let prompt_ids = tokenizer.apply_chat_template_ids(&history, None, true)?;
        if interactive {
            eprint!("GLM-4: ");
        }
        let mut answer_ids: Vec<i64> = Vec::new();
        let mut decoder = tokenizer.decode_stream(true);
        let eos = generation.eos_token_id.clone();
        let mut stream = |ids: &[i64]| {
            let id = ids[0];
            if eos.contains(&id) {
                return;
            }
            answer_ids.push(id);
            // Each token is decoded once; a character split over tokens comes out whole.
            if let Ok(Some(text)) = decoder.step(id) {
                let _ = write!(stdout, "{text}");
                let _ = stdout.flush();
            }
        };
        let input = Tensor::from_slice(&prompt_ids).unsqueeze(0);
        generate(&model, &input, None, &generation, Some(&mut stream))?;
        if let Some(rest) = decoder.finish()? {
            write!(stdout, "{rest}")?;
        }
        writeln!(stdout)?;
        stdout.flush()?;
        let answer = tokenizer.decode(&answer_ids, true)?;
        // Stored stripped, as the tutorial's chat_cli keeps its history.
        history.push(json!({"role": "assistant", "content": answer.trim()}));
    }
    Ok(())
}

fn cmd_merge(a: MergeArgs) -> Result<()> {
    let dir = &a.model_name_or_path;
    for (flag, path) in [
        ("--model_name_or_path", dir),
        ("--adapter_path", &a.adapter_path),
    ] {
        if !path.is_dir() {
            bail!("{flag} {}: the directory does not exist", path.display());
        }
    }
    // Refused before anything is loaded: the target must not be, or hold, an input.
    output_dir::check_write_target(
        &a.output_dir,
        &[
            ("--model_name_or_path", dir),
            ("--adapter_path", &a.adapter_path),
        ],
        a.overwrite_output_dir,
    )?;
    let config = GlmConfig::from_pretrained(dir)?;
    // `auto` keeps the checkpoint's own dtype here, also on the CPU.
    let kind = runtime::dtype_arg(&a.torch_dtype)?
        .to_kind()
        .or_else(|| config.checkpoint_dtype().and_then(TorchDtype::to_kind))
        .unwrap_or(tch::Kind::Float);
    let quant = a.quant.quantization();
    let mut model =
        GlmForCausalLM::from_pretrained_quantized(dir, Some(kind), tch::Device::Cpu, quant)?;
    let adapter = PeftAdapter::load(&mut model, &a.adapter_path, tch::Device::Cpu, false)?;
    if model.quantization.is_some() {
        eprintln!(
            "note: the base is 4-bit: the adapters merge into its dequantized weights and the \
             merged checkpoint is written unquantized in {kind:?}; it carries the quantization \
             error (as PEFT's merge of a QLoRA run), it is not the original base plus the adapters"
        );
    }
    eprintln!(
        "merging {} adapters from {}",
        adapter.modules.len(),
        a.adapter_path.display()
    );
    merge_and_unload(&mut model);
    let _lock = output_dir::OutputDirLock::acquire(&a.output_dir)?;
    // Checked again under the lock: another process may have written meanwhile.
    output_dir::check_write_target(&a.output_dir, &[], a.overwrite_output_dir)?;
    let removed = output_dir::clear_model_files(&a.output_dir)?;
    if !removed.is_empty() {
        eprintln!(
            "overwrite_output_dir: removed {} from {}",
            removed.join(", "),
            a.output_dir.display()
        );
    }
    model
        .save_pretrained(&a.output_dir)
        .with_context(|| format!("writing {}", a.output_dir.display()))?;
    let tokenizer_dir = if a.adapter_path.join("tokenizer.json").exists() {
        &a.adapter_path
    } else {
        dir
    };
    glm4::load_tokenizer(tokenizer_dir)?.save_pretrained(&a.output_dir)?;
    if dir.join("generation_config.json").exists() {
        let to = a.output_dir.join("generation_config.json");
        trl_like::fsutil::copy_atomic(&dir.join("generation_config.json"), &to)
            .with_context(|| format!("writing {}", to.display()))?;
    }
    eprintln!("merged model written to {}", a.output_dir.display());
    Ok(())
}
