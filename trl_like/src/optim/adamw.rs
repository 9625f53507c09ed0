//! `torch.optim.AdamW` over plain tensors, `clip_grad_norm_` and
//! transformers' weight-decay grouping.
//!
//! Sources mirrored (PyTorch 2.11, transformers 5.23):
//! * `torch/optim/adam.py::_single_tensor_adam` with `decoupled_weight_decay=True`
//!   (what `torch.optim.AdamW` runs for CPU parameters; on CUDA torch defaults
//!   to the `foreach` path, which is the same math up to rounding);
//! * `torch/nn/utils/clip_grad.py::{_get_total_norm, _clip_grads_with_norm_}`;
//! * `transformers/trainer.py::{get_decay_parameter_names, create_optimizer}`.
//!
//! tch's `nn::AdamW` keeps its moments inside libtorch where they cannot be
//! read, so checkpoints could not be resumed exactly; this one keeps them as
//! tensors keyed by parameter name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::OptimError;

/// A set of parameters sharing a weight decay (torch's `param_groups` entry).
#[derive(Debug)]
pub struct ParamGroup {
    /// A label for logs (`"decay"` / `"no_decay"` from [`decay_groups`]).
    pub name: String,
    /// `(name, tensor)`; the tensors are handles (`shallow_clone`) on the
    /// model's leaf variables, updated in place. Names must be unique across
    /// all groups: they key the optimiser state.
    pub params: Vec<(String, Tensor)>,
    /// Decoupled weight decay (torch's `weight_decay`), applied as
    /// `p *= 1 - lr * weight_decay` before the Adam update.
    pub weight_decay: f64,
}

/// Per-parameter state, as torch's `optimizer.state[p]`.
#[derive(Debug)]
struct ParamState {
    /// Number of updates done (torch keeps it as an fp32 0-dim tensor; the
    /// values are identical while it is below 2^24).
    step: u64,
    /// First moment, in the parameter's dtype (`torch.zeros_like(p)`).
    exp_avg: Tensor,
    /// Second moment, in the parameter's dtype.
    exp_avg_sq: Tensor,
}

impl ParamState {
    /// torch's lazy state initialisation in `Adam._init_group`.
    fn zeros_like(param: &Tensor) -> Self {
        ParamState {
            step: 0,
            exp_avg: param.zeros_like(),
            exp_avg_sq: param.zeros_like(),
        }
    }
}

/// `torch.optim.AdamW` (`amsgrad=False`, `maximize=False`, not fused, not
/// foreach) whose state can be saved and restored bit-exactly.
///
/// The learning rate is passed to every [`AdamW::step`] so that a
/// [`super::LrScheduler`] can drive it (transformers' `LambdaLR` writes
/// `group["lr"]` before each `optimizer.step()`).
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<ParamGroup>,
    betas: (f64, f64),
    eps: f64,
    /// Keyed by parameter name; absent until a parameter first has a gradient.
    state: HashMap<String, ParamState>,
    /// Per group (by index): its moments as two flat buffers, of which the
    /// per-parameter `ParamState` moments are views (see [`AdamW::step`]).
    flat: HashMap<usize, FlatMoments>,
}

/// One group's first and second moments, concatenated in parameter order, in
/// buckets of consecutive parameters of at most [`FLAT_BUCKET_VALUES`] values
/// (so the update's temporaries stay small for full fine-tuning too).
#[derive(Debug)]
struct FlatMoments {
    buckets: Vec<FlatBucket>,
}

#[derive(Debug)]
struct FlatBucket {
    /// The group's parameters `params[range]`.
    range: std::ops::Range<usize>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Values per flat bucket: 32 Mi (128 MB in fp32).
const FLAT_BUCKET_VALUES: i64 = 32 << 20;

const SUFFIX_EXP_AVG: &str = ".exp_avg";
const SUFFIX_EXP_AVG_SQ: &str = ".exp_avg_sq";
const SUFFIX_STEP: &str = ".step";

impl AdamW {
    /// Builds the optimiser.
    ///
    /// # Panics
    /// When [`AdamW::try_new`] would return an error (duplicate parameter
    /// names, or hyper-parameters torch rejects).
    pub fn new(groups: Vec<ParamGroup>, betas: (f64, f64), eps: f64) -> Self {
        match Self::try_new(groups, betas, eps) {
            Ok(opt) => opt,
            Err(e) => panic!("AdamW::new: {e}"),
        }
    }

