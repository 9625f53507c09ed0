//! TRL's `DPOTrainer` on the shared [`Trainer`]: preference pairs are
//! tokenized as TRL 1.16 does ([`crate::data::preference`]), each
//! micro-batch holds the chosen sequences then the rejected ones (TRL's
//! concatenated forward), and the loss compares the policy's summed
//! completion log-probabilities with the reference model's.
//!
//! The reference model is never a second copy of the weights:
//! - new LoRA adapters (`peft_config`, or an adapter whose `lora_B` are all
//!   zero): the base with adapters disabled ([`crate::nn::with_adapters_disabled`]),
//!   as PEFT's `disable_adapter()`;
//! - an adapter that already holds trained weights (TRL keeps a frozen copy
//!   of it as the "ref" adapter), full fine-tuning (TRL keeps a frozen copy of
//!   the model), or `precompute_ref_log_probs`: the reference log-probabilities
//!   of every pair are computed once before training, from the model as it is
//!   then — the same numbers, with no copy in memory.
//!
//! With `disable_dropout` (TRL's default) both forwards run without dropout.

use super::hooks::{LossOutput, TrainingHooks};
use super::{Trainer, TrainerCallback, TrainerError};
use crate::config::{DPOConfig, DPOLossType, FDivergenceType, TruncationMode};
use crate::data::preference::{
    drop_pairs_without_completion, fingerprint_pairs, tokenize_preference_dataset, truncate_pair,
    PreferenceFormat, TokenizedPair,
};
use crate::data::Dataset;
use crate::modeling::{CausalLMInput, PreTrainedModel};
use crate::peft::{LoraConfig, PeftAdapter};
use crate::tokenizer::PreTrainedTokenizer;
use tch::{Device, Kind, Tensor};

/// `DPOTrainer` = the shared loop with DPO's data and loss.
pub type DPOTrainer<M> = Trainer<M, DPOHooks>;

/// Where the reference log-probabilities come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// The same model with its LoRA adapters switched off, at every step.
    DisabledAdapters,
    /// Computed once before training and carried by each pair.
    Precomputed,
}

/// DPO's collation and loss.
#[derive(Debug, Clone)]
pub struct DPOHooks {
    pub pad_token_id: i64,
    pub pad_to_multiple_of: Option<usize>,
    pub max_length: Option<usize>,
    pub truncation_mode: TruncationMode,
    pub beta: f64,
    pub loss_types: Vec<DPOLossType>,
    pub loss_weights: Vec<f64>,
    pub label_smoothing: f64,
    pub f_divergence_type: FDivergenceType,
    pub f_alpha_divergence_coef: f64,
    pub discopop_tau: f64,
    /// Run the forwards without dropout (`disable_dropout`).
    pub disable_dropout: bool,
    pub reference: Reference,
    /// Lay each batch's sequences back to back in one row (`padding_free`).
    pub padding_free: bool,
}

