//! ZeRO stages 0-2 (arXiv 1910.02054, DeepSpeed's `stage_1_and_2.py` and its
//! bf16 optimizer) over the c10d process group.
//!
//! The trainable parameters are laid end to end in one flat index space
//! (decayed parameters first, then the exempt ones, so weight decay covers a
//! prefix). Rank `r` of `N` owns the contiguous shard `[r·P, (r+1)·P)` with
//! `P = ceil(Ψ/N)`; the last shards may be short or empty, and are padded
//! with zeros that never reach a parameter. Each rank keeps, for its shard
//! only, an fp32 master copy of the weights, fp32 AdamW moments and (ZeRO-2)
//! the fp32 gradient:
//!
//! * gradients travel in fp32 buckets: bucket `k` is the `k`-th chunk of
//!   every rank's shard, so one reduce-scatter (ZeRO-2) or all-reduce
//!   (ZeRO-1) leaves each rank the summed gradient of its own chunk;
//! * the global gradient norm is one all-reduce of the shards' squared norms;
//! * AdamW (`torch.optim.AdamW` arithmetic, as [`super::AdamW`]) updates the
//!   fp32 master shard;
//! * an all-gather in the working dtype (bf16 for a bf16 model) writes the
//!   updated shards back into every rank's weights.
//!
//! Stage 0 keeps the whole fp32 master and moments on every rank (DeepSpeed's
//! bf16 optimizer without partitioning). In fp32 every stage computes exactly
//! the numbers of plain AdamW on all-reduced gradients.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{AdamW, OptimError};
use crate::distributed::{DistError, ProcessGroup, ReduceOp};

/// Why a ZeRO step or its checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error(transparent)]
    Distributed(#[from] DistError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error("ZeRO optimizer checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
}

/// Values of one gradient / all-gather bucket across all ranks (fp32: 25 MB).
const BUCKET_VALUES: i64 = (crate::distributed::BUCKET_BYTES / 4) as i64;

/// The layout file of a ZeRO optimizer checkpoint.
pub const ZERO_LAYOUT_FILE: &str = "zero_optimizer.json";

/// `zero_optimizer.json`: how the shards of a checkpoint cover the flat space.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct ZeroLayout {
    stage: u8,
    /// Number of shard files.
    shards: usize,
    /// Flat values in all.
    numel: i64,
    /// Adam steps taken.
    step: u64,
    /// `[name, numel]` of each parameter in flat order.
    params: Vec<(String, i64)>,
}

/// The file of shard `r` of `shards` in a checkpoint.
pub fn shard_file_name(r: usize, shards: usize) -> String {
    format!("zero_optim_shard_{r:05}_of_{shards:05}.safetensors")
}

/// Per-rank bytes of the optimizer's own state (fp32 master + two moments)
/// and of its fp32 gradient shard, for `numel` trainable values.
pub fn zero_state_bytes(numel: i64, stage: u8, world_size: usize) -> (i64, i64) {
    let shards = if stage == 0 {
        1
    } else {
        world_size.max(1) as i64
    };
    let p = (numel + shards - 1) / shards;
    let grads = if stage >= 2 { p } else { numel };
    (12 * p, 4 * grads)
}

/// DeepSpeed's ZeRO-1/2 optimizer (and stage 0: bf16 master weights only).
#[derive(Debug)]
pub struct ZeroOptimizer {
    stage: u8,
    /// Trainable tensors in flat order.
    params: Vec<(String, Tensor)>,
    /// Flat offset of each parameter.
    offsets: Vec<i64>,
    /// Flat values `[0, decay_end)` take weight decay.
    decay_end: i64,
    numel: i64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    /// This rank's shard index and the number of shards (1 for stage 0).
    shard: usize,
    shards: usize,
    /// Shard length P (padded) and bucket chunk length C.
    partition: i64,
    chunk: i64,
    device: Device,
    /// fp32 master weights of the shard (None until first taken from the weights).
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The shard's fp32 gradient of the current step.
    grad: Tensor,
    step: u64,
}

