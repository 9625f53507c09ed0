//! `glm4 preview`: the training data as the model receives it — the tutorial
//! prints "the actual data format fed to the model" — with token counts, which
//! tokens carry loss, and length statistics.

use crate::sft::{load_data, parse};
use anyhow::{Context, Result};
use serde_json::json;
use trl_like::data::tokenize::IGNORE_INDEX;
use trl_like::data::Dataset;
use trl_like::trainer::prepare_dataset;

/// Splits off `--num_examples N` and `--json`.
fn preview_options(raw: &[String]) -> Result<(usize, bool, Vec<String>)> {
    let (mut n, mut as_json, mut rest) = (3usize, false, Vec::new());
    let mut i = 0;
    while i < raw.len() {
        match raw[i].replace('-', "_").trim_start_matches('_') {
            "num_examples" => {
                let v = raw.get(i + 1).context("--num_examples expects a value")?;
                n = v
                    .parse()
                    .with_context(|| format!("--num_examples {v:?} is not a whole number"))?;
                i += 2;
            }
            "json" => {
                as_json = true;
                i += 1;
            }
            _ => {
                rest.push(raw[i].clone());
                i += 1;
            }
        }
    }
    Ok((n, as_json, rest))
}

pub fn run_preview(raw: &[String]) -> Result<()> {
    let (n, as_json, rest) = preview_options(raw)?;
    let Some(setup) = parse(&rest)? else {
        return Ok(());
    };
    let model_dir = std::path::PathBuf::from(
        setup
            .model_args
            .model_name_or_path
            .clone()
            .unwrap_or_default(),
    );
    let tokenizer = crate::load_tokenizer(&model_dir)?;
    let data = load_data(&setup.data_args)?;
    let format = setup.data_args.dataset_format;
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