/// The metrics TRL's `DPOTrainer` logs beside the loss, in its order.
pub const DPO_METRICS: [&str; 10] = [
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// A collated micro-batch: `2 × pairs` rows, chosen first.
pub struct PreferenceBatch {
    /// `[2B, T]`.
    pub input_ids: Tensor,
    /// `[2B, T]`, 1 for real tokens.
    pub attention_mask: Tensor,
    /// `[2B, T]`, 1 for completion tokens (the ones whose log-probability counts).
    pub completion_mask: Tensor,
    pub has_padding: bool,
    /// `[rows, T]`: which of the `2B` sequences each token belongs to (the
    /// row index when padded; several per row when padding-free).
    pub segments: Tensor,
    /// `[2B]`: completion tokens of each sequence (IPO's length normalisation).
    pub completion_lens: Tensor,
    /// Padding-free: the sequence lengths of the single row, and positions restarting per sequence.
    pub seq_lens: Option<Vec<i64>>,
    pub position_ids: Option<Tensor>,
    /// `[B]` each, when precomputed.
    pub ref_logps: Option<(Tensor, Tensor)>,
    pub num_tokens: i64,
}

/// What one forward over a batch measured.
struct SequenceStats {
    /// `[2B]` summed completion log-probabilities (with grad when training).
    logps: Tensor,
    /// Token-mean negative log-likelihood of the chosen completions (the sft loss term).
    chosen_nll: Tensor,
    entropy: f64,
    logits_chosen: f64,
    logits_rejected: f64,
    accuracy: f64,
}

impl DPOHooks {
    pub fn new(
        args: &DPOConfig,
        tokenizer: &PreTrainedTokenizer,
        reference: Reference,
    ) -> Result<Self, TrainerError> {
        let pad_token_id = match &args.pad_token {
            Some(tok) => tokenizer.token_to_id(tok).ok_or_else(|| {
                TrainerError::Invalid(format!(
                    "pad_token {tok:?} is not in the tokenizer's vocabulary; remove it or name an existing token"
                ))
            })?,
            None => tokenizer
                .pad_token_id()
                .or_else(|| tokenizer.eos_token_id())
                .unwrap_or(0),
        };
        Ok(Self {
            pad_token_id,
            pad_to_multiple_of: args.pad_to_multiple_of,
            max_length: args.max_length,
            truncation_mode: args.truncation_mode,
            beta: args.beta,
            loss_types: args.loss_types()?,
            loss_weights: args.resolved_loss_weights(),
            label_smoothing: args.label_smoothing,
            f_divergence_type: args.f_divergence_type,
            f_alpha_divergence_coef: args.f_alpha_divergence_coef,
            discopop_tau: args.discopop_tau,
            disable_dropout: args.disable_dropout,
            reference,
            padding_free: args.padding_free,
        })
    }

    /// Runs `model` on the batch and measures each sequence's completion
    /// log-probability; `head_loss` turns those into the loss, which is
    /// backpropagated (divided by `denom`) when `backward`.
    fn forward<M: PreTrainedModel>(
        &self,
        model: &M,
        batch: &PreferenceBatch,
        train: bool,
        backward: bool,
        head_loss: impl FnOnce(&SequenceStats) -> Tensor,
        denom: f64,
    ) -> (SequenceStats, Tensor) {
        let input = CausalLMInput {
            input_ids: &batch.input_ids,
            attention_mask: batch.has_padding.then_some(&batch.attention_mask),
            position_ids: batch.position_ids.as_ref(),
            seq_lens: batch.seq_lens.as_deref(),
        };
        let dropout = train && !self.disable_dropout;
        model.forward_for_loss(&input, dropout, backward, |hidden| {
            let stats = sequence_stats(model, hidden, batch);
            let loss = head_loss(&stats);
            if backward {
                (&loss / denom).backward();
            }
            (stats, loss.detach())
        })
    }

    /// The reference's `[B]` chosen and rejected log-probabilities.
    fn reference_logps<M: PreTrainedModel>(
        &self,
        model: &M,
        batch: &PreferenceBatch,
    ) -> (Tensor, Tensor) {
        if let Some((c, r)) = &batch.ref_logps {
            return (c.shallow_clone(), r.shallow_clone());
        }
        let logps = crate::nn::with_adapters_disabled(|| {
            tch::no_grad(|| {
                self.forward(model, batch, false, false, |_| Tensor::from(0.0f32), 1.0)
                    .0
                    .logps
            })
        });
        let b = logps.size()[0] / 2;
        (logps.narrow(0, 0, b), logps.narrow(0, b, b))
    }

    /// TRL's per-sequence loss of each `loss_type`, weighted and summed.
    fn loss(
        &self,
        stats: &SequenceStats,
        refs: &(Tensor, Tensor),
        batch: &PreferenceBatch,
    ) -> Tensor {
        let b = stats.logps.size()[0] / 2;
        let (chosen, rejected) = (stats.logps.narrow(0, 0, b), stats.logps.narrow(0, b, b));
        let chosen_logratios = &chosen - &refs.0;
        let rejected_logratios = &rejected - &refs.1;
        let (chosen_scores, rejected_scores) = self.scores(&chosen_logratios, &rejected_logratios);
        let delta = &chosen_scores - &rejected_scores;
        let beta = self.beta;
        let ls = self.label_smoothing;
        let lens = batch.completion_lens.clamp_min(1.0);
        let (chosen_len, rejected_len) = (lens.narrow(0, 0, b), lens.narrow(0, b, b));
        let logsig = |x: &Tensor| x.log_sigmoid();
        let mut total = Tensor::zeros([], (Kind::Float, stats.logps.device()));
        for (t, w) in self.loss_types.iter().zip(&self.loss_weights) {
            use DPOLossType::*;
            let per_seq = match t {
                Sigmoid => -logsig(&(&delta * beta)),
                Hinge => (-(&delta * beta) + 1.0).relu(),
                Ipo => {
                    // IPO normalises the summed log ratios by the completion length (TRL, confirmed with the authors).
                    let d = &chosen_scores / &chosen_len - &rejected_scores / &rejected_len;
                    (d - 1.0 / (2.0 * beta)).square()
                }
                ExoPair => {
                    let x = &delta * beta;
                    let (log_pw, log_pl) = ((-ls).ln_1p(), ls.ln());
                    x.sigmoid() * (logsig(&x) - log_pw) + (-&x).sigmoid() * (logsig(&-&x) - log_pl)
                }
                NcaPair => {
                    let (cr, rr) = (&chosen_logratios * beta, &rejected_logratios * beta);
                    -logsig(&cr) - logsig(&-&cr) * 0.5 - logsig(&-&rr) * 0.5
                }
                Robust => {
                    let x = &delta * beta;
                    (-logsig(&x) * (1.0 - ls) + logsig(&-&x) * ls) / (1.0 - 2.0 * ls)
                }
                BcoPair => {
                    -logsig(&(&chosen_logratios * beta)) - logsig(&(&rejected_logratios * -beta))
                }
                SppoHard => {
                    (&chosen_logratios - 0.5 / beta).square()
                        + (&rejected_logratios + 0.5 / beta).square()
                }
                Aot | AotUnpaired => {
                    let (a, r) = if *t == Aot {
                        (&chosen - &rejected, &refs.0 - &refs.1)
                    } else {
                        (
                            chosen_logratios.shallow_clone(),
                            rejected_logratios.shallow_clone(),
                        )
                    };
                    let d = a.sort(0, false).0 - r.sort(0, false).0;
                    let x = d * beta;
                    -logsig(&x) * (1.0 - ls) - logsig(&-&x) * ls
                }
                ApoZero => {
                    (-(&chosen_logratios * beta).sigmoid() + 1.0)
                        + (&rejected_logratios * beta).sigmoid()
                }
                ApoDown => {
                    (&chosen_logratios * beta).sigmoid()
                        + (-((&chosen_logratios - &rejected_logratios) * beta).sigmoid() + 1.0)
                }
                Discopop => {
                    let x = &delta * beta;
                    let modulation = (&x / self.discopop_tau).sigmoid();
                    -logsig(&x) * (-&modulation + 1.0) + (-&x).exp() * &modulation
                }
                // The chosen completions' token-mean NLL, expanded per sequence.
                Sft => stats.chosen_nll.expand([b], false),
                SigmoidNorm => {
                    let d = &chosen_scores / &chosen_len - &rejected_scores / &rejected_len;
                    -logsig(&(d * beta))
                }
            };
            total += per_seq.mean(Kind::Float) * *w;
        }
        total
    }

    /// f-DPO: the scores compared instead of the plain log ratios.
    fn scores(&self, c: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
        match self.f_divergence_type {
            FDivergenceType::ReverseKl => (c.shallow_clone(), r.shallow_clone()),
            FDivergenceType::ForwardKl => (-(-c).exp() + 1.0, -(-r).exp() + 1.0),
            FDivergenceType::JsDivergence => {
                let ln2 = std::f64::consts::LN_2;
                (c.log_sigmoid() + ln2, r.log_sigmoid() + ln2)
            }
            FDivergenceType::AlphaDivergence => {
                let a = self.f_alpha_divergence_coef;
                if (a - 1.0).abs() < 1e-6 {
                    return (c.shallow_clone(), r.shallow_clone());
                }
                let coef = 1.0 / (a - 1.0);
                // Clamped so that exp stays finite (TRL: 80 in fp32).
                let f = |x: &Tensor| ((x * (a - 1.0)).clamp_max(80.0).exp() - 1.0) * coef;
                (f(c), f(r))
            }
        }
    }
}

/// Per-sequence completion log-probabilities and TRL's statistics from the
/// final hidden states (logits in fp32, as transformers computes them).
/// Works on padded batches (one sequence per row) and padding-free ones (all
/// sequences in one row): each target token is summed into its sequence.
///
/// # Shapes
/// `hidden`: `[rows, T, hidden]`.
fn sequence_stats<M: PreTrainedModel>(
    model: &M,
    hidden: &Tensor,
    batch: &PreferenceBatch,
) -> SequenceStats {
    let t = batch.input_ids.size()[1];
    let n = batch.completion_lens.size()[0];
    let b = n / 2;
    // Position i predicts token i + 1 — of the same sequence only.
    let logits = model
        .lm_head(&hidden.narrow(1, 0, t - 1))
        .to_kind(Kind::Float);
    let logp = logits.log_softmax(-1, Kind::Float);
    let targets = batch.input_ids.narrow(1, 1, t - 1);
    let seg = batch.segments.narrow(1, 1, t - 1);
    let same = seg.eq_tensor(&batch.segments.narrow(1, 0, t - 1));
    let mask_f = batch
        .completion_mask
        .narrow(1, 1, t - 1)
        .to_kind(Kind::Float)
        * same.to_kind(Kind::Float);
    let per_token = logp
        .gather(2, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1)
        * &mask_f;
    let logps = Tensor::zeros([n], (Kind::Float, per_token.device())).index_add(
        0,
        &seg.reshape([-1]),
        &per_token.reshape([-1]),
    );
    let chosen_f = seg.lt(b).to_kind(Kind::Float) * &mask_f;
    let rejected_f = seg.ge(b).to_kind(Kind::Float) * &mask_f;
    let chosen_nll =
        -(&per_token * &chosen_f).sum(Kind::Float) / chosen_f.sum(Kind::Float).clamp_min(1.0);
    let (entropy, logits_chosen, logits_rejected, accuracy) = tch::no_grad(|| {
        let avg = |l: &Tensor, m: &Tensor| {
            let count = m.sum(Kind::Float).double_value(&[]);
            if count > 0.0 {
                (l * m).sum(Kind::Float).double_value(&[]) / count
            } else {
                0.0
            }
        };
        let ent = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
        let mean_logits = logits.mean_dim(-1, false, Kind::Float);
        let top1 = logp
            .argmax(-1, false)
            .eq_tensor(&targets)
            .to_kind(Kind::Float);
        (
            avg(&ent, &mask_f),
            avg(&mean_logits, &chosen_f),
            avg(&mean_logits, &rejected_f),
            avg(&top1, &chosen_f),
        )
    });
    SequenceStats {
        logps,
        chosen_nll,
        entropy,
        logits_chosen,
        logits_rejected,
        accuracy,
    }
}

impl<M: PreTrainedModel> TrainingHooks<M> for DPOHooks {
    type Args = DPOConfig;
    type Example = TokenizedPair;
    type Batch = PreferenceBatch;

    fn metric_names(&self) -> Vec<&'static str> {
        DPO_METRICS.to_vec()
    }

    fn example_len(&self, example: &TokenizedPair) -> usize {
        let n = example.max_len();
        self.max_length.map_or(n, |m| n.min(m))
    }

    fn fingerprint(&self, examples: &[TokenizedPair]) -> String {
        fingerprint_pairs(examples)
    }

    /// TRL's `DataCollatorForPreference`: prompt + chosen rows, then prompt +
    /// rejected rows, each cut to `max_length`, right-padded.
    fn collate(&self, examples: &[&TokenizedPair], device: Device) -> PreferenceBatch {
        let rows: Vec<(Vec<i64>, Vec<i64>)> = examples
            .iter()
            .map(|e| {
                truncate_pair(
                    &e.prompt_ids,
                    &e.chosen_ids,
                    self.max_length,
                    self.truncation_mode,
                )
            })
            .chain(examples.iter().map(|e| {
                truncate_pair(
                    &e.prompt_ids,
                    &e.rejected_ids,
                    self.max_length,
                    self.truncation_mode,
                )
            }))
            .collect();
        let completion_lens: Vec<f32> = rows
            .iter()
            .map(|(_, m)| m.iter().sum::<i64>() as f32)
            .collect();
        let completion_lens = Tensor::from_slice(&completion_lens).to_device(device);
        let ref_logps = examples
            .iter()
            .map(|e| e.ref_logps)
            .collect::<Option<Vec<(f64, f64)>>>()
            .filter(|_| self.reference == Reference::Precomputed)
            .map(|v| {
                let c: Vec<f32> = v.iter().map(|p| p.0 as f32).collect();
                let r: Vec<f32> = v.iter().map(|p| p.1 as f32).collect();
                (
                    Tensor::from_slice(&c).to_device(device),
                    Tensor::from_slice(&r).to_device(device),
                )
            });
        let num_tokens: i64 = rows.iter().map(|(r, _)| r.len() as i64).sum();
        if self.padding_free {
            // One row: the sequences back to back, positions restarting at each.
            let (mut ids, mut comp, mut seg, mut pos) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (i, (row, mask)) in rows.iter().enumerate() {
                ids.extend_from_slice(row);
                comp.extend_from_slice(mask);
                seg.extend(std::iter::repeat_n(i as i64, row.len()));
                pos.extend(0..row.len() as i64);
            }
            let shape = [1, ids.len() as i64];
            let t = |v: &[i64]| Tensor::from_slice(v).reshape(shape).to_device(device);
            return PreferenceBatch {
                input_ids: t(&ids),
                attention_mask: Tensor::ones(shape, (Kind::Int64, device)),
                completion_mask: t(&comp),
                has_padding: false,
                segments: t(&seg),
                completion_lens,
                seq_lens: Some(rows.iter().map(|(r, _)| r.len() as i64).collect()),
                position_ids: Some(t(&pos)),
                ref_logps,
                num_tokens,
            };
        }
        let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let width = match self.pad_to_multiple_of {
            Some(m) if m > 1 => longest.div_ceil(m) * m,
            _ => longest,
        };
        let n = rows.len();
        let (mut ids, mut attn, mut comp, mut seg) = (
            Vec::with_capacity(n * width),
            Vec::with_capacity(n * width),
            Vec::with_capacity(n * width),
            Vec::with_capacity(n * width),
        );
        for (i, (row, mask)) in rows.iter().enumerate() {
            let pad = width - row.len();
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(self.pad_token_id, pad));
            attn.extend(std::iter::repeat_n(1i64, row.len()));
            attn.extend(std::iter::repeat_n(0i64, pad));
            comp.extend_from_slice(mask);
            comp.extend(std::iter::repeat_n(0i64, pad));
            seg.extend(std::iter::repeat_n(i as i64, width));
        }
        let shape = [n as i64, width as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).reshape(shape).to_device(device);
        PreferenceBatch {
            input_ids: t(&ids),
            attention_mask: t(&attn),
            completion_mask: t(&comp),
            has_padding: rows.iter().any(|(r, _)| r.len() < width),
            segments: t(&seg),
            completion_lens,
            seq_lens: None,
            position_ids: None,
            ref_logps,
            num_tokens,
        }
    }

    /// One per micro-batch: TRL's DPO loss is a mean over the batch's pairs,
    /// and transformers divides it by the accumulation steps.
    fn num_loss_tokens(&self, _batch: &PreferenceBatch) -> i64 {
        1
    }

    fn num_input_slots(&self, batch: &PreferenceBatch) -> i64 {
        batch.input_ids.numel() as i64
    }

    fn compute_loss(
        &self,
        model: &M,
        batch: &PreferenceBatch,
        num_items: Option<i64>,
        train: bool,
    ) -> Result<LossOutput, TrainerError> {
        if self.reference == Reference::Precomputed && batch.ref_logps.is_none() {
            return Err(TrainerError::Invalid(
                "DPO: a batch without precomputed reference log-probabilities".into(),
            ));
        }
        let refs = self.reference_logps(model, batch);
        let denom = num_items.unwrap_or(1).max(1) as f64;
        let (stats, loss) = self.forward(
            model,
            batch,
            train,
            train,
            |s| self.loss(s, &refs, batch),
            denom,
        );
        let b = stats.logps.size()[0] / 2;
        let (metrics, loss) = tch::no_grad(|| {
            let logps = stats.logps.detach();
            let (chosen, rejected) = (logps.narrow(0, 0, b), logps.narrow(0, b, b));
            let chosen_rewards = (&chosen - &refs.0) * self.beta;
            let rejected_rewards = (&rejected - &refs.1) * self.beta;
            let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
            let metrics = vec![
                ("entropy", stats.entropy),
                ("logits/chosen", stats.logits_chosen),
                ("logits/rejected", stats.logits_rejected),
                ("mean_token_accuracy", stats.accuracy),
                ("rewards/chosen", mean(&chosen_rewards)),
                ("rewards/rejected", mean(&rejected_rewards)),
                (
                    "rewards/accuracies",
                    mean(
                        &chosen_rewards
                            .gt_tensor(&rejected_rewards)
                            .to_kind(Kind::Float),
                    ),
                ),
                (
                    "rewards/margins",
                    mean(&(&chosen_rewards - &rejected_rewards)),
                ),
                ("logps/chosen", mean(&chosen)),
                ("logps/rejected", mean(&rejected)),
            ];
            (metrics, loss.double_value(&[]) / denom)
        });
        Ok(LossOutput {
            loss,
            num_tokens: batch.num_tokens,
            metrics,
        })
    }
}

