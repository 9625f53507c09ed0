//! `glm4 estimate-memory`: per-GPU memory of a training run before starting
//! it (like `accelerate estimate-memory` and DeepSpeed's
//! `estimate_zero2_model_states_mem_needs`).
//!
//! Model states follow the ZeRO paper (arXiv 1910.02054) for mixed precision
//! with AdamW, Ψ trainable parameters over N ranks: 16-bit weights 2Ψ and
//! gradients 2Ψ, fp32 master weights 4Ψ and moments 8Ψ — all replicated
//! under DDP (stage 0: 16Ψ), the last 12Ψ sharded by ZeRO-1 (4Ψ + 12Ψ/N), the
//! gradients too by ZeRO-2 (2Ψ + 14Ψ/N). With LoRA only the adapters train:
//! the frozen base adds its weights and nothing else.
//!
//! Activations follow Korthikanti et al. (arXiv 2205.05198): `34·s·b·h`
//! bytes per layer in 16-bit with a fused (flash/SDPA) attention kernel, plus
//! the fp32 logits of the LM head and their gradient;
//! gradient checkpointing keeps only each layer's input (`2·s·b·h`) and one
//! layer's activations at a time. They are estimates, not measurements.

use anyhow::{bail, Result};
use clap::{ArgAction, Parser};

use crate::bench::resolve_config;
use glm4::glm::GlmConfig;

/// `glm4 estimate-memory` options.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "glm4 estimate-memory",
    about = "Per-GPU memory of a fine-tuning run: weights, gradients, fp32 master, AdamW moments, activations"
)]
pub struct EstimateArgs {
    /// glm-4-9b, small, tiny, or a config.json / model directory.
    #[arg(long = "model_config", aliases = ["model-config", "model"], value_name = "NAME|PATH")]
    pub model_config: String,
    /// LoRA adapters (true, the tutorial's default) or full fine-tuning (false).
    #[arg(long = "use_peft", alias = "use-peft", value_name = "BOOL", default_value = "true",
          action = ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub use_peft: bool,
    /// LoRA rank.
    #[arg(
        long = "lora_r",
        alias = "lora-r",
        value_name = "N",
        default_value_t = 8
    )]
    pub lora_r: i64,
    /// Modules with adapters (the tutorial's q_proj k_proj v_proj; all-linear for every projection).
    #[arg(long = "lora_target_modules", alias = "lora-target-modules", value_name = "NAME",
          num_args = 1.., value_delimiter = ',', default_values_t = ["q_proj".to_string(), "k_proj".into(), "v_proj".into()])]
    pub lora_target_modules: Vec<String>,
    /// ZeRO stage (0 = plain data parallelism with fp32 master weights, as DeepSpeed's DDP).
    #[arg(
        long = "zero_stage",
        alias = "zero-stage",
        value_name = "0|1|2",
        default_value_t = 0
    )]
    pub zero_stage: u8,
    /// Number of GPUs (data-parallel ranks).
    #[arg(long = "world_size", aliases = ["world-size", "num_processes", "nproc"], value_name = "N", default_value_t = 1)]
    pub world_size: i64,
    /// Sequences per GPU per micro-batch.
    #[arg(long = "per_device_train_batch_size", aliases = ["per-device-train-batch-size", "batch_size"],
          value_name = "N", default_value_t = 1)]
    pub batch_size: i64,
    /// Tokens per sequence.
    #[arg(long = "max_length", aliases = ["max-length", "seq_len", "max_seq_length"], value_name = "N", default_value_t = 1024)]
    pub seq_len: i64,
    /// Recompute activations in the backward pass (TRL's default: on).
    #[arg(long = "gradient_checkpointing", alias = "gradient-checkpointing", value_name = "BOOL",
          default_value = "true", action = ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub gradient_checkpointing: bool,
}

/// Per-GPU bytes of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breakdown {
    pub total_params: i64,
    pub trainable: i64,
    pub weights: f64,
    pub gradients: f64,
    pub master: f64,
    pub moments: f64,
    pub activations: f64,
}

