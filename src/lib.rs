//! GLM-4 for the `glm4` fine-tuning tool: the model (GLM-4-9B and GLM-4-0414)
//! in tch, its chat template, and the glue to the TRL-like API in `trl_like`.

pub mod glm;

/// The GLM-4 chat template the tutorial installs when a tokenizer has none
/// (tool-aware; starts with `[gMASK]<sop>`).
pub const GLM4_CHAT_TEMPLATE: &str = include_str!("glm4_chat_template.jinja");

pub mod tutorial;

use std::path::Path;
use trl_like::tokenizer::PreTrainedTokenizer;

/// Why a model directory's tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "model directory {dir} does not exist; download it with `glm4 download THUDM/glm-4-9b-hf --local_dir {quoted}` \
         (or pass --model_name_or_path DIR of a downloaded model)"
    )]
    MissingModelDir { dir: String, quoted: String },
    #[error(transparent)]
    Tokenizer(#[from] trl_like::tokenizer::TokenizerError),
}

/// Fails with how to get the model when `dir` is not a directory (rather
/// than with the first file that is missing from it).
pub fn require_model_dir(dir: &Path) -> Result<(), LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::MissingModelDir {
            dir: dir.display().to_string(),
            quoted: shell_quote(&dir.display().to_string()),
        });
    }
    Ok(())
}

/// `s` as one shell word: unchanged when it is plain, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Loads a model directory's tokenizer the way the tutorial prepares it:
/// the pad token falls back to the eos token, and a tokenizer without a chat
/// template gets the GLM-4 one (with a notice on stderr).
pub fn load_tokenizer(dir: &Path) -> Result<PreTrainedTokenizer, LoadError> {
    require_model_dir(dir)?;
    let mut tokenizer = PreTrainedTokenizer::from_pretrained(dir)?;
    if tokenizer.pad_token_id().is_none() {
        if let Some(eos) = tokenizer.eos_token().map(str::to_string) {
            tokenizer.set_pad_token(&eos)?;
        }
    }
    if tokenizer.chat_template().is_none() {
        log::info!(
            "note: {} has no chat template; using the GLM-4 template",
            dir.display()
        );
        tokenizer.set_chat_template(GLM4_CHAT_TEMPLATE.to_string());
    }
    Ok(tokenizer)
}