impl ZeroOptimizer {
    /// Lays out `named` (the trainable tensors) for `stage` over `group`'s
    /// ranks (one rank without a group). Hyper-parameters are checked as
    /// [`AdamW::try_new`] checks them.
    pub fn new(
        named: Vec<(String, Tensor)>,
        weight_decay: f64,
        (betas, eps): ((f64, f64), f64),
        stage: u8,
        group: Option<&ProcessGroup>,
    ) -> Result<Self, ZeroError> {
        let groups = super::decay_groups(named, weight_decay);
        // Validation only (betas, eps, weight decay, unique names).
        AdamW::try_new(
            groups
                .iter()
                .map(|g| super::ParamGroup {
                    name: g.name.clone(),
                    params: g
                        .params
                        .iter()
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect(),
                    weight_decay: g.weight_decay,
                })
                .collect(),
            betas,
            eps,
        )?;
        let decay_end: i64 = groups[0].params.iter().map(|(_, t)| t.numel() as i64).sum();
        let params: Vec<(String, Tensor)> = groups.into_iter().flat_map(|g| g.params).collect();
        let mut offsets = Vec::with_capacity(params.len());
        let mut numel = 0i64;
        for (_, t) in &params {
            offsets.push(numel);
            numel += t.numel() as i64;
        }
        let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
        let (shard, shards) = if stage == 0 { (0, 1) } else { (rank, world) };
        let partition = ((numel + shards as i64 - 1) / shards as i64).max(1);
        let chunk = partition.min((BUCKET_VALUES / shards as i64).max(1));
        let device = params.first().map_or(Device::Cpu, |(_, t)| t.device());
        let zeros = || Tensor::zeros([partition], (Kind::Float, device));
        Ok(Self {
            stage,
            params,
            offsets,
            decay_end,
            numel,
            weight_decay,
            betas,
            eps,
            shard,
            shards,
            partition,
            chunk,
            device,
            master: None,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            grad: zeros(),
            step: 0,
        })
    }

    pub fn stage(&self) -> u8 {
        self.stage
    }

    /// Trainable values in all (Ψ).
    pub fn numel(&self) -> i64 {
        self.numel
    }

    /// Bytes this rank holds for the fp32 master and moments, and for gradients in fp32.
    pub fn state_bytes(&self) -> (i64, i64) {
        zero_state_bytes(self.numel, self.stage, self.shards)
    }

    /// `[start, end)` of this rank's shard in the flat space (without padding).
    fn owned(&self, shard: usize) -> (i64, i64) {
        let start = (shard as i64 * self.partition).min(self.numel);
        (start, (start + self.partition).min(self.numel))
    }

    /// Copies flat `[lo, lo + dst.numel())` of the per-parameter tensors that
    /// `source` gives into `dst` (zeros where nothing is stored).
    fn read_flat(&self, lo: i64, dst: &Tensor, source: impl Fn(usize) -> Option<Tensor>) {
        let hi = lo + dst.numel() as i64;
        let first = self.offsets.partition_point(|&o| o <= lo).saturating_sub(1);
        for i in first..self.params.len() {
            let (off, n) = (self.offsets[i], self.params[i].1.numel() as i64);
            if off >= hi {
                break;
            }
            let (a, b) = (lo.max(off), hi.min(off + n));
            if a >= b {
                continue;
            }
            if let Some(src) = source(i) {
                dst.narrow(0, a - lo, b - a)
                    .copy_(&src.reshape([-1]).narrow(0, a - off, b - a));
            }
        }
    }

    /// Writes `src` (flat `[lo, lo + src.numel())`) into the parameters.
    fn write_flat(&self, lo: i64, src: &Tensor) {
        let hi = (lo + src.numel() as i64).min(self.numel);
        let first = self.offsets.partition_point(|&o| o <= lo).saturating_sub(1);
        for i in first..self.params.len() {
            let (off, n) = (self.offsets[i], self.params[i].1.numel() as i64);
            if off >= hi {
                break;
            }
            let (a, b) = (lo.max(off), hi.min(off + n));
            if a >= b {
                continue;
            }
            let p = self.params[i].1.detach();
            p.view([-1])
                .narrow(0, a - off, b - a)
                .copy_(&src.narrow(0, a - lo, b - a));
        }
    }

    /// The fp32 master shard, taken from the (rank-0-broadcast) weights the
    /// first time it is needed.
    fn ensure_master(&mut self) {
        if self.master.is_none() {
            self.master = Some(self.current_master());
        }
    }

