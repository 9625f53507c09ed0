//! `glm4 preview`: the training data as the model receives it — the tutorial
//! prints "the actual data format fed to the model" — with token counts, which
//! tokens carry loss, and length statistics.

use crate::sft::{load_data, parse_with};
use anyhow::Result;
use serde_json::json;
use trl_like::data::tokenize::IGNORE_INDEX;
use trl_like::data::Dataset;
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
        value_parser = glm4::tutorial::whole_number
    )]
    pub num_examples: usize,
    /// Print one JSON object per record ({"text", "input_ids", "labels"}) on stdout.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set, hide_possible_values = true)]
    pub json: bool,
}

/// Text shown per record (and per no-loss prefix): a few screens. A longer
/// one keeps its start and end, with what was cut in between.
pub const SHOWN_BYTES: usize = 4096;

/// `text` whole when at most `max` bytes, else its first ¾ and last ¼ of
/// `max` bytes around a line saying how much was left out.
pub fn cap_text(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let head = floor(max * 3 / 4);
    let tail = floor(text.len() - max / 4);
    let cut = &text[head..tail];
    format!(
        "{}\n[… {} bytes ({} characters) of {} not shown; --json prints the records whole …]\n{}",
        &text[..head],
        cut.len(),
        cut.chars().count(),
        text.len(),
        &text[tail..]
    )
    .into()
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
    let mut tokenizer = glm4::load_tokenizer(&model_dir)?;
    // What SFTTrainer applies (eos_token, chat_template_path), so the preview shows what trains.
    trl_like::data::tokenize::apply_sft_tokenizer_args(&mut tokenizer, &setup.args)?;
    let data = load_data(&setup.data_args)?;
    if data
        .records
        .first()
        .is_some_and(trl_like::data::preference::is_preference_record)
    {
        return preview_pairs(&data, &tokenizer, n, as_json, setup.args.max_length);
    }
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
            println!("{}", cap_text(&e.text, SHOWN_BYTES));
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
                    cap_text(&tokenizer.decode(ids_no_loss, false)?, SHOWN_BYTES)
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

/// Preference data as `glm4 dpo` tokenizes it: the prompt, then the chosen
/// and the rejected completion, with token counts; then length statistics.
fn preview_pairs(
    data: &Dataset,
    tokenizer: &trl_like::tokenizer::PreTrainedTokenizer,
    n: usize,
    as_json: bool,
    max_length: Option<usize>,
) -> Result<()> {
    use trl_like::data::preference::tokenize_preference_dataset;
    let (format, pairs) = tokenize_preference_dataset(data, tokenizer)?;
    if !as_json {
        println!("dataset format: {}", format.name());
    }
    for (i, p) in pairs.iter().take(n).enumerate() {
        if as_json {
            println!(
                "{}",
                json!({"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids})
            );
            continue;
        }
        println!(
            "───── pair {i}: prompt {} tokens, chosen {}, rejected {} ─────",
            p.prompt_ids.len(),
            p.chosen_ids.len(),
            p.rejected_ids.len()
        );
        for (label, ids) in [
            ("prompt", &p.prompt_ids),
            ("chosen", &p.chosen_ids),
            ("rejected", &p.rejected_ids),
        ] {
            println!("[{label}]");
            println!("{}", cap_text(&tokenizer.decode(ids, false)?, SHOWN_BYTES));
        }
    }
    let mut lengths: Vec<usize> = pairs.iter().map(|p| p.max_len()).collect();
    lengths.sort_unstable();
    let over = max_length.map_or(0, |m| lengths.iter().filter(|&&l| l > m).count());
    let summary = format!(
        "{} pairs; prompt + longer completion tokens min {} / max {}; {} longer than max_length {}",
        lengths.len(),
        lengths[0],
        lengths[lengths.len() - 1],
        over,
        max_length.map_or("none".to_string(), |m| m.to_string())
    );
    if as_json {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_with_a_count() {
        assert_eq!(cap_text("short", 16), "short");
        let long = "你".repeat(1000); // 3,000 bytes
        let shown = cap_text(&long, 100);
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.starts_with("你你"), "{shown}");
        assert!(shown.ends_with("你你"), "{shown}");
        // The first 75 bytes (25 characters) stay, and the last 25 rounded to whole characters (27).
        assert!(
            shown.contains("[… 2898 bytes (966 characters) of 3000 not shown"),
            "{shown}"
        );
    }
}
