//! `glm4 dpo`: preference tuning (TRL's `DPOTrainer`) with the tutorial's
//! model and LoRA settings: the same flow as `glm4 sft` — parse, load the
//! model and the preference pairs, train with checkpoints and answers at each
//! save, save the adapter — on [`trl_like::trainer::DPOTrainer`].

use crate::runtime;
use crate::sft::{
    check_attn_implementation, check_device_fits, closing_summary, init_process_group,
    install_interrupt_handler, load_data, load_model, resolve_app_flags, AppOptions,
    SavePredictCallback,
};
use anyhow::{bail, Result};
use glm4::tutorial::{dpo_defaults, SftFlags};
use std::path::{Path, PathBuf};
use tch::Device;
use trl_like::config::{
    DPOConfig, DataArguments, IntervalStrategy, ModelConfig, NoArgs, ParseError, TrlParser,
};
use trl_like::distributed::DistEnv;
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

fn pick_device(setup: &DpoSetup, dist: Option<&DistEnv>) -> Result<Device> {
    if setup.args.use_cpu {
        return Ok(Device::Cpu);
    }
    match (dist, setup.app.device.as_str()) {
        (Some(env), "auto" | "cuda") if tch::Cuda::is_available() => {
            runtime::parse_device(&format!("cuda:{}", env.local_rank))
        }
        _ => runtime::parse_device(&setup.app.device),
    }
}

/// `glm4 dpo`: train on preference pairs.
pub fn run_dpo(raw: &[String]) -> Result<()> {
    let Some(setup) = parse(raw)? else {
        return Ok(());
    };
    let interrupt = install_interrupt_handler();
    let dist_env = DistEnv::from_env()?;
    let device = pick_device(&setup, dist_env.as_ref())?;
    let model_dir = PathBuf::from(
        setup
            .model_args
            .model_name_or_path
            .clone()
            .unwrap_or_default(),
    );
    check_device_fits(&model_dir, device)?;
    check_attn_implementation(&setup.model_args, device)?;
    let group = init_process_group(dist_env.as_ref(), &setup.args, device)?;
    let is_main = group.as_ref().is_none_or(|g| g.rank() == 0);
    let _lock = if is_main {
        Some(trl_like::trainer::output_dir::OutputDirLock::acquire(
            Path::new(&setup.args.output_dir),
        )?)
    } else {
        None
    };
    let tokenizer = glm4::load_tokenizer(&model_dir)?;
    let raw_data = load_data(&setup.data_args)?;
    let (train, test) = raw_data.train_test_split(setup.data_args.test_size, setup.args.seed)?;
    let evaluates = setup.args.eval_strategy != IntervalStrategy::No;
    if evaluates && test.is_empty() {
        bail!("eval_strategy is {} but there is no evaluation split (test_size 0); set --eval_strategy no or --test_size", setup.args.eval_strategy);
    }
    let model = load_model(&setup.model_args, device)?;
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
    let mut trainer = builder.build()?;
    let _ = interrupt.set(trainer.interrupt_handle());
    if let Some(g) = group {
        trainer.set_process_group(g);
    }
    trainer.train()?;
    if trainer.interrupted_at.is_none() {
        trainer.save_model(None)?;
    }
    if !is_main {
        return Ok(());
    }
    if let Some(step) = trainer.interrupted_at {
        eprintln!("\ninterrupted: stopped after step {step}; run the same command again to resume from the last checkpoint.");
        return Ok(());
    }
    eprint!(
        "\n{}",
        closing_summary(
            &model_dir,
            &output_dir,
            setup.model_args.use_peft,
            setup.app.predict
        )
    );
    Ok(())
}