/// Where the trained adapters come from.
enum Adapters {
    None,
    New(LoraConfig),
    Existing(PeftAdapter),
}

/// Builds a [`DPOTrainer`] (`DPOTrainer::builder(model, args)`).
pub struct DPOTrainerBuilder<'d, M: PreTrainedModel> {
    model: M,
    args: DPOConfig,
    train_dataset: Option<&'d Dataset>,
    eval_dataset: Option<&'d Dataset>,
    processing_class: Option<PreTrainedTokenizer>,
    adapters: Adapters,
    callbacks: Vec<Box<dyn TrainerCallback>>,
}

impl<M: PreTrainedModel> Trainer<M, DPOHooks> {
    /// `DPOTrainer(model=…, args=…, …)` with TRL's keyword arguments as
    /// builder methods; [`DPOTrainerBuilder::build`] prepares the pairs,
    /// attaches the adapters and sets up the reference.
    pub fn builder<'d>(model: M, args: DPOConfig) -> DPOTrainerBuilder<'d, M> {
        DPOTrainerBuilder {
            model,
            args,
            train_dataset: None,
            eval_dataset: None,
            processing_class: None,
            adapters: Adapters::None,
            callbacks: Vec::new(),
        }
    }
}

impl<'d, M: PreTrainedModel> DPOTrainerBuilder<'d, M> {
    pub fn train_dataset(mut self, dataset: &'d Dataset) -> Self {
        self.train_dataset = Some(dataset);
        self
    }

