//! A TRL / transformers / PEFT-like API over tch-rs (libtorch).
//!
//! Model-agnostic: models plug in through [`modeling::CausalLM`]; tokenizers
//! are Hugging Face `tokenizer.json` files with their Jinja chat templates.

pub mod chat_template;
pub mod config;
pub mod data;
pub mod distributed;
pub mod fsutil;
pub mod fused;
pub mod generation;
pub mod hub;
pub mod modeling;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod quant;
pub mod tokenizer;
pub mod tracking;
pub mod trainer;