    /// Builds the optimiser, checking what `torch.optim.Adam.__init__` checks
    /// (`0 <= eps`, `0 <= beta < 1`, `0 <= weight_decay`) and that parameter
    /// names are unique.
    pub fn try_new(
        groups: Vec<ParamGroup>,
        betas: (f64, f64),
        eps: f64,
    ) -> Result<Self, OptimError> {
        let invalid = OptimError::InvalidHyperparameter;
        if eps.is_nan() || eps < 0.0 {
            return Err(invalid(format!("Invalid epsilon value: {eps}")));
        }
        if !(0.0..1.0).contains(&betas.0) {
            return Err(invalid(format!(
                "Invalid beta parameter at index 0: {}",
                betas.0
            )));
        }
        if !(0.0..1.0).contains(&betas.1) {
            return Err(invalid(format!(
                "Invalid beta parameter at index 1: {}",
                betas.1
            )));
        }
        let mut seen = HashSet::new();
        for group in &groups {
            if group.weight_decay.is_nan() || group.weight_decay < 0.0 {
                return Err(invalid(format!(
                    "Invalid weight_decay value: {} (group `{}`)",
                    group.weight_decay, group.name
                )));
            }
            for (name, _) in &group.params {
                if !seen.insert(name.as_str()) {
                    return Err(OptimError::DuplicateParam(name.clone()));
                }
            }
        }
        Ok(AdamW {
            groups,
            betas,
            eps,
            state: HashMap::new(),
            flat: HashMap::new(),
        })
    }

    /// The parameter groups, in the order given to [`AdamW::new`].
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// `(beta1, beta2)`.
    pub fn betas(&self) -> (f64, f64) {
        self.betas
    }

    /// The denominator epsilon.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// How many updates the named parameter has received (`None` for an
    /// unknown name; 0 before its first gradient).
    pub fn param_step(&self, name: &str) -> Option<u64> {
        if let Some(st) = self.state.get(name) {
            return Some(st.step);
        }
        self.groups
            .iter()
            .flat_map(|g| &g.params)
            .any(|(n, _)| n == name)
            .then_some(0)
    }