    /// The evaluation set (an empty one means none).
    pub fn eval_dataset(mut self, dataset: &'d Dataset) -> Self {
        self.eval_dataset = Some(dataset);
        self
    }

    /// The tokenizer (default: the one saved with the model).
    pub fn processing_class(mut self, tokenizer: PreTrainedTokenizer) -> Self {
        self.processing_class = Some(tokenizer);
        self
    }

    /// Train new LoRA adapters with this config (`None`: full fine-tuning).
    pub fn peft_config(mut self, config: Option<LoraConfig>) -> Self {
        self.adapters = config.map_or(Adapters::None, Adapters::New);
        self
    }

    /// Continue training adapters the model already carries; the reference
    /// is the model with these adapters as they are now.
    pub fn peft_model(mut self, adapter: PeftAdapter) -> Self {
        self.adapters = Adapters::Existing(adapter);
        self
    }

    /// Callbacks run after the default ones, in this order.
    pub fn callbacks(mut self, callbacks: Vec<Box<dyn TrainerCallback>>) -> Self {
        self.callbacks = callbacks;
        self
    }

    /// Validates the config, tokenizes the pairs, attaches the adapters and
    /// precomputes the reference log-probabilities where needed.
    pub fn build(self) -> Result<DPOTrainer<M>, TrainerError> {
        let Self {
            mut model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            adapters,
            callbacks,
        } = self;
        args.validate()?;
        if args.fp16 {
            return Err(TrainerError::Invalid(
                "fp16 is not supported yet (use bf16 or float32); remove it from the config or flags".into(),
            ));
        }
        if args.neftune_noise_alpha.is_some() {
            return Err(TrainerError::Invalid(
                "neftune_noise_alpha is not supported by DPOTrainer; remove it from the config or flags".into(),
            ));
        }
        let train_dataset = train_dataset
            .ok_or_else(|| TrainerError::Invalid("DPOTrainer needs a train_dataset".into()))?;
        let tokenizer = match processing_class {
            Some(t) => t,
            None => PreTrainedTokenizer::from_pretrained(std::path::Path::new(&model.name_or_path()))
                .map_err(|e| {
                    TrainerError::Invalid(format!(
                        "no processing_class given and the model's tokenizer could not be loaded ({e}); \
                         pass one with .processing_class(..)"
                    ))
                })?,
        };
        let mut train = prepare_pairs(train_dataset, &tokenizer, &args, "training")?;
        let mut eval = match eval_dataset {
            Some(ds) if !ds.is_empty() => Some(prepare_pairs(ds, &tokenizer, &args, "evaluation")?),
            _ => None,
        };
        let (peft, reference) = match adapters {
            Adapters::None => (None, Reference::Precomputed),
            Adapters::New(mut cfg) => {
                if cfg.base_model_name_or_path.is_none() {
                    cfg.base_model_name_or_path = Some(model.name_or_path());
                }
                tch::manual_seed(args.seed as i64);
                let device = model.device();
                (
                    Some(PeftAdapter::attach_new(&mut model, cfg, device)?),
                    Reference::DisabledAdapters,
                )
            }
            Adapters::Existing(adapter) => {
                // A fresh adapter (B = 0) is the identity: its reference is the base.
                let fresh = adapter
                    .named_parameters()
                    .iter()
                    .filter(|(n, _)| n.contains("lora_B"))
                    .all(|(_, t)| t.abs().max().double_value(&[]) == 0.0);
                let reference = if fresh {
                    Reference::DisabledAdapters
                } else {
                    Reference::Precomputed
                };
                (Some(adapter), reference)
            }
        };
        let reference = if args.precompute_ref_log_probs {
            Reference::Precomputed
        } else {
            reference
        };
        let hooks = DPOHooks::new(&args, &tokenizer, reference)?;
        if reference == Reference::Precomputed {
            let train_bs = args
                .precompute_ref_batch_size
                .unwrap_or(args.per_device_train_batch_size);
            precompute_ref_logps(&model, &hooks, &mut train, train_bs)?;
            if let Some(eval) = eval.as_mut() {
                let eval_bs = args
                    .precompute_ref_batch_size
                    .unwrap_or(args.per_device_eval_batch_size);
                precompute_ref_logps(&model, &hooks, eval, eval_bs)?;
            }
        }
        Ok(Trainer::new(
            model,
            args,
            (train, eval),
            tokenizer,
            peft,
            hooks,
            callbacks,
        ))
    }
}