    /// The master shard, or before the first step the weights' values in fp32.
    fn current_master(&self) -> Tensor {
        if let Some(m) = &self.master {
            return m.shallow_clone();
        }
        let master = Tensor::zeros([self.partition], (Kind::Float, self.device));
        let (start, end) = self.owned(self.shard);
        if end > start {
            tch::no_grad(|| {
                self.read_flat(start, &master.narrow(0, 0, end - start), |i| {
                    Some(self.params[i].1.detach())
                })
            });
        }
        master
    }

    /// Sums the step's gradients over the ranks into this rank's fp32 shard
    /// (ZeRO-2: reduce-scatter; stages 0/1: all-reduce), scaled by `scale`,
    /// then drops the parameters' own gradients. A parameter without a
    /// gradient contributes zeros.
    pub fn reduce_gradients(
        &mut self,
        group: Option<&ProcessGroup>,
        scale: f64,
    ) -> Result<(), ZeroError> {
        self.ensure_master();
        let world = group.map_or(1, |g| g.world_size());
        tch::no_grad(|| -> Result<(), ZeroError> {
            let mut k0 = 0;
            while k0 < self.partition {
                let c = self.chunk.min(self.partition - k0);
                let input = Tensor::zeros([self.shards as i64 * c], (Kind::Float, self.device));
                for r in 0..self.shards {
                    let lo = r as i64 * self.partition + k0;
                    let len = c.min(self.numel - lo).max(0);
                    if len > 0 {
                        self.read_flat(lo, &input.narrow(0, r as i64 * c, len), |i| {
                            let g = self.params[i].1.grad();
                            g.defined().then_some(g)
                        });
                    }
                }
                let mut out = self.grad.narrow(0, k0, c);
                match group.filter(|_| world > 1) {
                    None => {
                        out.copy_(&input);
                    }
                    Some(g) if self.stage >= 2 => g.reduce_scatter(&mut out, &input)?,
                    Some(g) => {
                        let mut all = input;
                        g.all_reduce(&mut all, ReduceOp::Sum)?;
                        out.copy_(&all.narrow(0, self.shard as i64 * c, c));
                    }
                }
                if scale != 1.0 {
                    let _ = out.g_mul_scalar_(scale);
                }
                k0 += c;
            }
            Ok(())
        })?;
        self.zero_grad();
        Ok(())
    }

