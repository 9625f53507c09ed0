//! Padding-free and packed training against TRL 1.16 + PEFT 0.21 on the tiny
//! GLM-4 (fp32, CPU), and the model's per-sequence attention.
//!
//! `scripts/make_packing_fixtures.py` ran TRL's `pack_dataset` on made-up
//! datasets, its padding-free collator, and `SFTTrainer` with
//! `padding_free=True` (batch 4; batch 2 × accumulation 2) and with
//! `packing=True` (bfd, max_length 64, batch 2), from the tokenized records it
//! stored. We train on the same records from the same adapter and expect the
//! same blocks, batches, losses, gradient norms, learning rates and weights.

use glm4::glm::GlmForCausalLM;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use trl_like::config::{
    IntervalStrategy, PackingStrategy, SFTConfig, SamplingStrategy, SaveStrategy, TrainingArguments,
};
use trl_like::data::packing::{pack_examples, PackingStrategy as Strategy};
use trl_like::data::{collate_padding_free, Dataset, Origin, Record, TokenizedExample};
use trl_like::modeling::{CausalLM, CausalLMInput, Checkpointable};
use trl_like::peft::PeftAdapter;
use trl_like::trainer::SFTTrainer;

mod common;
use common::{check_final_adapter, check_log_history, close};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(path: &str) -> Value {
    let p = root().join("tests/fixtures/trainer").join(path);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    serde_json::from_value(v.clone()).unwrap()
}

fn example(ids: Vec<i64>, labels: Vec<i64>, seq_lengths: Option<Vec<usize>>) -> TokenizedExample {
    TokenizedExample {
        text: String::new(),
        input_ids: ids,
        labels,
        truncated_tokens: 0,
        seq_lengths,
    }
}

// ---------------------------------------------------------------------------
// The model: per-sequence causal attention in one padding-free row
// ---------------------------------------------------------------------------

fn load_model(arch: &str) -> GlmForCausalLM {
    GlmForCausalLM::from_pretrained(
        root().join("weights").join(format!("tiny-{arch}")),
        Some(Kind::Float),
        Device::Cpu,
    )
    .unwrap()
}

/// Logits of each sequence alone, and of all of them back to back in one
/// padding-free row (positions restarting at 0); also through the layer-by-layer
/// path the trainer's activation recompute uses.
fn check_concatenated(arch: &str, lens: &[i64]) {
    let model = load_model(arch);
    tch::manual_seed(7);
    let seqs: Vec<Tensor> = lens
        .iter()
        .map(|&n| Tensor::randint(1900, [1, n], (Kind::Int64, Device::Cpu)))
        .collect();
    let alone: Vec<Tensor> = seqs
        .iter()
        .map(|ids| {
            let input = CausalLMInput {
                input_ids: ids,
                attention_mask: None,
                position_ids: None,
                seq_lens: None,
            };
            tch::no_grad(|| model.forward(&input, None, false))
        })
        .collect();
    let row = Tensor::cat(&seqs, 1);
    let positions = Tensor::cat(
        &lens
            .iter()
            .map(|&n| Tensor::arange(n, (Kind::Int64, Device::Cpu)))
            .collect::<Vec<_>>(),
        0,
    )
    .unsqueeze(0);
    let input = CausalLMInput {
        input_ids: &row,
        attention_mask: None,
        position_ids: Some(&positions),
        seq_lens: Some(lens),
    };
    let packed = tch::no_grad(|| model.forward(&input, None, false));
    let layered = tch::no_grad(|| {
        let ctx = model.layer_context(&input);
        let mut h = model.embed(&row);
        for i in 0..Checkpointable::num_layers(&model) {
            h = model.layer_forward(i, &h, &ctx, false);
        }
        model.lm_head(&model.final_norm(&h))
    });
    let expected = Tensor::cat(&alone, 1);
    for (name, got) in [("forward", &packed), ("layer by layer", &layered)] {
        let diff = (got - &expected).abs().max().double_value(&[]);
        assert!(
            diff < 1e-5,
            "{arch} {lens:?} {name}: padding-free logits differ from separate runs by {diff}"
        );
    }
    // Without the segments the later sequences would see the earlier ones.
    let crossing = CausalLMInput {
        seq_lens: None,
        ..input
    };
    let mixed = tch::no_grad(|| model.forward(&crossing, None, false));
    let diff = (&mixed - &expected).abs().max().double_value(&[]);
    assert!(
        diff > 1e-3,
        "{arch}: the test cannot tell segments apart ({diff})"
    );
}

