//! A user-defined `TrainerCallback`, the way a TRL user writes one in Python:
//! it watches the logs, prints a line at every evaluation, and stops training
//! once the training loss falls below a target.
//!
//! Run from the repository root:
//!   cargo run --release -p trl_like --example custom_callback

use glm4::glm::GlmForCausalLM;
use tch::{Device, Kind};
use trl_like::config::{IntervalStrategy, SFTConfig, TrainingArguments};
use trl_like::data::Dataset;
use trl_like::peft::{LoraConfig, TargetModules};
use trl_like::trainer::{
    CallbackContext, SFTTrainer, TrainerCallback, TrainerControl, TrainerState,
};

/// Stops when the logged training loss drops below `target`.
struct StopAtLoss {
    target: f64,
}

impl TrainerCallback for StopAtLoss {
    fn on_log(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        control: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        if let Some(loss) = ctx
            .logs
            .and_then(|l| l.get("loss"))
            .and_then(|v| v.as_f64())
        {
            if loss < self.target {
                println!(
                    "step {}: loss {loss:.3} < {} — stopping",
                    state.global_step, self.target
                );
                control.should_training_stop = true;
            }
        }
    }

    fn on_evaluate(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        _control: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        if let Some(m) = ctx.metrics {
            println!("step {}: eval_loss {}", state.global_step, m["eval_loss"]);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let model_dir = std::path::Path::new("weights/tiny-glm");
    let model = GlmForCausalLM::from_pretrained(model_dir, Some(Kind::Float), Device::Cpu)?;
    let tokenizer = glm4::load_tokenizer(model_dir)?;
    let data = Dataset::from_json_files(&["data/demo_alpaca.json"])?;
    let (train, test) = data.train_test_split(0.1, 42)?;
    let args = SFTConfig {
        args: TrainingArguments {
            output_dir: std::env::temp_dir()
                .join("trl_like-custom-callback")
                .display()
                .to_string(),
            overwrite_output_dir: true,
            num_train_epochs: 20.0,
            per_device_train_batch_size: 8,
            learning_rate: 1e-2,
            logging_steps: 5.0,
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: Some(20.0),
            save_strategy: trl_like::config::SaveStrategy::No,
            bf16: Some(false),
            gradient_checkpointing: false,
            ..SFTConfig::default().args
        },
        max_length: Some(128),
        ..SFTConfig::default()
    };
    let lora = LoraConfig::new(16, 32.0, 0.0, TargetModules::AllLinear);
    let mut trainer = SFTTrainer::builder(model, args)
        .train_dataset(&train)
        .eval_dataset(&test)
        .processing_class(tokenizer)
        .peft_config(Some(lora))
        .callbacks(vec![Box::new(StopAtLoss { target: 2.0 })])
        .build()?;
    let out = trainer.train()?;
    println!(
        "stopped at step {} with train_loss {:.3}",
        out.global_step, out.training_loss
    );
    Ok(())
}