    /// One AdamW update with learning rate `lr` of every parameter that has a
    /// gradient; parameters whose `.grad` is undefined are skipped and their
    /// state (including the step count) is left untouched, as in torch.
    ///
    /// Per parameter, exactly `_single_tensor_adam` (decoupled weight decay):
    /// ```text
    /// step += 1
    /// p *= 1 - lr*wd                      (only when wd != 0)
    /// m.lerp_(g, 1 - b1)
    /// v.mul_(b2).addcmul_(g, g, value=1 - b2)
    /// step_size = lr / (1 - b1**step)
    /// denom = v.sqrt() / (1 - b2**step)**0.5 + eps
    /// p.addcdiv_(m, denom, value=-step_size)
    /// ```
    ///
    /// A group whose parameters all have gradients of one dtype and device and
    /// the same step count takes the same arithmetic over its moments as two
    /// flat buffers: one kernel per operation for the whole group instead of
    /// one per parameter (a LoRA run has hundreds of small adapter tensors,
    /// and the per-tensor launches dominated the optimizer's time on GPUs).
    /// The update is elementwise, so each value comes out as in the
    /// per-tensor loop (a test checks it bit for bit).
    pub fn step(&mut self, lr: f64) {
        let (beta1, beta2) = self.betas;
        let eps = self.eps;
        let groups = &self.groups;
        let state = &mut self.state;
        let flat = &mut self.flat;
        // torch runs the update under `torch.no_grad()`: the parameters are
        // leaves that require grad, and in-place ops on them must not be
        // recorded.
        tch::no_grad(|| {
            for (gi, group) in groups.iter().enumerate() {
                if flat_eligible(group, state) {
                    let moments = flat
                        .entry(gi)
                        .or_insert_with(|| FlatMoments::adopt(group, state));
                    flat_step(group, state, moments, lr, (beta1, beta2), eps);
                    continue;
                }
                // A group leaving the flat path keeps its (view) moments per parameter.
                flat.remove(&gi);
                let wd = group.weight_decay;
                for (name, param) in &group.params {
                    let grad = param.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let st = state
                        .entry(name.clone())
                        .or_insert_with(|| ParamState::zeros_like(param));
                    let mut p = param.shallow_clone();
                    // addcmul/addcdiv on bf16/fp16 compute in fp32 ("opmath")
                    // and round once; pre-scaled operands must stay in fp32 too.
                    let opmath = match param.kind() {
                        Kind::BFloat16 | Kind::Half => Kind::Float,
                        k => k,
                    };
                    st.step += 1;

                    if wd != 0.0 {
                        // `param.mul_(1 - lr * weight_decay)`: the factor is
                        // formed in f64 (a Python float) and handed to the
                        // kernel the way Python hands it (see mul_python_scalar_).
                        mul_python_scalar_(&mut p, 1.0 - lr * wd);
                    }

                    // `exp_avg.lerp_(grad, 1 - beta1)`.
                    let _ = st.exp_avg.lerp_(&grad, 1.0 - beta1);

                    // `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`.
                    // tch's addcmul_ has no `value`; the CPU kernel computes
                    // `self + (value * t1) * t2` (the last multiply-add fused by
                    // the compiler), so pre-scaling t1 by `value` and using
                    // value = 1 rounds identically (checked bit-for-bit against
                    // torch 2.11 on vectorised and scalar paths, fp32 and bf16).
                    mul_python_scalar_(&mut st.exp_avg_sq, beta2);
                    let scaled_grad = grad.to_kind(opmath) * (1.0 - beta2);
                    let _ = st.exp_avg_sq.addcmul_(&scaled_grad, &grad);

                    // Bias corrections in Python floats: `beta ** step` is C
                    // `pow` (f64::powf), and torch takes the square root as
                    // `bias_correction2 ** 0.5`, not `math.sqrt`.
                    let step = st.step as f64;
                    let bias_correction1 = 1.0 - beta1.powf(step);
                    let bias_correction2 = 1.0 - beta2.powf(step);
                    let step_size = lr / bias_correction1;
                    let bias_correction2_sqrt = bias_correction2.powf(0.5);

                    // `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`.
                    let mut denom = st.exp_avg_sq.sqrt() / bias_correction2_sqrt;
                    let _ = denom.g_add_scalar_(eps);

                    // `param.addcdiv_(exp_avg, denom, value=-step_size)`: the
                    // kernel computes `self + (value * t1) / t2`, which is what
                    // pre-scaling t1 and value = 1 gives (bit-identical).
                    let scaled_exp_avg = st.exp_avg.to_kind(opmath) * (-step_size);
                    let _ = p.addcdiv_(&scaled_exp_avg, &denom);
                }
            }
        });
    }

    /// Drops every parameter's gradient (`optimizer.zero_grad(set_to_none=True)`,
    /// torch's default), so a parameter that gets no gradient in the next
    /// backward is skipped by the next [`AdamW::step`] instead of being
    /// decayed and moved by its momentum.
    pub fn zero_grad(&self) {
        // tch has no binding to reset `.grad` to None, but libtorch's C++
        // `Optimizer::zero_grad(set_to_none = true)` does exactly that; a
        // throw-away SGD holding the same tensors gives access to it.
        let params: Vec<&Tensor> = self
            .groups
            .iter()
            .flat_map(|g| &g.params)
            .map(|(_, t)| t)
            .collect();
        set_grads_to_none(&params);
    }