#[test]
fn padding_free_forward_equals_separate_sequences() {
    for arch in ["glm", "glm4"] {
        check_concatenated(arch, &[7, 12, 5]);
        // Equal lengths share one attention call.
        check_concatenated(arch, &[6, 9, 6, 9]);
    }
}

// ---------------------------------------------------------------------------
// TRL's pack_dataset and padding-free collator
// ---------------------------------------------------------------------------

fn label_of(id: i64) -> i64 {
    if id % 3 == 0 {
        -100
    } else {
        -id
    }
}

#[test]
fn packing_matches_trl_pack_dataset() {
    let fx = fixture("packing.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let name = format!(
            "{} {} seq_length {}",
            case["name"].as_str().unwrap(),
            case["strategy"].as_str().unwrap(),
            case["seq_length"]
        );
        let mut next = 1i64;
        let examples: Vec<TokenizedExample> = case["lengths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let ids: Vec<i64> = (0..n.as_i64().unwrap())
                    .map(|_| {
                        next += 1;
                        next - 1
                    })
                    .collect();
                let labels = ids.iter().map(|&i| label_of(i)).collect();
                example(ids, labels, None)
            })
            .collect();
        let strategy = match case["strategy"].as_str().unwrap() {
            "bfd" => Strategy::Bfd,
            "bfd_split" => Strategy::BfdSplit,
            _ => Strategy::Wrapped,
        };
        let packed = pack_examples(
            &examples,
            case["seq_length"].as_u64().unwrap() as usize,
            strategy,
        );
        let expected: Vec<Vec<i64>> =
            serde_json::from_value(case["packed_input_ids"].clone()).unwrap();
        let got: Vec<Vec<i64>> = packed.iter().map(|e| e.input_ids.clone()).collect();
        assert_eq!(got, expected, "{name}: blocks");
        for e in &packed {
            let want: Vec<i64> = e.input_ids.iter().map(|&i| label_of(i)).collect();
            assert_eq!(e.labels, want, "{name}: labels moved with their ids");
        }
        let lens: Vec<Option<Vec<usize>>> = packed.iter().map(|e| e.seq_lengths.clone()).collect();
        match case.get("packed_seq_lengths") {
            Some(v) => {
                let want: Vec<Vec<usize>> = serde_json::from_value(v.clone()).unwrap();
                assert_eq!(
                    lens,
                    want.into_iter().map(Some).collect::<Vec<_>>(),
                    "{name}: seq_lengths"
                );
            }
            None => assert!(lens.iter().all(Option::is_none), "{name}: no seq_lengths"),
        }
    }
}

#[test]
fn padding_free_collator_matches_trl() {
    let fx = fixture("packing.json");
    for case in fx["collator"].as_array().unwrap() {
        let examples: Vec<TokenizedExample> = case["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let lens = e
                    .get("seq_lengths")
                    .map(|v| serde_json::from_value(v.clone()).unwrap());
                example(ints(&e["input_ids"]), ints(&e["labels"]), lens)
            })
            .collect();
        let refs: Vec<&TokenizedExample> = examples.iter().collect();
        let multiple = case["pad_to_multiple_of"].as_u64().map(|m| m as usize);
        let batch = collate_padding_free(&refs, 0, multiple, Device::Cpu);
        let rows = |t: &Tensor| Vec::<Vec<i64>>::try_from(t).unwrap();
        let want = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(case[k].clone()).unwrap() };
        assert_eq!(rows(&batch.input_ids), want("input_ids"));
        assert_eq!(
            rows(batch.position_ids.as_ref().unwrap()),
            want("position_ids")
        );
        assert_eq!(rows(&batch.labels), want("labels"));
        let cu = ints(&case["cu_seq_lens"]);
        let lens: Vec<i64> = cu.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(batch.seq_lens.as_deref(), Some(&lens[..]));
        assert!(!case["keys"]
            .as_array()
            .unwrap()
            .contains(&json!("attention_mask")));
    }
}

// ---------------------------------------------------------------------------
// Four optimizer steps against TRL
// ---------------------------------------------------------------------------

struct Setting {
    name: &'static str,
    batch: usize,
    accumulation: usize,
    packing: bool,
    max_length: Option<usize>,
}