/// Tokenizes a preference dataset and drops the pairs TRL drops.
pub fn prepare_pairs(
    dataset: &Dataset,
    tokenizer: &PreTrainedTokenizer,
    args: &DPOConfig,
    split: &str,
) -> Result<Vec<TokenizedPair>, TrainerError> {
    let (format, pairs) = tokenize_preference_dataset(dataset, tokenizer)?;
    log::info!("{split} data: {} pairs, {}", pairs.len(), format.name());
    let (pairs, dropped) =
        drop_pairs_without_completion(pairs, args.max_length, args.truncation_mode);
    if dropped > 0 {
        log::warn!(
            "{split} data: dropped {dropped} pairs whose prompt alone fills max_length {}",
            args.max_length.unwrap_or(0)
        );
    }
    if pairs.is_empty() {
        return Err(TrainerError::Invalid(format!(
            "no usable {split} pairs: every prompt fills max_length {}; raise max_length",
            args.max_length.unwrap_or(0)
        )));
    }
    if format == PreferenceFormat::Tokenized {
        log::info!("{split} data is already tokenized; the chat template is not applied");
    }
    Ok(pairs)
}

/// TRL's `_precompute_ref_logps`: the reference log-probabilities of every
/// pair, from the model as it is now, without dropout.
fn precompute_ref_logps<M: PreTrainedModel>(
    model: &M,
    hooks: &DPOHooks,
    pairs: &mut [TokenizedPair],
    batch_size: usize,
) -> Result<(), TrainerError> {
    let device = model.device();
    let mut plain = hooks.clone();
    plain.reference = Reference::DisabledAdapters;
    for chunk in pairs.chunks_mut(batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = <DPOHooks as TrainingHooks<M>>::collate(&plain, &refs, device);
        let logps = tch::no_grad(|| {
            plain
                .forward(model, &batch, false, false, |_| Tensor::from(0.0f32), 1.0)
                .0
                .logps
        });
        let v = Vec::<f64>::try_from(logps.to_kind(Kind::Double)).map_err(|e| {
            TrainerError::Invalid(format!("reading the reference log-probabilities: {e}"))
        })?;
        let b = chunk.len();
        for (i, pair) in chunk.iter_mut().enumerate() {
            pair.ref_logps = Some((v[i], v[b + i]));
        }
    }
    Ok(())
}
