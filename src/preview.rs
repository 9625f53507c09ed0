//! `glm4 preview`: the training data as the model receives it — the tutorial
//! prints "the actual data format fed to the model" — with token counts, which
//! tokens carry loss, and length statistics.

use crate::sft::{load_data, parse_with};
use anyhow::Result;
use serde_json::json;
use trl_like::data::tokenize::IGNORE_INDEX;
use trl_like::data::{Dataset, DatasetFormat};
use trl_like::trainer::prepare_dataset;

/// `glm4 preview`'s own options, on top of the `glm4 sft` flags.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "glm4 preview options")]
pub struct PreviewFlags {
    /// How many records to show, from the start of the data.
    #[arg(
        long = "num_examples",
        alias = "num-examples",
        value_name = "N",
        default_value_t = 3,
        value_parser = crate::sft::whole_number
    )]
    pub num_examples: usize,
    /// Print one JSON object per record ({"text", "input_ids", "labels"}) on stdout.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set, hide_possible_values = true)]
    pub json: bool,
}

pub fn run_preview(raw: &[String]) -> Result<()> {
    let Some((setup, flags)) = parse_with::<PreviewFlags>(raw)? else {
        return Ok(());
    };
    let (n, as_json) = (flags.num_examples, flags.json);
    let model_dir = std::path::PathBuf::from(
        setup
            .model_args
            .model_name_or_path
            .clone()
            .unwrap_or_default(),
    );
    let tokenizer = crate::load_tokenizer(&model_dir)?;
    let data = load_data(&setup.data_args)?;
    let format = DatasetFormat::parse(setup.data_args.dataset_format.as_str())
        .map_err(anyhow::Error::msg)?;
    // The first N records in file order, before any split or shuffle.
    let head = Dataset {
        records: data.records.iter().take(n).cloned().collect(),
    };
    let (examples, stats) = prepare_dataset(&head, &tokenizer, &setup.args, format, None, false)?;
    if as_json {
        for e in &examples {
            println!(
                "{}",
                json!({"text": e.text, "input_ids": e.input_ids, "labels": e.labels})
            );
        }
    } else {
        if let Some(f) = stats.format {
            println!("dataset format: {}", f.name());
        }
        for (i, e) in examples.iter().enumerate() {
            println!(
                "───── record {i}: {} tokens, {} with loss{} ─────",
                e.input_ids.len(),
                e.loss_tokens(),
                if e.truncated_tokens > 0 {
                    format!(", {} cut by max_length", e.truncated_tokens)
                } else {
                    String::new()
                }
            );
            println!("{}", e.text);
            let masked = e.labels.iter().filter(|&&l| l == IGNORE_INDEX).count();
            if masked > 0 {
                let first_loss = e
                    .labels
                    .iter()
                    .position(|&l| l != IGNORE_INDEX)
                    .unwrap_or(e.labels.len());
                let ids_no_loss = &e.input_ids[..first_loss];
                println!(
                    "[no loss on the first {first_loss} tokens: {:?}]",
                    tokenizer.decode(ids_no_loss, false)?
                );
            } else {
                println!("[loss on every token]");
            }
        }
    }
    // Length statistics over the whole file, without truncation.
    let mut full = setup.args.clone();
    full.max_length = None;
    let (all, _) = prepare_dataset(
        &data,
        &tokenizer,
        &full,
        format,
        None,
        setup.data_args.skip_bad_records,
    )?;
    let mut lengths: Vec<usize> = all.iter().map(|e| e.input_ids.len()).collect();
    lengths.sort_unstable();
    let pct = |p: f64| lengths[((lengths.len() - 1) as f64 * p).round() as usize];
    let over = setup
        .args
        .max_length
        .map(|m| lengths.iter().filter(|&&l| l > m).count())
        .unwrap_or(0);
    let summary = format!(
        "{} records; tokens min {} / p50 {} / p90 {} / p99 {} / max {}; {} longer than max_length {}",
        lengths.len(), lengths[0], pct(0.5), pct(0.9), pct(0.99), lengths[lengths.len() - 1], over,
        setup.args.max_length.map_or("none".to_string(), |m| m.to_string())
    );
    if as_json {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    Ok(())
}