const PF_B4: Setting = Setting {
    name: "pf_b4",
    batch: 4,
    accumulation: 1,
    packing: false,
    max_length: None,
};
const PF_B2_GA2: Setting = Setting {
    name: "pf_b2_ga2",
    batch: 2,
    accumulation: 2,
    packing: false,
    max_length: None,
};
const PACK_BFD_B2: Setting = Setting {
    name: "pack_bfd_b2",
    batch: 2,
    accumulation: 1,
    packing: true,
    max_length: Some(64),
};

fn args(s: &Setting, output_dir: &Path, recompute: bool) -> SFTConfig {
    SFTConfig {
        args: TrainingArguments {
            output_dir: output_dir.display().to_string(),
            per_device_train_batch_size: s.batch,
            gradient_accumulation_steps: s.accumulation,
            learning_rate: 5e-4,
            max_grad_norm: 1.0,
            logging_steps: 1.0,
            max_steps: 4,
            seed: 42,
            bf16: Some(false),
            gradient_checkpointing: recompute,
            report_to: vec!["none".into()],
            save_strategy: SaveStrategy::No,
            eval_strategy: IntervalStrategy::No,
            train_sampling_strategy: SamplingStrategy::Sequential,
            disable_tqdm: true,
            ..SFTConfig::default().args
        },
        max_length: s.max_length,
        padding_free: !s.packing,
        packing: s.packing,
        packing_strategy: PackingStrategy::Bfd,
        ..SFTConfig::default()
    }
}

/// The tokenized records TRL trained on (its own preparation of the alpaca records).
fn records(setting: &str) -> Dataset {
    let rows = fixture(&format!("{setting}/records.json"));
    let records = rows
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(index, r)| Record {
            value: json!({"input_ids": r["input_ids"], "labels": r["labels"]}),
            origin: Origin {
                file: "records.json".into(),
                index,
                line: None,
            },
        })
        .collect();
    Dataset { records }
}