    /// The optimiser state as named tensors: for every parameter
    /// `"<name>.exp_avg"`, `"<name>.exp_avg_sq"` (parameter dtype and shape)
    /// and `"<name>.step"` (fp32 0-dim, as torch stores it).
    ///
    /// Tensors are copies. Parameters that never had a gradient are written
    /// with step 0 and zero moments, which is exactly what torch's lazy
    /// initialisation would create, so every parameter appears and
    /// [`AdamW::load_state_dict`] can insist on a complete state.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        tch::no_grad(|| {
            let mut out = Vec::new();
            for (name, param) in self.groups.iter().flat_map(|g| &g.params) {
                let (step, exp_avg, exp_avg_sq) = match self.state.get(name) {
                    Some(st) => (st.step, st.exp_avg.copy(), st.exp_avg_sq.copy()),
                    None => (0, param.zeros_like(), param.zeros_like()),
                };
                out.push((format!("{name}{SUFFIX_EXP_AVG}"), exp_avg));
                out.push((format!("{name}{SUFFIX_EXP_AVG_SQ}"), exp_avg_sq));
                out.push((
                    format!("{name}{SUFFIX_STEP}"),
                    Tensor::scalar_tensor(step as f64, (Kind::Float, Device::Cpu)),
                ));
            }
            out
        })
    }

    /// Restores a state written by [`AdamW::state_dict`] / [`AdamW::save`].
    ///
    /// Strict: every parameter must have its three entries, and every entry
    /// must belong to a parameter of this optimiser (errors name the first
    /// offending entry). Moments are copied into fresh tensors in the
    /// parameter's dtype and device (torch's `load_state_dict` casts them the
    /// same way). On error the current state is left unchanged.
    pub fn load_state_dict(&mut self, tensors: Vec<(String, Tensor)>) -> Result<(), OptimError> {
        let mut given: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, t) in tensors {
            if given.contains_key(&name) {
                return Err(OptimError::BadState {
                    name,
                    message: "appears twice".into(),
                });
            }
            given.insert(name, t);
        }
        let params: Vec<&(String, Tensor)> = self.groups.iter().flat_map(|g| &g.params).collect();
        let expected: HashSet<String> = params
            .iter()
            .flat_map(|(n, _)| {
                [SUFFIX_EXP_AVG, SUFFIX_EXP_AVG_SQ, SUFFIX_STEP].map(|s| format!("{n}{s}"))
            })
            .collect();
        if let Some(unexpected) = given.keys().find(|k| !expected.contains(*k)) {
            return Err(OptimError::UnexpectedState(unexpected.clone()));
        }

        let mut new_state = HashMap::with_capacity(params.len());
        tch::no_grad(|| -> Result<(), OptimError> {
            for (name, param) in params {
                let take = |suffix: &str| -> Result<(String, &Tensor), OptimError> {
                    let key = format!("{name}{suffix}");
                    match given.get(&key) {
                        Some(t) => Ok((key, t)),
                        None => Err(OptimError::MissingState(key)),
                    }
                };
                let moment = |suffix: &str| -> Result<Tensor, OptimError> {
                    let (key, src) = take(suffix)?;
                    if src.size() != param.size() {
                        return Err(OptimError::BadState {
                            name: key,
                            message: format!(
                                "shape {:?} does not match the parameter's shape {:?}",
                                src.size(),
                                param.size()
                            ),
                        });
                    }
                    if !src.is_floating_point() {
                        return Err(OptimError::BadState {
                            name: key,
                            message: format!("dtype {:?} is not a floating-point type", src.kind()),
                        });
                    }
                    // A fresh tensor in the parameter's dtype/device: never
                    // alias the caller's tensors.
                    let mut dst = param.zeros_like();
                    dst.f_copy_(src)?;
                    Ok(dst)
                };
                let exp_avg = moment(SUFFIX_EXP_AVG)?;
                let exp_avg_sq = moment(SUFFIX_EXP_AVG_SQ)?;
                let (key, step_t) = take(SUFFIX_STEP)?;
                if step_t.numel() != 1 {
                    return Err(OptimError::BadState {
                        name: key,
                        message: format!("expected a single value, got shape {:?}", step_t.size()),
                    });
                }
                let step = step_t.f_double_value(&[])?;
                if !(step >= 0.0 && step.fract() == 0.0 && step < 9.0e15) {
                    return Err(OptimError::BadState {
                        name: key,
                        message: format!("step {step} is not a non-negative integer"),
                    });
                }
                new_state.insert(
                    name.clone(),
                    ParamState {
                        step: step as u64,
                        exp_avg,
                        exp_avg_sq,
                    },
                );
            }
            Ok(())
        })?;
        self.state = new_state;
        // The loaded moments are fresh tensors, no longer views of the flat buffers.
        self.flat.clear();
        Ok(())
    }

    /// Writes [`AdamW::state_dict`] to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        Tensor::write_safetensors(&self.state_dict(), path).map_err(|source| OptimError::File {
            path: path.display().to_string(),
            error: source,
        })
    }

    /// Reads a safetensors file written by [`AdamW::save`] and restores it
    /// with [`AdamW::load_state_dict`].
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let tensors = Tensor::read_safetensors(path).map_err(|source| OptimError::File {
            path: path.display().to_string(),
            error: source,
        })?;
        self.load_state_dict(tensors)
    }
}