    /// The global L2 norm of the reduced gradient (one all-reduce of the
    /// shards' squared norms) and `clip_grad_norm_`'s scaling of the shard
    /// by `min(1, max_norm / (norm + 1e-6))`; `max_norm <= 0` only measures.
    pub fn clip_grad_norm(
        &mut self,
        group: Option<&ProcessGroup>,
        max_norm: f64,
    ) -> Result<f64, ZeroError> {
        let local = tch::no_grad(|| self.grad.norm().double_value(&[]));
        let mut sq = [local * local];
        if let Some(g) = group.filter(|_| self.shards > 1) {
            g.all_reduce_f64(&mut sq, ReduceOp::Sum)?;
        }
        let total = sq[0].sqrt();
        if max_norm > 0.0 {
            tch::no_grad(|| {
                let total_t = Tensor::scalar_tensor(total, (Kind::Float, self.device));
                let coef = ((&total_t + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
                let _ = self.grad.g_mul_(&coef);
            });
        }
        Ok(total)
    }

    /// One AdamW update of the master shard with learning rate `lr`
    /// (`torch.optim.AdamW`'s arithmetic in fp32), then the all-gather of the
    /// updated shards into every rank's weights.
    pub fn step(&mut self, lr: f64, group: Option<&ProcessGroup>) -> Result<(), ZeroError> {
        self.ensure_master();
        let (beta1, beta2) = self.betas;
        self.step += 1;
        let step = self.step as f64;
        let master = self
            .master
            .as_ref()
            .expect("initialised above")
            .shallow_clone();
        tch::no_grad(|| {
            let (start, _) = self.owned(self.shard);
            let decayed = (self.decay_end - start).clamp(0, self.partition);
            if self.weight_decay != 0.0 && decayed > 0 {
                let _ = master.narrow(0, 0, decayed).g_mul_(&Tensor::scalar_tensor(
                    1.0 - lr * self.weight_decay,
                    (Kind::Double, Device::Cpu),
                ));
            }
            let _ = self.exp_avg.lerp_(&self.grad, 1.0 - beta1);
            let _ = self
                .exp_avg_sq
                .g_mul_(&Tensor::scalar_tensor(beta2, (Kind::Double, Device::Cpu)));
            let scaled_grad = &self.grad * (1.0 - beta2);
            let _ = self.exp_avg_sq.addcmul_(&scaled_grad, &self.grad);
            let bias_correction1 = 1.0 - beta1.powf(step);
            let bias_correction2 = 1.0 - beta2.powf(step);
            let step_size = lr / bias_correction1;
            let mut denom = self.exp_avg_sq.sqrt() / bias_correction2.powf(0.5);
            let _ = denom.g_add_scalar_(self.eps);
            let scaled_exp_avg = &self.exp_avg * (-step_size);
            let _ = master.shallow_clone().addcdiv_(&scaled_exp_avg, &denom);
        });
        self.gather_weights(group)
    }

    /// Every rank's weights from the master shards (all-gather in the weights' dtype).
    fn gather_weights(&self, group: Option<&ProcessGroup>) -> Result<(), ZeroError> {
        let master = self.master.as_ref().expect("master exists after a step");
        let kinds: Vec<Kind> = self.params.iter().map(|(_, t)| t.kind()).collect();
        let kind = match kinds.first() {
            Some(&k) if kinds.iter().all(|&x| x == k) => k,
            _ => Kind::Float,
        };
        tch::no_grad(|| -> Result<(), ZeroError> {
            let group = group.filter(|g| g.world_size() > 1 && self.shards > 1);
            let mut k0 = 0;
            while k0 < self.partition {
                let c = self.chunk.min(self.partition - k0);
                let mine = master.narrow(0, k0, c).to_kind(kind);
                let gathered = match group {
                    Some(g) => {
                        let mut out = Tensor::zeros([self.shards as i64 * c], (kind, self.device));
                        g.all_gather(&mut out, &mine)?;
                        out
                    }
                    None => mine,
                };
                let ranks: Vec<usize> = match group {
                    Some(_) => (0..self.shards).collect(),
                    None => vec![self.shard],
                };
                for (i, r) in ranks.into_iter().enumerate() {
                    let lo = r as i64 * self.partition + k0;
                    let len = c.min(self.numel - lo);
                    if len > 0 {
                        self.write_flat(lo, &gathered.narrow(0, i as i64 * c, len));
                    }
                }
                k0 += c;
            }
            Ok(())
        })
    }

    /// Drops the parameters' gradients (`zero_grad(set_to_none=True)`).
    pub fn zero_grad(&self) {
        let params: Vec<&Tensor> = self.params.iter().map(|(_, t)| t).collect();
        super::adamw::set_grads_to_none(&params);
    }

    /// Whether this rank writes a shard file (stage 0: rank 0 writes the only one).
    pub fn writes_shard(&self, rank: usize) -> bool {
        self.shards > 1 || rank == 0
    }

    /// Writes this rank's shard (`master`, `exp_avg`, `exp_avg_sq`, without
    /// padding) to `dir`, and on the first shard the layout file.
    pub fn save_shard(&self, dir: &Path) -> Result<(), ZeroError> {
        let err = |path: &Path, message: String| ZeroError::Checkpoint {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
        let (start, end) = self.owned(self.shard);
        let len = end - start;
        let master = &self.current_master();
        let take = |t: &Tensor| t.narrow(0, 0, len).to_device(Device::Cpu);
        let tensors = vec![
            ("master".to_string(), take(master)),
            ("exp_avg".to_string(), take(&self.exp_avg)),
            ("exp_avg_sq".to_string(), take(&self.exp_avg_sq)),
        ];
        let path = dir.join(shard_file_name(self.shard, self.shards));
        Tensor::write_safetensors(&tensors, &path).map_err(|e| err(&path, e.to_string()))?;
        if self.shard == 0 {
            let layout = ZeroLayout {
                stage: self.stage,
                shards: self.shards,
                numel: self.numel,
                step: self.step,
                params: self
                    .params
                    .iter()
                    .map(|(n, t)| (n.clone(), t.numel() as i64))
                    .collect(),
            };
            let path = dir.join(ZERO_LAYOUT_FILE);
            let text = serde_json::to_string_pretty(&layout).expect("json");
            crate::fsutil::write_atomic(&path, text.as_bytes())
                .map_err(|e| err(&path, e.to_string()))?;
        }
        Ok(())
    }

    /// The names of the files a checkpoint of this optimizer consists of (layout first).
    pub fn checkpoint_file_names(&self) -> Vec<String> {
        let mut files = vec![ZERO_LAYOUT_FILE.to_string()];
        files.extend((0..self.shards).map(|r| shard_file_name(r, self.shards)));
        files
    }

    /// Restores this rank's shard from a checkpoint written with any number
    /// of shards (re-sharding: each rank reads the files that overlap its range).
    pub fn load(&mut self, dir: &Path) -> Result<(), ZeroError> {
        let layout_path = dir.join(ZERO_LAYOUT_FILE);
        let err = |path: &Path, message: String| ZeroError::Checkpoint {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(&layout_path).map_err(|e| {
            err(
                &layout_path,
                format!("{e} (was the checkpoint written without --deepspeed? resume it without --deepspeed, or start over)"),
            )
        })?;
        let layout: ZeroLayout =
            serde_json::from_str(&text).map_err(|e| err(&layout_path, e.to_string()))?;
        let ours: Vec<(String, i64)> = self
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.numel() as i64))
            .collect();
        if layout.params != ours {
            let first = layout
                .params
                .iter()
                .zip(&ours)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("{} ({} values) vs {} ({} values)", a.0, a.1, b.0, b.1))
                .unwrap_or_else(|| format!("{} vs {} parameters", layout.params.len(), ours.len()));
            return Err(err(
                &layout_path,
                format!("the trainable parameters differ from this run's: {first}"),
            ));
        }
        let saved_p = (layout.numel + layout.shards as i64 - 1) / layout.shards as i64;
        let (start, end) = self.owned(self.shard);
        let master = Tensor::zeros([self.partition], (Kind::Float, self.device));
        let (m, v) = (self.exp_avg.zeros_like(), self.exp_avg_sq.zeros_like());
        for r in 0..layout.shards {
            let (a, b) = (
                (r as i64 * saved_p).min(layout.numel),
                ((r as i64 + 1) * saved_p).min(layout.numel),
            );
            let (lo, hi) = (a.max(start), b.min(end));
            if lo >= hi {
                continue;
            }
            let path = dir.join(shard_file_name(r, layout.shards));
            let tensors = Tensor::read_safetensors(&path).map_err(|e| err(&path, e.to_string()))?;
            for (name, dst) in [("master", &master), ("exp_avg", &m), ("exp_avg_sq", &v)] {
                let src = tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| err(&path, format!("tensor {name} is missing")))?;
                if src.numel() as i64 != b - a {
                    return Err(err(
                        &path,
                        format!(
                            "tensor {name} has {} values, expected {}",
                            src.numel(),
                            b - a
                        ),
                    ));
                }
                tch::no_grad(|| {
                    dst.narrow(0, lo - start, hi - lo)
                        .copy_(&src.narrow(0, lo - a, hi - lo));
                });
            }
        }
        self.master = Some(master);
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = layout.step;
        Ok(())
    }
}