impl Breakdown {
    pub fn model_states(&self) -> f64 {
        self.weights + self.gradients + self.master + self.moments
    }
}

/// Model-state bytes per GPU for `total` parameters of which `trainable`
/// train, in 16-bit working precision with fp32 master and moments.
pub fn model_states(total: i64, trainable: i64, stage: u8, world: i64) -> (f64, f64, f64, f64) {
    let (t, n) = (trainable as f64, world.max(1) as f64);
    let frozen = (total - trainable) as f64;
    let weights = 2.0 * (frozen + t);
    let shard = |x: f64| if stage >= 1 { x / n } else { x };
    let gradients = if stage >= 2 { 2.0 * t / n } else { 2.0 * t };
    (weights, gradients, shard(4.0 * t), shard(8.0 * t))
}

/// LoRA parameters: `r·(in + out)` per adapted projection per layer.
pub fn lora_parameters(cfg: &GlmConfig, r: i64, targets: &[String]) -> Result<i64> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
    ];
    let names: Vec<&str> = if targets.len() == 1 && targets[0].eq_ignore_ascii_case("all-linear") {
        all.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let mut per_layer = 0;
    for name in names {
        per_layer += r * match name {
            "q_proj" => h + q,
            "k_proj" | "v_proj" => h + kv,
            "o_proj" => q + h,
            "gate_up_proj" => h + 2 * i,
            "down_proj" => i + h,
            other => bail!(
                "--lora_target_modules {other}: not a GLM-4 projection (q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj, or all-linear)"
            ),
        };
    }
    Ok(per_layer * cfg.num_hidden_layers)
}

/// Activation bytes of one micro-batch (16-bit, fused attention, fp32 logits).
pub fn activations(cfg: &GlmConfig, batch: i64, seq: i64, checkpointing: bool) -> f64 {
    let sbh = (seq * batch * cfg.hidden_size) as f64;
    let layer = 34.0 * sbh;
    let layers = cfg.num_hidden_layers as f64;
    let blocks = if checkpointing {
        2.0 * sbh * layers + layer
    } else {
        layer * layers
    };
    // Logits in fp32 and their gradient.
    let logits = 8.0 * (seq * batch * cfg.vocab_size) as f64;
    blocks + logits
}

pub fn breakdown(cfg: &GlmConfig, a: &EstimateArgs) -> Result<Breakdown> {
    if a.zero_stage > 2 {
        bail!(
            "--zero_stage {}: stages 0, 1 and 2 are implemented (ZeRO-3 is not)",
            a.zero_stage
        );
    }
    if a.world_size < 1 || a.batch_size < 1 || a.seq_len < 1 {
        bail!("--world_size, --per_device_train_batch_size and --max_length must be at least 1");
    }
    let total = cfg.num_parameters();
    let trainable = if a.use_peft {
        lora_parameters(cfg, a.lora_r, &a.lora_target_modules)?
    } else {
        total
    };
    let total = if a.use_peft { total + trainable } else { total };
    let (weights, gradients, master, moments) =
        model_states(total, trainable, a.zero_stage, a.world_size);
    Ok(Breakdown {
        total_params: total,
        trainable,
        weights,
        gradients,
        master,
        moments,
        activations: activations(cfg, a.batch_size, a.seq_len, a.gradient_checkpointing),
    })
}

fn gb(bytes: f64) -> String {
    format!("{:8.2} GB", bytes / 1e9)
}