/// Resets the tensors' `.grad` to undefined (`zero_grad(set_to_none=True)`).
pub(crate) fn set_grads_to_none(params: &[&Tensor]) {
    let via_libtorch = || -> Result<(), tch::TchError> {
        let mut holder = tch::COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)?;
        for t in params {
            holder.add_parameters(t, 0)?;
        }
        holder.zero_grad()
    };
    if via_libtorch().is_err() {
        // Fallback: zero in place (same numbers for the next backward,
        // but the grads stay defined).
        for t in params {
            let mut t = t.shallow_clone();
            t.zero_grad();
        }
    }
}

/// `t.mul_(s)` as Python runs it for a float `s`: `mul_.Tensor` with `s` as
/// a CPU 0-dim double tensor. tch's `g_mul_scalar_` calls `mul_.Scalar`,
/// which on bf16/fp16 rounds differently (checked with torch 2.11: ~15% of
/// bf16 elements differ by one ulp); fp32 gives the same bits either way.
/// Whether `group` can take the flat update: two or more contiguous parameters,
/// all with a gradient, one dtype and device, and equal step counts.
fn flat_eligible(group: &ParamGroup, state: &HashMap<String, ParamState>) -> bool {
    let Some((_, first)) = group.params.first() else {
        return false;
    };
    if group.params.len() < 2 {
        return false;
    }
    let (kind, device) = (first.kind(), first.device());
    let step = state.get(&group.params[0].0).map(|s| s.step);
    group.params.iter().all(|(name, p)| {
        p.kind() == kind
            && p.device() == device
            && p.is_contiguous()
            && p.grad().defined()
            && state.get(name).map(|s| s.step) == step
    })
}

impl FlatMoments {
    /// Concatenates the group's moments (zeros where a parameter has no state
    /// yet) and makes every parameter's state a view of the new buffers.
    fn adopt(group: &ParamGroup, state: &mut HashMap<String, ParamState>) -> Self {
        // Consecutive parameters up to FLAT_BUCKET_VALUES (a larger one alone).
        let mut ranges = Vec::new();
        let (mut start, mut values) = (0, 0i64);
        for (i, (_, p)) in group.params.iter().enumerate() {
            let n = p.numel() as i64;
            if i > start && values + n > FLAT_BUCKET_VALUES {
                ranges.push(start..i);
                (start, values) = (i, 0);
            }
            values += n;
        }
        ranges.push(start..group.params.len());
        let buckets = ranges
            .into_iter()
            .map(|range| {
                let params = &group.params[range.clone()];
                let gather = |pick: fn(&ParamState) -> &Tensor| {
                    let parts: Vec<Tensor> = params
                        .iter()
                        .map(|(name, p)| match state.get(name) {
                            Some(st) => pick(st).reshape([-1]),
                            None => p.zeros_like().reshape([-1]),
                        })
                        .collect();
                    Tensor::cat(&parts, 0)
                };
                let bucket = FlatBucket {
                    range,
                    exp_avg: gather(|st| &st.exp_avg),
                    exp_avg_sq: gather(|st| &st.exp_avg_sq),
                };
                let mut offset = 0;
                for (name, p) in params {
                    let n = p.numel() as i64;
                    let view = |t: &Tensor| t.narrow(0, offset, n).view(p.size().as_slice());
                    let step = state.get(name).map_or(0, |s| s.step);
                    state.insert(
                        name.clone(),
                        ParamState {
                            step,
                            exp_avg: view(&bucket.exp_avg),
                            exp_avg_sq: view(&bucket.exp_avg_sq),
                        },
                    );
                    offset += n;
                }
                bucket
            })
            .collect();
        FlatMoments { buckets }
    }
}