impl ZeroOptimizer {
    /// Takes over a plain AdamW checkpoint state (`AdamW::save`: per-parameter
    /// moments and step): this rank's slices of the moments in fp32; the master
    /// comes from the (already loaded) weights at the next step. This lets a
    /// run started without `--deepspeed` continue with it.
    pub fn load_plain(&mut self, path: &Path) -> Result<(), ZeroError> {
        let err = |message: String| ZeroError::Checkpoint {
            path: path.display().to_string(),
            message,
        };
        let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| err(e.to_string()))?
            .into_iter()
            .collect();
        let mut step = None;
        for (name, t) in &self.params {
            for suffix in [".exp_avg", ".exp_avg_sq"] {
                let key = format!("{name}{suffix}");
                match tensors.get(&key) {
                    Some(m) if m.numel() == t.numel() => {}
                    Some(m) => {
                        return Err(err(format!(
                            "{key} has {} values, the parameter {}",
                            m.numel(),
                            t.numel()
                        )))
                    }
                    None => return Err(err(format!("{key} is missing"))),
                }
            }
            let key = format!("{name}.step");
            let s = tensors
                .get(&key)
                .map(|t| t.double_value(&[]) as u64)
                .ok_or_else(|| err(format!("{key} is missing")))?;
            if *step.get_or_insert(s) != s {
                return Err(err(format!(
                    "{key} is {s} but other parameters took {} steps; ZeRO keeps one step count",
                    step.unwrap_or_default()
                )));
            }
        }
        let (start, end) = self.owned(self.shard);
        let (m, v) = (self.exp_avg.zeros_like(), self.exp_avg_sq.zeros_like());
        if end > start {
            tch::no_grad(|| {
                for (dst, suffix) in [(&m, ".exp_avg"), (&v, ".exp_avg_sq")] {
                    self.read_flat(start, &dst.narrow(0, 0, end - start), |i| {
                        tensors
                            .get(&format!("{}{suffix}", self.params[i].0))
                            .map(|t| t.to_kind(Kind::Float).to_device(self.device))
                    });
                }
            });
        }
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.master = None;
        self.step = step.unwrap_or(0);
        Ok(())
    }

    /// A ZeRO checkpoint in `dir` as [`AdamW::load_state_dict`] reads it
    /// (every shard gathered; moments cast to each parameter's dtype), so a
    /// run can continue without `--deepspeed`.
    pub fn plain_state_dict(
        dir: &Path,
        params: &[(String, Tensor)],
    ) -> Result<Vec<(String, Tensor)>, ZeroError> {
        let layout_path = dir.join(ZERO_LAYOUT_FILE);
        let err = |path: &Path, message: String| ZeroError::Checkpoint {
            path: path.display().to_string(),
            message,
        };
        let text =
            std::fs::read_to_string(&layout_path).map_err(|e| err(&layout_path, e.to_string()))?;
        let layout: ZeroLayout =
            serde_json::from_str(&text).map_err(|e| err(&layout_path, e.to_string()))?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for r in 0..layout.shards {
            let path = dir.join(shard_file_name(r, layout.shards));
            let tensors = Tensor::read_safetensors(&path).map_err(|e| err(&path, e.to_string()))?;
            for (name, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let t = tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.shallow_clone())
                    .ok_or_else(|| err(&path, format!("tensor {name} is missing")))?;
                out.push(t);
            }
        }
        let (m, v) = (Tensor::cat(&m, 0), Tensor::cat(&v, 0));
        if m.numel() as i64 != layout.numel {
            return Err(err(
                &layout_path,
                format!(
                    "the shards hold {} values, the layout {}",
                    m.numel(),
                    layout.numel
                ),
            ));
        }
        let by_name: std::collections::HashMap<&str, &Tensor> =
            params.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = Vec::new();
        let mut offset = 0;
        for (name, n) in &layout.params {
            let p = by_name.get(name.as_str()).ok_or_else(|| {
                err(
                    &layout_path,
                    format!("parameter {name} is not trained in this run"),
                )
            })?;
            if p.numel() as i64 != *n {
                return Err(err(
                    &layout_path,
                    format!("{name} has {n} values, the parameter {}", p.numel()),
                ));
            }
            let take = |t: &Tensor| {
                t.narrow(0, offset, *n)
                    .view(p.size().as_slice())
                    .to_kind(p.kind())
            };
            out.push((format!("{name}.exp_avg"), take(&m)));
            out.push((format!("{name}.exp_avg_sq"), take(&v)));
            out.push((
                format!("{name}.step"),
                Tensor::scalar_tensor(layout.step as f64, (Kind::Float, Device::Cpu)),
            ));
            offset += n;
        }
        Ok(out)
    }
}

