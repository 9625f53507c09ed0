//! `glm4 dpo`: preference tuning (TRL's `DPOTrainer`) with the tutorial's
//! model and LoRA settings: the same flow as `glm4 sft` — parse, load the
//! model and the preference pairs, train with checkpoints and answers at each
//! save, save the adapter — on [`trl_like::trainer::DPOTrainer`].

use crate::sft::{load_data, resolve_app_flags, AppOptions, Run, SavePredictCallback};
use anyhow::{bail, Result};
use glm4::tutorial::{dpo_defaults, SftFlags};
use std::path::PathBuf;
use trl_like::config::{
    DPOConfig, DataArguments, IntervalStrategy, ModelConfig, NoArgs, ParseError, TrlParser,
};
use trl_like::generation::GenerationConfig;
use trl_like::peft::get_peft_config;
use trl_like::trainer::{DPOTrainer, TrainerCallback};

/// Everything `glm4 dpo` parses from its arguments.
pub struct DpoSetup {
    pub model_args: ModelConfig,
    pub data_args: DataArguments,
    pub args: DPOConfig,
    pub app: AppOptions,
}

/// Parses `glm4 dpo` arguments; `Ok(None)` after printing `--help`.
pub fn parse(raw: &[String]) -> Result<Option<DpoSetup>> {
    let (m, d, s) = dpo_defaults();
    match TrlParser::new(m, d, s).parse_with::<SftFlags<NoArgs>>(raw) {
        Ok((parsed, flags)) => {
            for (k, v) in &parsed.env {
                std::env::set_var(k, v);
            }
            Ok(Some(DpoSetup {
                model_args: parsed.model,
                data_args: parsed.data,
                args: parsed.sft,
                app: resolve_app_flags(flags.app)?,
            }))
        }
        Err(ParseError::Help(text)) => {
            println!("{text}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// `glm4 dpo`: train on preference pairs.
pub fn run_dpo(raw: &[String]) -> Result<()> {
    let Some(setup) = parse(raw)? else {
        return Ok(());
    };
    let run = Run::start(&setup.model_args, &setup.args, &setup.app.device)?;
    let model_dir = run.model_dir.clone();
    let tokenizer = glm4::load_tokenizer(&model_dir)?;
    let raw_data = load_data(&setup.data_args)?;
    let (train, test) = raw_data.train_test_split(setup.data_args.test_size, setup.args.seed)?;
    let evaluates = setup.args.eval_strategy != IntervalStrategy::No;
    if evaluates && test.is_empty() {
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
    let mut builder = DPOTrainer::builder(model, setup.args.clone())
        .train_dataset(&train)
        .processing_class(tokenizer)
        .peft_config(get_peft_config(&setup.model_args)?)
        .callbacks(callbacks);
    if evaluates {
        builder = builder.eval_dataset(&test);
    }
    let trainer = builder.build()?;
    run.train_and_save(
        trainer,
        &output_dir,
        setup.model_args.use_peft,
        setup.app.predict,
    )
}