/// [`AdamW::step`]'s arithmetic for a whole group at once (see there).
fn flat_step(
    group: &ParamGroup,
    state: &mut HashMap<String, ParamState>,
    moments: &mut FlatMoments,
    lr: f64,
    (beta1, beta2): (f64, f64),
    eps: f64,
) {
    let opmath = match group.params[0].1.kind() {
        Kind::BFloat16 | Kind::Half => Kind::Float,
        k => k,
    };
    let mut step = 0;
    for (name, p) in &group.params {
        let st = state.get_mut(name).expect("adopted");
        st.step += 1;
        step = st.step;
        if group.weight_decay != 0.0 {
            mul_python_scalar_(&mut p.shallow_clone(), 1.0 - lr * group.weight_decay);
        }
    }
    let bias_correction1 = 1.0 - beta1.powf(step as f64);
    let bias_correction2 = 1.0 - beta2.powf(step as f64);
    let step_size = lr / bias_correction1;
    for bucket in &mut moments.buckets {
        let params = &group.params[bucket.range.clone()];
        let grad = Tensor::cat(
            &params
                .iter()
                .map(|(_, p)| p.grad().reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        );
        let _ = bucket.exp_avg.lerp_(&grad, 1.0 - beta1);
        mul_python_scalar_(&mut bucket.exp_avg_sq, beta2);
        let scaled_grad = grad.to_kind(opmath) * (1.0 - beta2);
        let _ = bucket.exp_avg_sq.addcmul_(&scaled_grad, &grad);
        let mut denom = bucket.exp_avg_sq.sqrt() / bias_correction2.powf(0.5);
        let _ = denom.g_add_scalar_(eps);
        let scaled_exp_avg = bucket.exp_avg.to_kind(opmath) * (-step_size);
        let mut offset = 0;
        for (_, p) in params {
            let n = p.numel() as i64;
            let _ = p.view([-1]).addcdiv_(
                &scaled_exp_avg.narrow(0, offset, n),
                &denom.narrow(0, offset, n),
            );
            offset += n;
        }
    }
}

fn mul_python_scalar_(t: &mut Tensor, s: f64) {
    let _ = t.g_mul_(&Tensor::scalar_tensor(s, (Kind::Double, Device::Cpu)));
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (L2): returns the total
/// norm of all gradients before clipping, as if they were concatenated, and
/// scales every gradient by `min(1, max_norm / (total + 1e-6))`.
///
/// Parameters without a gradient are ignored; no gradient at all gives 0.
/// `max_norm <= 0` only computes the norm (transformers' Trainer does not clip
/// then; torch itself would zero the gradients).
///
/// Numerics follow torch: one norm per gradient, then the norm of the stacked
/// norms, the coefficient `(total + 1e-6).reciprocal() * max_norm` as an fp32
/// 0-dim tensor (that is Python's `max_norm / tensor`), clamped to 1.0 and
/// multiplied into every gradient even when it is 1 (exact). Norms are in the
/// gradients' dtype as in torch: bf16 gradients (QLoRA adapters) give bf16 norms,
/// a bf16 total and a bf16 coefficient.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let first_device = grads[0].device();
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.norm().to_device(first_device))
            .collect();
        let total = Tensor::stack(&norms, 0).norm();
        if max_norm > 0.0 {
            let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.g_mul_(&coef.to_device(g.device()));
            }
        }
        total.double_value(&[])
    })
}