/// The table `estimate-memory` prints (and the trainer logs for its own run).
pub fn report(b: &Breakdown, a: &EstimateArgs) -> String {
    let mode = if a.use_peft {
        format!("LoRA r {} on {}", a.lora_r, a.lora_target_modules.join(","))
    } else {
        "full fine-tuning".to_string()
    };
    let stage = match a.zero_stage {
        0 => "DDP (ZeRO stage 0)".to_string(),
        s => format!("ZeRO-{s}"),
    };
    let mut out = format!(
        "{} parameters, {} trainable ({mode}); {stage} over {} GPU(s); 16-bit weights, fp32 master + AdamW moments\n\
         per GPU:\n  weights (16-bit)         {}\n  gradients (16-bit)       {}\n  fp32 master weights      {}\n  \
         AdamW moments (fp32)     {}\n  model states             {}\n  activations              {}  \
         (batch {} x {} tokens, gradient checkpointing {})\n  total                    {}\n",
        b.total_params,
        b.trainable,
        a.world_size,
        gb(b.weights),
        gb(b.gradients),
        gb(b.master),
        gb(b.moments),
        gb(b.model_states()),
        gb(b.activations),
        a.batch_size,
        a.seq_len,
        if a.gradient_checkpointing { "on" } else { "off" },
        gb(b.model_states() + b.activations),
    );
    out.push_str("model states per GPU by stage:");
    for s in 0..=2 {
        let (w, g, m, v) = model_states(b.total_params, b.trainable, s, a.world_size);
        out.push_str(&format!(" stage {s} {}", gb(w + g + m + v).trim()));
        out.push(if s < 2 { ',' } else { '\n' });
    }
    out.push_str(
        "(glm4 sft keeps each rank's full 16-bit gradients until the step's reduction: \
         add 2 bytes per trainable parameter to the ZeRO-2 figure, and 2 more per sharded one for its fp32 gradient shard)\n",
    );
    out
}

/// Logs the estimate of the run `glm4 sft` / `glm4 dpo` is starting (rank 0);
/// `max_length` is the trainer's longest sequence.
pub fn log_for_run(
    cfg: &GlmConfig,
    model_args: &trl_like::config::ModelConfig,
    args: &trl_like::config::TrainingArguments,
    max_length: Option<usize>,
    world: usize,
) {
    let zero_stage = args.deepspeed.as_deref().map_or(0, |path| {
        trl_like::config::DeepSpeedConfig::from_file(std::path::Path::new(path))
            .map_or(0, |c| c.zero_stage)
    });
    let a = EstimateArgs {
        model_config: String::new(),
        use_peft: model_args.use_peft,
        lora_r: model_args.lora_r as i64,
        lora_target_modules: model_args
            .lora_target_modules
            .clone()
            .unwrap_or_else(|| vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]),
        zero_stage,
        world_size: world as i64,
        batch_size: args.per_device_train_batch_size as i64,
        seq_len: max_length.unwrap_or(1024) as i64,
        gradient_checkpointing: args.gradient_checkpointing,
    };
    match breakdown(cfg, &a) {
        Ok(b) => log::info!(
            "memory estimate (glm4 estimate-memory):\n{}",
            report(&b, &a).trim_end()
        ),
        Err(e) => log::info!("memory estimate unavailable: {e}"),
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let a = EstimateArgs::try_parse_from(
        std::iter::once("glm4 estimate-memory".to_string()).chain(args.iter().cloned()),
    )
    .map_err(|e| {
        if matches!(
            e.kind(),
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
        ) {
            let _ = e.print();
            std::process::exit(0);
        }
        anyhow::anyhow!("{e}")
    })?;
    let (cfg, _) = resolve_config(&a.model_config)?;
    let b = breakdown(&cfg, &a)?;
    print!("{}", report(&b, &a));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glm4_9b_full_fine_tuning_matches_deepspeed() {
        let cfg = GlmConfig::glm4_9b();
        let psi = cfg.num_parameters() as f64;
        let (w, g, m, v) = model_states(cfg.num_parameters(), cfg.num_parameters(), 2, 8);
        assert!((w + g + m + v - (2.0 * psi + 14.0 * psi / 8.0)).abs() < 1.0);
        let (w, g, m, v) = model_states(cfg.num_parameters(), cfg.num_parameters(), 0, 8);
        assert!((w + g + m + v - 16.0 * psi).abs() < 1.0);
        let (w, g, m, v) = model_states(cfg.num_parameters(), cfg.num_parameters(), 1, 8);
        assert!((w + g + m + v - (4.0 * psi + 12.0 * psi / 8.0)).abs() < 1.0);
    }
}