/// The optimizer a trainer runs: transformers' plain AdamW, or ZeRO under `--deepspeed`.
#[derive(Debug)]
pub enum TrainOptimizer {
    Plain(AdamW),
    Zero(ZeroOptimizer),
}

impl TrainOptimizer {
    /// Drops the parameters' gradients.
    pub fn zero_grad(&self) {
        match self {
            TrainOptimizer::Plain(o) => o.zero_grad(),
            TrainOptimizer::Zero(z) => z.zero_grad(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(values: &[f32], kind: Kind) -> Tensor {
        Tensor::from_slice(values)
            .to_kind(kind)
            .set_requires_grad(true)
    }

    fn set_grad(t: &Tensor, g: &[f32]) {
        (t * 0.0).sum(Kind::Float).backward();
        let mut grad = t.grad();
        tch::no_grad(|| grad.copy_(&Tensor::from_slice(g).to_kind(t.kind())));
    }

    /// One rank, fp32: ZeRO's arithmetic is plain AdamW's, bit for bit, with
    /// weight decay on the decayed parameters only and clipping.
    #[test]
    fn single_rank_equals_plain_adamw_bit_for_bit() {
        let named = |kind| {
            vec![
                ("a.weight".to_string(), leaf(&[0.5, -1.0, 2.0], kind)),
                ("a.bias".to_string(), leaf(&[0.1, 0.2], kind)),
                ("b.weight".to_string(), leaf(&[3.0, -0.25], kind)),
            ]
        };
        let grads: [&[f32]; 3] = [&[0.3, -0.7, 1.1], &[0.01, -0.02], &[5.0, 0.5]];
        let plain_params = named(Kind::Float);
        let mut plain = AdamW::new(
            super::super::decay_groups(
                plain_params
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect(),
                0.1,
            ),
            (0.9, 0.999),
            1e-8,
        );
        let zero_params = named(Kind::Float);
        let mut zero = ZeroOptimizer::new(
            zero_params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            0.1,
            ((0.9, 0.999), 1e-8),
            2,
            None,
        )
        .unwrap();
        for step in 0..3 {
            let lr = 0.01 * (step + 1) as f64;
            for ((_, t), g) in plain_params.iter().zip(grads) {
                set_grad(t, g);
            }
            let n1 = super::super::clip_grad_norm(
                &plain_params
                    .iter()
                    .map(|(_, t)| t.shallow_clone())
                    .collect::<Vec<_>>(),
                0.0,
            );
            plain.step(lr);
            plain.zero_grad();
            for ((_, t), g) in zero_params.iter().zip(grads) {
                set_grad(t, g);
            }
            zero.reduce_gradients(None, 1.0).unwrap();
            let n2 = zero.clip_grad_norm(None, 0.0).unwrap();
            zero.step(lr, None).unwrap();
            assert!((n1 - n2).abs() < 1e-6, "{n1} vs {n2}");
        }
        for ((n, a), (_, b)) in plain_params.iter().zip(&zero_params) {
            assert_eq!(
                Vec::<f32>::try_from(a.detach()).unwrap(),
                Vec::<f32>::try_from(b.detach()).unwrap(),
                "{n}"
            );
        }
        assert_eq!(zero.state_bytes(), (12 * 7, 4 * 7));
    }

    /// bf16 weights: the update goes to an fp32 master, so a step far below
    /// half a bf16 ulp still accumulates (pure bf16 AdamW loses it).
    #[test]
    fn bf16_weights_keep_fp32_masters() {
        let w = leaf(&[1.0, 1.0], Kind::BFloat16);
        let mut zero = ZeroOptimizer::new(
            vec![("w.weight".into(), w.shallow_clone())],
            0.0,
            ((0.9, 0.999), 1e-8),
            1,
            None,
        )
        .unwrap();
        let mut pure = AdamW::new(
            super::super::decay_groups(
                vec![("w.weight".into(), leaf(&[1.0, 1.0], Kind::BFloat16))],
                0.0,
            ),
            (0.9, 0.999),
            1e-8,
        );
        let pure_w = pure.groups()[0].params[0].1.shallow_clone();
        // lr 1e-3 per step; a bf16 ulp at 1.0 is 2^-7 = 7.8e-3, so each pure step is lost.
        for _ in 0..10 {
            set_grad(&w, &[1.0, -1.0]);
            zero.reduce_gradients(None, 1.0).unwrap();
            zero.step(1e-3, None).unwrap();
            set_grad(&pure_w, &[1.0, -1.0]);
            pure.step(1e-3);
            pure.zero_grad();
        }
        let master = Vec::<f32>::try_from(zero.master.as_ref().unwrap()).unwrap();
        assert!(
            (master[0] - 0.99).abs() < 1e-4 && (master[1] - 1.01).abs() < 1e-4,
            "{master:?}"
        );
        let w = Vec::<f32>::try_from(w.detach().to_kind(Kind::Float)).unwrap();
        let rounded = Vec::<f32>::try_from(
            zero.master
                .as_ref()
                .unwrap()
                .to_kind(Kind::BFloat16)
                .to_kind(Kind::Float),
        )
        .unwrap();
        assert_eq!(w, rounded, "the bf16 weights are the rounded masters");
        assert_ne!(w, vec![1.0, 1.0]);
        let p = Vec::<f32>::try_from(pure_w.detach().to_kind(Kind::Float)).unwrap();
        assert_eq!(p, vec![1.0, 1.0], "pure bf16 AdamW lost every update");
    }

    /// A plain AdamW state continues under ZeRO and back, values intact.
    #[test]
    fn plain_and_zero_checkpoints_convert() {
        let dir = std::env::temp_dir().join(format!("zero-convert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let named = || {
            vec![
                ("a.weight".to_string(), leaf(&[0.5, -1.0, 2.0], Kind::Float)),
                ("a.bias".to_string(), leaf(&[0.1, 0.2], Kind::Float)),
            ]
        };
        let params = named();
        let mut plain = AdamW::new(
            super::super::decay_groups(
                params
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect(),
                0.0,
            ),
            (0.9, 0.999),
            1e-8,
        );
        set_grad(&params[0].1, &[0.3, -0.7, 1.1]);
        set_grad(&params[1].1, &[0.01, -0.02]);
        plain.step(0.1);
        plain.save(&dir.join("optimizer.safetensors")).unwrap();
        let mut zero = ZeroOptimizer::new(
            params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            0.0,
            ((0.9, 0.999), 1e-8),
            2,
            None,
        )
        .unwrap();
        zero.load_plain(&dir.join("optimizer.safetensors")).unwrap();
        assert_eq!(zero.step, 1);
        zero.save_shard(&dir).unwrap();
        let back = ZeroOptimizer::plain_state_dict(&dir, &params).unwrap();
        let original = plain.state_dict();
        for (name, t) in &original {
            let (_, u) = back.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!(
                Vec::<f32>::try_from(t.reshape([-1])).unwrap(),
                Vec::<f32>::try_from(u.reshape([-1])).unwrap(),
                "{name}"
            );
        }
        plain.load_state_dict(back).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn formula_of_the_state_bytes() {
        // 10 values over 3 ranks: shards of 4 (padded), ZeRO-2 keeps 4 gradients.
        assert_eq!(zero_state_bytes(10, 2, 3), (48, 16));
        assert_eq!(zero_state_bytes(10, 1, 3), (48, 40));
        assert_eq!(zero_state_bytes(10, 0, 3), (120, 40));
    }

    #[test]
    fn checkpoints_reshard_to_another_world_size() {
        let dir = std::env::temp_dir().join(format!("zero-reshard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0], Kind::Float);
        let mut z = ZeroOptimizer::new(
            vec![("w.weight".into(), t.shallow_clone())],
            0.0,
            ((0.9, 0.999), 1e-8),
            2,
            None,
        )
        .unwrap();
        set_grad(&t, &[1.0, 2.0, 3.0, 4.0, 5.0]);
        z.reduce_gradients(None, 1.0).unwrap();
        z.step(0.1, None).unwrap();
        z.save_shard(&dir).unwrap();
        // Pretend to be rank 1 of 2 of a fresh run: it reads values 3..5.
        let mut r1 = ZeroOptimizer::new(
            vec![("w.weight".into(), t.shallow_clone())],
            0.0,
            ((0.9, 0.999), 1e-8),
            2,
            None,
        )
        .unwrap();
        r1.shard = 1;
        r1.shards = 2;
        r1.partition = 3;
        r1.chunk = 3;
        r1.exp_avg = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        r1.exp_avg_sq = r1.exp_avg.zeros_like();
        r1.load(&dir).unwrap();
        let got = Vec::<f32>::try_from(r1.exp_avg.narrow(0, 0, 2)).unwrap();
        let want = Vec::<f32>::try_from(z.exp_avg.narrow(0, 3, 2)).unwrap();
        assert_eq!(got, want);
        assert_eq!(r1.step, 1);
        // Another parameter list is refused by name.
        let other = leaf(&[1.0], Kind::Float);
        let mut bad = ZeroOptimizer::new(
            vec![("x.weight".into(), other)],
            0.0,
            ((0.9, 0.999), 1e-8),
            2,
            None,
        )
        .unwrap();
        let e = bad.load(&dir).unwrap_err().to_string();
        assert!(e.contains("w.weight") && e.contains("x.weight"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
