//! The tutorial's settings: its defaults on top of TRL's (the
//! `ChatGLM4ModelConfig` / `DataTrainingArguments` / `MySFTConfig`
//! subclasses), the questions its callback asks, the `glm4 sft` options that
//! are not TRL fields, and `docs/FLAGS.md` generated from all of them.

use std::path::PathBuf;
use trl_like::config::{
    DPOConfig, DataArguments, IntervalStrategy, ModelConfig, SFTConfig, TorchDtype,
    TrainingArguments, TrlParser,
};

/// The two questions the tutorial's callback asks at every checkpoint.
pub const TUTORIAL_PROMPTS: [&str; 2] = ["你好，告诉我你的名字。", "告诉我1+2等于多少？"];

/// The tutorial's defaults on top of TRL's.
pub fn tutorial_defaults() -> (ModelConfig, DataArguments, SFTConfig) {
    let model = ModelConfig {
        model_name_or_path: Some("./weights/glm-4-9b-hf".into()),
        dtype: TorchDtype::Bfloat16,
        use_peft: true,
        lora_r: 8,
        lora_alpha: 32,
        lora_dropout: 0.1,
        lora_target_modules: Some(vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]),
        ..ModelConfig::default()
    };
    let data = DataArguments {
        data_files: vec!["./data/alpaca_gpt4_data_zh.json".into()],
        ..DataArguments::default()
    };
    let sft = SFTConfig {
        args: TrainingArguments {
            output_dir: "./output/lora-glm4-9b-alpaca".into(),
            num_train_epochs: 3.0,
            per_device_train_batch_size: 2,
            per_device_eval_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-4,
            bf16: Some(true),
            bf16_full_eval: true,
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: Some(0.1),
            logging_steps: 10.0,
            save_steps: 0.1,
            ..SFTConfig::default().args
        },
        max_length: Some(512),
        ..SFTConfig::default()
    };
    (model, data, sft)
}

/// The `glm4 sft` options besides the TRL fields: parsed by the same clap
/// command as the fields (see [`parse`]) and listed under their own heading.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "glm4 options (besides the TRL fields above)")]
pub struct AppFlags {
    /// A question for the prediction callback (repeatable; default: the tutorial's two).
    #[arg(
        long = "predict_prompt",
        alias = "predict-prompt",
        value_name = "TEXT",
        action = clap::ArgAction::Append,
        default_values = TUTORIAL_PROMPTS
    )]
    pub predict_prompt: Vec<String>,
    /// A JSON list of tools, put on a system message before the second prompt.
    #[arg(long = "predict_tools", alias = "predict-tools", value_name = "FILE")]
    pub predict_tools: Option<PathBuf>,
    /// Answer length at each checkpoint.
    #[arg(
        long = "predict_max_new_tokens",
        alias = "predict-max-new-tokens",
        value_name = "N",
        default_value_t = 512,
        value_parser = whole_number
    )]
    pub predict_max_new_tokens: usize,
    /// Do not generate answers at checkpoints.
    #[arg(long = "no_predict", alias = "no-predict")]
    pub no_predict: bool,
    /// Where to train: auto, cpu, cuda or cuda:N (auto: CUDA when available, unless --use_cpu).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: String,
}

/// A count given on the command line.
pub fn whole_number(s: &str) -> Result<usize, String> {
    s.parse()
        .map_err(|_| "expected a whole number (0, 1, 2, ...)".to_string())
}

/// The `glm4 sft` options plus a subcommand's own (`glm4 preview`'s), in one clap command.
#[derive(Debug, Clone, clap::Args)]
pub struct SftFlags<E: clap::Args> {
    #[command(flatten)]
    pub app: AppFlags,
    #[command(flatten)]
    pub extra: E,
}

/// `glm4 dpo`'s defaults: the tutorial's model and LoRA settings, TRL 1.16's
/// `DPOConfig`, LLaMA-Factory's preference demo data.
pub fn dpo_defaults() -> (ModelConfig, DataArguments, DPOConfig) {
    let (model, data, _) = tutorial_defaults();
    let data = DataArguments {
        data_files: vec!["./data/dpo_zh_demo.json".into()],
        ..data
    };
    let dpo = DPOConfig {
        args: TrainingArguments {
            output_dir: "./output/lora-glm4-9b-dpo".into(),
            bf16: Some(true),
            ..DPOConfig::default().args
        },
        ..DPOConfig::default()
    };
    (model, data, dpo)
}

/// `docs/FLAGS.md`: every `glm4 sft` flag with the tutorial's defaults, generated
/// from the config structs (a test keeps the committed file in sync).
pub fn flags_markdown() -> String {
    let (m, d, s) = tutorial_defaults();
    let mut out = String::from(
        "# `glm4 sft` flags and YAML keys\n\n\
         Generated from the code by `UPDATE_DOCS=1 cargo test --release --test docs` — do not edit by hand.\n\
         Each setting is a YAML key (in the file given with `--config`) and a flag; flags override the file,\n\
         the file overrides these defaults (the tutorial's, on top of TRL 1.16's).\n",
    );
    out.push_str(&TrlParser::new(m, d, s).help_markdown_with::<AppFlags>());
    let (m, d, dpo) = dpo_defaults();
    out.push_str(
        "\n# `glm4 dpo` flags and YAML keys\n\n\
         The same model, data and application options with `glm4 dpo`'s defaults, and TRL 1.16's\n\
         `DPOConfig` (the shared training arguments plus the preference-tuning options).\n",
    );
    out.push_str(&TrlParser::new(m, d, dpo).help_markdown_with::<AppFlags>());
    out
}