fn check_setting(s: &Setting, recompute: bool) {
    let setting = s.name;
    let tiny = root().join("weights/tiny-glm");
    let mut model = GlmForCausalLM::from_pretrained(&tiny, Some(Kind::Float), Device::Cpu).unwrap();
    let init = root()
        .join("tests/fixtures/trainer")
        .join(setting)
        .join("adapter_init");
    let adapter = PeftAdapter::load(&mut model, &init, Device::Cpu, true).unwrap();
    let tokenizer = glm4::load_tokenizer(&tiny).unwrap();
    let out = std::env::temp_dir().join(format!(
        "glm4-padding-free-parity-{setting}-{recompute}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let data = records(setting);
    let mut trainer = SFTTrainer::builder(model, args(s, &out, recompute))
        .peft_model(adapter)
        .train_dataset(&data)
        .processing_class(tokenizer)
        .build()
        .unwrap();
    if recompute {
        // Several loss chunks per row, too.
        trainer.set_loss_chunk_tokens(16);
    }

    // Packing: the same blocks as TRL's train_dataset.
    if s.packing {
        let expected = fixture(&format!("{setting}/packed_dataset.json"));
        let expected = expected.as_array().unwrap();
        assert_eq!(
            trainer.train_dataset.len(),
            expected.len(),
            "{setting}: blocks"
        );
        for (i, (got, want)) in trainer.train_dataset.iter().zip(expected).enumerate() {
            assert_eq!(
                got.input_ids,
                ints(&want["input_ids"]),
                "{setting} block {i}"
            );
            assert_eq!(got.labels, ints(&want["labels"]), "{setting} block {i}");
            let lens: Vec<usize> = serde_json::from_value(want["seq_lengths"].clone()).unwrap();
            assert_eq!(got.seq_lengths.as_ref(), Some(&lens), "{setting} block {i}");
        }
    }
    // The micro-batches the collator makes from them are TRL's, in TRL's order.
    let batches = fixture(&format!("{setting}/batches.json"));
    let micro = batches["micro_batches"].as_array().unwrap();
    let n = trainer.train_dataset.len();
    let mut next = 0;
    for (k, mb) in micro.iter().enumerate() {
        let examples: Vec<&TokenizedExample> = (0..s.batch)
            .map(|j| &trainer.train_dataset[(next + j) % n])
            .collect();
        next += s.batch;
        let batch = collate_padding_free(&examples, 1900, None, Device::Cpu);
        let rows = |t: &Tensor| Vec::<Vec<i64>>::try_from(t).unwrap();
        let want =
            |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(mb[key].clone()).unwrap() };
        assert_eq!(
            rows(&batch.input_ids),
            want("input_ids"),
            "{setting} micro-batch {k}"
        );
        assert_eq!(
            rows(batch.position_ids.as_ref().unwrap()),
            want("position_ids"),
            "{setting} micro-batch {k}"
        );
        assert_eq!(
            rows(&batch.labels),
            want("labels"),
            "{setting} micro-batch {k}"
        );
    }
    // Every window's token count (num_items_in_batch).
    for step in micro.chunks(s.accumulation) {
        let total: i64 = step
            .iter()
            .map(|mb| {
                let labels: Vec<Vec<i64>> = serde_json::from_value(mb["labels"].clone()).unwrap();
                labels[0].iter().skip(1).filter(|&&l| l != -100).count() as i64
            })
            .sum();
        for mb in step {
            assert_eq!(mb["num_items_in_batch"].as_i64(), Some(total));
        }
    }

    trainer.train().unwrap();
    let expected = fixture(&format!("{setting}/log_history.json"));
    let worst = check_log_history(
        setting,
        &trainer.state.log_history,
        expected.as_array().unwrap(),
        |ours, trl| close(ours, trl, 1e-12),
    );

    let worst_weight = check_final_adapter(
        &root(),
        setting,
        trainer.peft.as_ref().unwrap().named_parameters(),
    );
    eprintln!(
        "{setting} (recompute {recompute}): worst relative loss/grad_norm/lr error {worst:.2e}, worst adapter weight difference {worst_weight:.2e}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn padding_free_batch_4_matches_trl() {
    check_setting(&PF_B4, false);
}

#[test]
fn padding_free_batch_2_accumulation_2_matches_trl() {
    check_setting(&PF_B2_GA2, false);
}

#[test]
fn packing_bfd_batch_2_matches_trl() {
    check_setting(&PACK_BFD_B2, false);
}

/// Activation recompute (gradient_checkpointing) and a chunked loss go through
/// the same per-sequence attention.
#[test]
fn padding_free_and_packing_with_recompute_match_trl() {
    check_setting(&PF_B4, true);
    check_setting(&PF_B2_GA2, true);
    check_setting(&PACK_BFD_B2, true);
}

/// Evaluation collates like training: padding-free batches give the padded
/// batches' eval loss (the same target tokens, attention kept per sequence),
/// and `eval_packing` decides whether the eval set is packed.
#[test]
fn padding_free_evaluation_and_eval_packing() {
    let tiny = root().join("weights/tiny-glm");
    let data = records("pf_b4");
    let eval_loss = |padding_free: bool, packing: bool, eval_packing: Option<bool>| {
        let model = GlmForCausalLM::from_pretrained(&tiny, Some(Kind::Float), Device::Cpu).unwrap();
        let out = std::env::temp_dir().join(format!(
            "glm4-padding-free-eval-{padding_free}-{packing}-{eval_packing:?}-{}",
            std::process::id()
        ));
        let mut a = args(&PF_B4, &out, false);
        a.padding_free = padding_free;
        a.packing = packing;
        a.eval_packing = eval_packing;
        a.max_length = Some(64);
        a.per_device_eval_batch_size = 4;
        let tokenizer = glm4::load_tokenizer(&tiny).unwrap();
        let mut trainer = SFTTrainer::builder(model, a)
            .train_dataset(&data)
            .eval_dataset(&data)
            .processing_class(tokenizer)
            .build()
            .unwrap();
        let eval_len = trainer.eval_dataset.as_ref().unwrap().len();
        let m = trainer.evaluate().unwrap();
        (m["eval_loss"].as_f64().unwrap(), eval_len)
    };
    let (padded, n) = eval_loss(false, false, None);
    let (free, n_free) = eval_loss(true, false, None);
    assert_eq!((n, n_free), (16, 16));
    assert!(
        close(free, padded, 1e-6),
        "padding-free eval_loss {free} vs padded {padded}"
    );
    // Packing packs the eval set too unless eval_packing says otherwise.
    let (_, n_packed) = eval_loss(false, true, None);
    assert!(n_packed < 16, "{n_packed} eval blocks");
    let (unpacked, n_unpacked) = eval_loss(false, true, Some(false));
    assert_eq!(n_unpacked, 16);
    assert!(close(unpacked, padded, 1e-6), "{unpacked} vs {padded}");
}
