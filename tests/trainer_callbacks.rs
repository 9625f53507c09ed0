//! Callbacks fire in transformers' order: the event sequence of a short run
//! (accumulation 2, logging every step, evaluation and saving every 2 steps,
//! end of training at step 3) equals the one transformers 5.23 / TRL 1.16
//! produced (`scripts/make_callback_fixture.py`).

use glm4::glm::GlmForCausalLM;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind};
use trl_like::config::{
    IntervalStrategy, SFTConfig, SamplingStrategy, SaveStrategy, TrainingArguments,
};
use trl_like::data::{Dataset, Origin, Record};
use trl_like::peft::{LoraConfig, TargetModules};
use trl_like::trainer::{
    CallbackContext, SFTTrainer, TrainerCallback, TrainerControl, TrainerState,
};

type Log = Arc<Mutex<Vec<(String, usize)>>>;

struct Recorder(Log);

macro_rules! record {
    ($($name:ident),*) => {
        impl TrainerCallback for Recorder {
            $(fn $name(&mut self, _a: &TrainingArguments, s: &TrainerState, _c: &mut TrainerControl, _x: &mut CallbackContext) {
                self.0.lock().unwrap().push((stringify!($name).to_string(), s.global_step));
            })*
        }
    };
}

record!(
    on_init_end,
    on_train_begin,
    on_train_end,
    on_epoch_begin,
    on_epoch_end,
    on_step_begin,
    on_substep_end,
    on_pre_optimizer_step,
    on_optimizer_step,
    on_step_end,
    on_evaluate,
    on_prediction_step,
    on_save,
    on_log
);

fn dataset(texts: &[String]) -> Dataset {
    Dataset {
        records: texts
            .iter()
            .enumerate()
            .map(|(i, t)| Record {
                value: json!({"text": t}),
                origin: Origin {
                    file: "mem".into(),
                    index: i,
                    line: None,
                },
            })
            .collect(),
    }
}

#[test]
fn events_fire_in_transformers_order() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/trainer/callback_order.json")).unwrap(),
    )
    .unwrap();
    let expected: Vec<(String, usize)> = serde_json::from_value(fx["events"].clone()).unwrap();

    let tiny = root.join("weights/tiny-glm");
    let model = GlmForCausalLM::from_pretrained(&tiny, Some(Kind::Float), Device::Cpu).unwrap();
    let tokenizer = glm4::load_tokenizer(&tiny).unwrap();
    // The same texts as the Python script (train: first 6, eval: next 2).
    let texts: Vec<String> = (0..3)
        .flat_map(|a| {
            (0..3).map(move |b| {
                format!(
                    "[gMASK]<sop><|user|>\n{a}+{b}等于多少？<|assistant|>\n{}",
                    a + b
                )
            })
        })
        .collect();
    let out = std::env::temp_dir().join(format!("glm4-callbacks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let args = SFTConfig {
        args: TrainingArguments {
            output_dir: out.display().to_string(),
            per_device_train_batch_size: 1,
            per_device_eval_batch_size: 1,
            gradient_accumulation_steps: 2,
            max_steps: 3,
            logging_steps: 1.0,
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: Some(2.0),
            save_strategy: SaveStrategy::Steps,
            save_steps: 2.0,
            report_to: vec!["none".into()],
            bf16: Some(false),
            gradient_checkpointing: false,
            disable_tqdm: true,
            train_sampling_strategy: SamplingStrategy::Sequential,
            ..SFTConfig::default().args
        },
        max_length: Some(32),
        ..SFTConfig::default()
    };
    let log: Log = Arc::default();
    let lora = LoraConfig::new(
        4,
        8.0,
        0.0,
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
    );
    let (train, eval) = (dataset(&texts[..6]), dataset(&texts[6..8]));
    let mut trainer = SFTTrainer::builder(model, args)
        .train_dataset(&train)
        .eval_dataset(&eval)
        .processing_class(tokenizer)
        .peft_config(Some(lora))
        .callbacks(vec![Box::new(Recorder(log.clone()))])
        .build()
        .unwrap();
    trainer.train().unwrap();
    let got = log.lock().unwrap().clone();
    assert_eq!(got, expected, "callback events differ from transformers'");
    // Checkpoints at the eval/save interval and at the end, as transformers writes them.
    assert!(out.join("checkpoint-2/trainer_state.json").is_file());
    assert!(out.join("checkpoint-3/trainer_state.json").is_file());
    let _ = std::fs::remove_dir_all(&out);
}