/// Whether transformers' `Trainer.get_decay_parameter_names` would decay the
/// parameter of this name: not when the lower-cased name matches any of
/// `bias`, `layernorm`, `rmsnorm`, `(?:^|\.)norm(?:$|\.)`, `_norm(?:$|\.)`.
///
/// transformers also exempts every parameter inside an `nn.LayerNorm`
/// module whatever its name; module types are not visible from names, so a
/// LayerNorm named without "norm" (e.g. GPT-2's `ln_f`) would be decayed
/// here. GLM/GLM-4 norms are all named `*layernorm*` or `norm`. LoRA
/// matrices (`lora_A.weight`, `lora_B.weight`) are decayed, as in transformers.
pub fn applies_weight_decay(name: &str) -> bool {
    let lower = name.to_lowercase();
    if lower.contains("bias") || lower.contains("layernorm") || lower.contains("rmsnorm") {
        return false;
    }
    // Both regexes anchor on a dot-separated component: one equal to `norm`,
    // or one ending in `_norm`.
    !lower
        .split('.')
        .any(|c| c == "norm" || c.ends_with("_norm"))
}

/// transformers' `Trainer.create_optimizer` grouping: `[decay, no_decay]`,
/// the first with `weight_decay`, the second with 0.0 (see
/// [`applies_weight_decay`]). Parameters that do not require grad are left
/// out, as transformers does; both groups are always returned, possibly empty.
pub fn decay_groups(named: Vec<(String, Tensor)>, weight_decay: f64) -> Vec<ParamGroup> {
    let mut decay = Vec::new();
    let mut no_decay = Vec::new();
    for (name, t) in named {
        if !t.requires_grad() {
            continue;
        }
        if applies_weight_decay(&name) {
            decay.push((name, t));
        } else {
            no_decay.push((name, t));
        }
    }
    vec![
        ParamGroup {
            name: "decay".into(),
            params: decay,
            weight_decay,
        },
        ParamGroup {
            name: "no_decay".into(),
            params: no_decay,
            weight_decay: 0.0,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values)
            .reshape(shape)
            .set_requires_grad(true)
    }

    /// Gives `t` the gradient `g` through autograd (`(t * g).sum().backward()`).
    fn set_grad(t: &Tensor, g: &Tensor) {
        (t * g).sum(None::<Kind>).backward();
    }

    /// Parameters beyond FLAT_BUCKET_VALUES split into several flat buckets,
    /// and the bucketed update still equals the per-tensor loop bit for bit.
    #[test]
    fn large_groups_update_in_several_flat_buckets() {
        tch::manual_seed(3);
        let big = FLAT_BUCKET_VALUES * 5 / 8;
        let sizes = [big, big, 1000];
        let init: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::randn([n], tch::kind::FLOAT_CPU))
            .collect();
        let grads: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::randn([n], tch::kind::FLOAT_CPU))
            .collect();
        let leaves: Vec<Vec<Tensor>> = (0..2)
            .map(|_| {
                init.iter()
                    .map(|t| t.copy().set_requires_grad(true))
                    .collect()
            })
            .collect();
        let named = |ps: &[Tensor]| -> Vec<(String, Tensor)> {
            ps.iter()
                .enumerate()
                .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
                .collect()
        };
        let group = |params| ParamGroup {
            name: "g".into(),
            params,
            weight_decay: 0.01,
        };
        let mut flat = AdamW::new(vec![group(named(&leaves[0]))], (0.9, 0.999), 1e-8);
        let mut per_tensor = AdamW::new(
            named(&leaves[1])
                .into_iter()
                .map(|p| group(vec![p]))
                .collect(),
            (0.9, 0.999),
            1e-8,
        );
        for (opt, ps) in [(&mut flat, &leaves[0]), (&mut per_tensor, &leaves[1])] {
            for (p, g) in ps.iter().zip(&grads) {
                set_grad(p, g);
            }
            opt.step(1e-3);
        }
        let ranges: Vec<_> = flat.flat[&0]
            .buckets
            .iter()
            .map(|b| b.range.clone())
            .collect();
        assert_eq!(ranges, [0..1, 1..3]);
        assert!(
            per_tensor.flat.is_empty(),
            "one-parameter groups take the plain loop"
        );
        for (a, b) in leaves[0].iter().zip(&leaves[1]) {
            assert!(
                a.equal(b),
                "bucketed flat update differs from the per-tensor loop"
            );
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 tensor");
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn decay_rule_matches_transformers_patterns() {
        for name in [
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
            "model.layers.0.mlp.gate_up_proj.weight",
            "lm_head.weight",
            "model.normalizer.weight",
            "model.layers.0.norm_out.weight",
        ] {
            assert!(applies_weight_decay(name), "{name} should be decayed");
        }
        for name in [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_self_attn_layernorm.weight",
            "model.norm.weight",
            "norm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "encoder.RMSNorm.weight",
            "model.final_layer_norm",
        ] {
            assert!(!applies_weight_decay(name), "{name} should not be decayed");
        }
    }

    #[test]
    fn decay_groups_split_and_skip_frozen() {
        let named = vec![
            (
                "a.lora_A.weight".to_string(),
                Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            ),
            (
                "a.bias".to_string(),
                Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            ),
            (
                "frozen.weight".to_string(),
                Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            ),
        ];
        let groups = decay_groups(named, 0.1);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].weight_decay, 0.1);
        assert_eq!(
            groups[0]
                .params
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["a.lora_A.weight"]
        );
        assert_eq!(groups[1].weight_decay, 0.0);
        assert_eq!(
            groups[1]
                .params
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["a.bias"]
        );
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // With bias correction the first Adam step is lr * g / (|g| + eps').
        let p = leaf(&[1.0, -2.0, 3.0], &[3]);
        set_grad(&p, &Tensor::from_slice(&[0.5f32, -0.25, 2.0]));
        let mut opt = AdamW::new(
            vec![ParamGroup {
                name: "g".into(),
                params: vec![("p".into(), p.shallow_clone())],
                weight_decay: 0.0,
            }],
            (0.9, 0.999),
            1e-8,
        );
        opt.step(0.1);
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        for (g, want) in got.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((g - want).abs() < 1e-5, "{got:?}");
        }
        assert_eq!(opt.param_step("p"), Some(1));
        assert_eq!(opt.param_step("nope"), None);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let a = leaf(&[1.0], &[1]);
        let groups = vec![ParamGroup {
            name: "g".into(),
            params: vec![
                ("x".into(), a.shallow_clone()),
                ("x".into(), a.shallow_clone()),
            ],
            weight_decay: 0.0,
        }];
        assert!(
            matches!(AdamW::try_new(groups, (0.9, 0.999), 1e-8), Err(OptimError::DuplicateParam(n)) if n == "x")
        );
    }

    #[test]
    fn state_dict_round_trip_is_bit_exact() {
        let p = leaf(&[0.1, 0.2, 0.3, 0.4], &[2, 2]);
        let g = Tensor::from_slice(&[0.3f32, -0.1, 0.7, 0.05]).reshape([2, 2]);
        let mut opt = AdamW::new(
            vec![ParamGroup {
                name: "g".into(),
                params: vec![("p".into(), p.shallow_clone())],
                weight_decay: 0.01,
            }],
            (0.9, 0.999),
            1e-8,
        );
        set_grad(&p, &g);
        opt.step(1e-2);
        let sd = opt.state_dict();
        let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["p.exp_avg", "p.exp_avg_sq", "p.step"]);
        assert_eq!(sd[2].1.dim(), 0);
        assert_eq!(sd[2].1.kind(), Kind::Float);
        let before = bits(&sd[0].1);
        opt.load_state_dict(sd).unwrap();
        assert_eq!(bits(&opt.state_dict()[0].1), before);
        assert_eq!(opt.param_step("p"), Some(1));
    }
}
