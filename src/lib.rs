//! GLM-4 for the `glm4` fine-tuning tool: the model (GLM-4-9B and GLM-4-0414)
//! in tch, its chat template, and the glue to the TRL-like API in `trl_like`.

pub mod glm;

/// The GLM-4 chat template the tutorial installs when a tokenizer has none
/// (tool-aware; starts with `[gMASK]<sop>`).
pub const GLM4_CHAT_TEMPLATE: &str = include_str!("glm4_chat_template.jinja");

pub mod bench;
pub mod preview;
pub mod runtime;
pub mod sft;

use std::path::Path;
use trl_like::tokenizer::PreTrainedTokenizer;

/// Loads a model directory's tokenizer the way the tutorial prepares it:
/// the pad token falls back to the eos token, and a tokenizer without a chat
/// template gets the GLM-4 one (with a notice on stderr).
pub fn load_tokenizer(dir: &Path) -> anyhow::Result<PreTrainedTokenizer> {
    let mut tokenizer = PreTrainedTokenizer::from_pretrained(dir)?;
    if tokenizer.pad_token_id().is_none() {
        if let Some(eos) = tokenizer.eos_token().map(str::to_string) {
            tokenizer.set_pad_token(&eos)?;
        }
    }
    if tokenizer.chat_template().is_none() {
        eprintln!(
            "note: {} has no chat template; using the GLM-4 template",
            dir.display()
        );
        tokenizer.set_chat_template(GLM4_CHAT_TEMPLATE.to_string());
    }
    Ok(tokenizer)
}
