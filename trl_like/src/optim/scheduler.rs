//! Learning-rate schedules of transformers 5.23 `optimization.py`.
//!
//! Each transformers schedule is a `torch.optim.lr_scheduler.LambdaLR`, whose
//! learning rate after `k` calls to `scheduler.step()` is
//! `base_lr * lr_lambda(k)`. Nothing else is stateful, so a schedule here is
//! a pure function of the 0-based optimiser step: [`LrScheduler::lr_at`]`(k)`
//! is the learning rate of the `(k+1)`-th update, what the Trainer logs as
//! `learning_rate` (`get_last_lr()`) for that step. Resuming needs no
//! scheduler state beyond the global step.
//!
//! The lambdas are transcribed operation by operation (same f64 operations in
//! the same order, Python's integer arithmetic kept in i64 until Python
//! converts to float, `max(a, b)` with Python's tie rule, `%` with Python's
//! sign rule, `math.cos`/`pow` from the same libm) so that values agree with
//! Python to the last bit or so.

use std::f64::consts::PI;

use serde_json::{Map, Value};

use super::OptimError;

/// Scheduler names accepted by [`LrScheduler::new`] (transformers'
/// `SchedulerType` values, minus the metric-driven `reduce_lr_on_plateau`
/// and `greedy`, which are not functions of the step).
pub const SCHEDULER_NAMES: &[&str] = &[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
];

/// Warm-up / decay curve of the warmup-stable-decay schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WsdShape {
    Linear,
    Cosine,
    OneMinusSqrt,
}

/// The schedule's lambda and its arguments (the `partial(...)` in transformers).
/// `get_wsd_schedule`'s settings: warm up, hold, decay.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Wsd {
    num_stable_steps: i64,
    num_decay_steps: i64,
    warmup_type: WsdShape,
    decay_type: WsdShape,
    min_lr_ratio: f64,
    num_cycles: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum Schedule {
    Linear,
    Cosine {
        num_cycles: f64,
    },
    CosineWithRestarts {
        num_cycles: f64,
    },
    Polynomial {
        lr_end: f64,
        power: f64,
    },
    Constant,
    ConstantWithWarmup,
    InverseSqrt {
        timescale: i64,
    },
    CosineWithMinLr {
        num_cycles: f64,
        min_lr_rate: f64,
    },
    CosineWarmupWithMinLr {
        num_cycles: f64,
        min_lr_rate: f64,
        warmup_lr_rate: Option<f64>,
    },
    WarmupStableDecay(Wsd),
}

/// A transformers learning-rate schedule (`get_scheduler(name, ...)`) as a
/// function of the step.
#[derive(Debug, Clone, PartialEq)]
pub struct LrScheduler {
    name: String,
    base_lr: f64,
    num_warmup_steps: i64,
    num_training_steps: i64,
    schedule: Schedule,
}

/// Python's `max(a, b)`: `a` unless `b > a`.
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's float `%` (result has the sign of the divisor).
fn py_mod(a: f64, b: f64) -> f64 {
    let m = a % b; // C fmod
    if m != 0.0 {
        if (b < 0.0) != (m < 0.0) {
            m + b
        } else {
            m
        }
    } else {
        0.0f64.copysign(b)
    }
}

/// `float(current_step) / float(max(1, num_warmup_steps))`, the linear warm-up
/// shared by most schedules.
fn warmup_ratio(step: i64, warmup: i64) -> f64 {
    step as f64 / warmup.max(1) as f64
}

/// Reads transformers' `lr_scheduler_kwargs`, failing like Python's call
/// would (unexpected keyword → `TypeError`, wrong type → `TypeError`).
struct Kwargs<'a> {
    scheduler: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Kwargs<'a> {
    /// `get_wsd_schedule`'s keywords (`num_decay_steps` required).
    fn warmup_stable_decay(&self, warmup: i64, total: i64) -> Result<Schedule, OptimError> {
        let kw = self;
        kw.only(&[
            "num_decay_steps",
            "num_stable_steps",
            "warmup_type",
            "decay_type",
            "min_lr_ratio",
            "num_cycles",
        ])?;
        let num_decay_steps = kw
            .int("num_decay_steps")?
            .ok_or_else(|| kw.err("missing required keyword argument `num_decay_steps`".into()))?;
        // transformers warns when both are known and uses num_stable_steps.
        let num_stable_steps = match kw.int("num_stable_steps")? {
            Some(s) => s,
            None => total - warmup - num_decay_steps,
        };
        Ok(Schedule::WarmupStableDecay(Wsd {
            num_stable_steps,
            num_decay_steps,
            warmup_type: kw.wsd_shape("warmup_type", WsdShape::Linear)?,
            decay_type: kw.wsd_shape("decay_type", WsdShape::Cosine)?,
            min_lr_ratio: kw.float_or("min_lr_ratio", 0.0)?,
            num_cycles: kw.float_or("num_cycles", 0.5)?,
        }))
    }

    fn err(&self, message: String) -> OptimError {
        OptimError::SchedulerKwargs {
            scheduler: self.scheduler.to_string(),
            message,
        }
    }

    /// Every key must be a parameter of the schedule function; `last_epoch`
    /// (accepted by all of them) may only be its default -1, since other
    /// values need an `initial_lr` that a fresh optimiser does not have.
    fn only(&self, allowed: &[&str]) -> Result<(), OptimError> {
        for key in self.map.keys() {
            if key == "last_epoch" {
                match self.map[key].as_i64() {
                    Some(-1) => continue,
                    _ => {
                        return Err(self.err(format!(
                            "`last_epoch` must be -1 (resume by step instead), got {}",
                            self.map[key]
                        )))
                    }
                }
            }
            if !allowed.contains(&key.as_str()) {
                let accepted = if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                };
                return Err(self.err(format!(
                    "unexpected keyword argument `{key}` (accepted: {accepted})"
                )));
            }
        }
        Ok(())
    }

    /// A number (`None` when absent or JSON null, i.e. Python `None`).
    fn float(&self, key: &str) -> Result<Option<f64>, OptimError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a finite number, got {n}"))),
            Some(other) => Err(self.err(format!("`{key}` must be a number, got {other}"))),
        }
    }

    fn float_or(&self, key: &str, default: f64) -> Result<f64, OptimError> {
        Ok(self.float(key)?.unwrap_or(default))
    }

    /// An integer (a float with an integral value is accepted, as Python's
    /// arithmetic would accept it).
    fn int(&self, key: &str) -> Result<Option<i64>, OptimError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    return Ok(Some(i));
                }
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                    _ => Err(self.err(format!("`{key}` must be an integer, got {n}"))),
                }
            }
            Some(other) => Err(self.err(format!("`{key}` must be an integer, got {other}"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, OptimError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self.err(format!("`{key}` must be a string, got {other}"))),
        }
    }

    /// transformers' `min_lr` / `min_lr_rate` rule for the cosine-with-min-lr
    /// schedules: exactly one of them, `min_lr` taken relative to the base lr.
    fn min_lr_rate(&self, base_lr: f64) -> Result<f64, OptimError> {
        match (self.float("min_lr")?, self.float("min_lr_rate")?) {
            (Some(_), Some(_)) => {
                Err(self.err("Only one of min_lr or min_lr_rate should be set".into()))
            }
            (Some(min_lr), None) => Ok(min_lr / base_lr),
            (None, Some(rate)) => Ok(rate),
            (None, None) => Err(self.err(
                "One of min_lr or min_lr_rate should be set through the `lr_scheduler_kwargs`"
                    .into(),
            )),
        }
    }

    fn wsd_shape(&self, key: &str, default: WsdShape) -> Result<WsdShape, OptimError> {
        match self.string(key)? {
            None => Ok(default),
            Some("linear") => Ok(WsdShape::Linear),
            Some("cosine") => Ok(WsdShape::Cosine),
            Some("1-sqrt") => Ok(WsdShape::OneMinusSqrt),
            Some(other) => Err(self.err(format!(
                "Unknown {key}: {other}, expected 'linear', 'cosine' or '1-sqrt'"
            ))),
        }
    }
}

impl LrScheduler {
    /// Builds the schedule `name` (a transformers `lr_scheduler_type`) for an
    /// optimiser whose initial learning rate is `base_lr`.
    ///
    /// `kwargs` are transformers' `lr_scheduler_kwargs`: `num_cycles`
    /// (cosine*, default 0.5; cosine_with_restarts default 1), `lr_end`
    /// (1e-7) and `power` (1.0) for polynomial, `timescale` for inverse_sqrt
    /// (default `num_warmup_steps or 10000`), `min_lr` or `min_lr_rate` (and
    /// `warmup_lr_rate`) for the min-lr cosines, and `num_decay_steps`
    /// (required), `num_stable_steps`, `warmup_type`, `decay_type`,
    /// `min_lr_ratio`, `num_cycles` for warmup_stable_decay. As in
    /// transformers' `get_scheduler`, `constant` and `constant_with_warmup`
    /// ignore `kwargs` altogether.
    ///
    /// # Errors
    /// [`OptimError::UnknownScheduler`] for an unknown name (or the
    /// metric-driven `reduce_lr_on_plateau` / `greedy`);
    /// [`OptimError::SchedulerKwargs`] naming the keyword that transformers
    /// would reject (unknown, wrong type, invalid value, missing required).
    pub fn new(
        name: &str,
        base_lr: f64,
        num_warmup_steps: usize,
        num_training_steps: usize,
        kwargs: &Map<String, Value>,
    ) -> Result<Self, OptimError> {
        let kw = Kwargs {
            scheduler: name,
            map: kwargs,
        };
        let warmup = num_warmup_steps as i64;
        let total = num_training_steps as i64;
        let schedule = match name {
            "linear" => {
                kw.only(&[])?;
                Schedule::Linear
            }
            "cosine" => {
                kw.only(&["num_cycles"])?;
                Schedule::Cosine {
                    num_cycles: kw.float_or("num_cycles", 0.5)?,
                }
            }
            "cosine_with_restarts" => {
                kw.only(&["num_cycles"])?;
                Schedule::CosineWithRestarts {
                    num_cycles: kw.float_or("num_cycles", 1.0)?,
                }
            }
            "polynomial" => {
                kw.only(&["lr_end", "power"])?;
                let lr_end = kw.float_or("lr_end", 1e-7)?;
                let power = kw.float_or("power", 1.0)?;
                if base_lr.is_nan() || lr_end >= base_lr {
                    return Err(kw.err(format!(
                        "lr_end ({lr_end}) must be smaller than initial lr ({base_lr})"
                    )));
                }
                Schedule::Polynomial { lr_end, power }
            }
            // get_scheduler returns before looking at the kwargs for these two.
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup,
            "inverse_sqrt" => {
                kw.only(&["timescale"])?;
                let timescale = match kw.int("timescale")? {
                    // `timescale = num_warmup_steps or 10_000`
                    None => {
                        if warmup != 0 {
                            warmup
                        } else {
                            10_000
                        }
                    }
                    Some(t) => t,
                };
                if timescale <= 0 {
                    return Err(kw.err(format!("`timescale` must be positive, got {timescale}")));
                }
                Schedule::InverseSqrt { timescale }
            }
            "cosine_with_min_lr" => {
                kw.only(&["num_cycles", "min_lr", "min_lr_rate"])?;
                Schedule::CosineWithMinLr {
                    num_cycles: kw.float_or("num_cycles", 0.5)?,
                    min_lr_rate: kw.min_lr_rate(base_lr)?,
                }
            }
            "cosine_warmup_with_min_lr" => {
                kw.only(&["num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"])?;
                Schedule::CosineWarmupWithMinLr {
                    num_cycles: kw.float_or("num_cycles", 0.5)?,
                    min_lr_rate: kw.min_lr_rate(base_lr)?,
                    warmup_lr_rate: kw.float("warmup_lr_rate")?,
                }
            }
            "warmup_stable_decay" => kw.warmup_stable_decay(warmup, total)?,
            _ => {
                return Err(OptimError::UnknownScheduler {
                    name: name.to_string(),
                })
            }
        };
        Ok(LrScheduler {
            name: name.to_string(),
            base_lr,
            num_warmup_steps: warmup,
            num_training_steps: total,
            schedule,
        })
    }

    /// The scheduler's name (`lr_scheduler_type`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The optimiser's initial learning rate the lambda multiplies.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// Warm-up steps.
    pub fn num_warmup_steps(&self) -> usize {
        self.num_warmup_steps as usize
    }

    /// Total optimiser steps of the run.
    pub fn num_training_steps(&self) -> usize {
        self.num_training_steps as usize
    }

    /// The learning rate the optimiser uses for the update at 0-based `step`
    /// (what `scheduler.get_last_lr()` reports before the `(step+1)`-th
    /// `scheduler.step()`): `base_lr * lr_lambda(step)`, multiplied in that
    /// order as `LambdaLR.get_lr` does.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.lr_lambda(step)
    }

    /// The multiplier of the base learning rate at `step` (transformers'
    /// `lr_lambda(current_step)`).
    pub fn lr_lambda(&self, step: usize) -> f64 {
        let s = step as i64;
        let warmup = self.num_warmup_steps;
        let total = self.num_training_steps;
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup => {
                if s < warmup {
                    // `float(max(1.0, num_warmup_steps))`: same value.
                    warmup_ratio(s, warmup)
                } else {
                    1.0
                }
            }
            Schedule::Linear => {
                if s < warmup {
                    return warmup_ratio(s, warmup);
                }
                py_max(0.0, (total - s) as f64 / (total - warmup).max(1) as f64)
            }
            Schedule::Cosine { num_cycles } => {
                if s < warmup {
                    return warmup_ratio(s, warmup);
                }
                let progress = (s - warmup) as f64 / (total - warmup).max(1) as f64;
                py_max(0.0, 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos()))
            }
            Schedule::CosineWithRestarts { num_cycles } => {
                if s < warmup {
                    return warmup_ratio(s, warmup);
                }
                let progress = (s - warmup) as f64 / (total - warmup).max(1) as f64;
                if progress >= 1.0 {
                    return 0.0;
                }
                py_max(
                    0.0,
                    0.5 * (1.0 + (PI * py_mod(num_cycles * progress, 1.0)).cos()),
                )
            }
            Schedule::Polynomial { lr_end, power } => self.polynomial(s, lr_end, power),
            Schedule::InverseSqrt { timescale } => {
                if s < warmup {
                    return warmup_ratio(s, warmup);
                }
                let shift = timescale - warmup;
                1.0 / ((s + shift) as f64 / timescale as f64).sqrt()
            }
            Schedule::CosineWithMinLr {
                num_cycles,
                min_lr_rate,
            } => {
                if s < warmup {
                    return warmup_ratio(s, warmup);
                }
                let progress = (s - warmup) as f64 / (total - warmup).max(1) as f64;
                let factor = 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos());
                let factor = factor * (1.0 - min_lr_rate) + min_lr_rate;
                py_max(0.0, factor)
            }
            Schedule::CosineWarmupWithMinLr {
                num_cycles,
                min_lr_rate,
                warmup_lr_rate,
            } => cosine_warmup_with_min_lr(
                (s as f64, warmup as f64, total as f64),
                num_cycles,
                min_lr_rate,
                warmup_lr_rate,
            ),
            Schedule::WarmupStableDecay(wsd) => self.warmup_stable_decay(s, wsd),
        }
    }

    /// `get_polynomial_decay_schedule_with_warmup`'s lambda.
    fn polynomial(&self, s: i64, lr_end: f64, power: f64) -> f64 {
        let (warmup, total) = (self.num_warmup_steps, self.num_training_steps);
        let lr_init = self.base_lr;
        if s < warmup {
            warmup_ratio(s, warmup)
        } else if s > total {
            lr_end / lr_init // as LambdaLR multiplies by lr_init
        } else {
            let lr_range = lr_init - lr_end;
            let decay_steps = total - warmup;
            if decay_steps == 0 {
                // Python divides by zero here (warmup == total, at the
                // last step); the schedule has reached lr_end.
                return lr_end / lr_init;
            }
            // int / int in Python is the correctly rounded quotient,
            // as is the f64 division of these exactly represented ints.
            let pct_remaining = 1.0 - (s - warmup) as f64 / decay_steps as f64;
            let decay = lr_range * pct_remaining.powf(power) + lr_end;
            decay / lr_init
        }
    }

    /// `get_wsd_schedule`'s lambda: warm up, hold, decay, then stay at `min_lr_ratio`.
    fn warmup_stable_decay(&self, s: i64, wsd: Wsd) -> f64 {
        let Wsd {
            num_stable_steps,
            num_decay_steps,
            warmup_type,
            decay_type,
            min_lr_ratio,
            num_cycles,
        } = wsd;
        let warmup = self.num_warmup_steps;
        if s < warmup {
            let progress = warmup_ratio(s, warmup);
            let factor = match warmup_type {
                WsdShape::Linear => progress,
                WsdShape::Cosine => 0.5 * (1.0 - (PI * progress).cos()),
                WsdShape::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
            };
            let factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio;
            return py_max(0.0, factor);
        }
        if s < warmup + num_stable_steps {
            return 1.0;
        }
        if s < warmup + num_stable_steps + num_decay_steps {
            let progress = (s - warmup - num_stable_steps) as f64 / num_decay_steps.max(1) as f64;
            let factor = match decay_type {
                WsdShape::Linear => 1.0 - progress,
                WsdShape::Cosine => 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos()),
                WsdShape::OneMinusSqrt => 1.0 - progress.sqrt(),
            };
            let factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio;
            return py_max(0.0, factor);
        }
        min_lr_ratio
    }
}

/// `get_cosine_with_min_lr_schedule_with_warmup_lr_rate`'s lambda, which
/// converts the step counts to float up front (`(step, warmup, total)`).
fn cosine_warmup_with_min_lr(
    (cs, nw, nt): (f64, f64, f64),
    num_cycles: f64,
    min_lr_rate: f64,
    warmup_lr_rate: Option<f64>,
) -> f64 {
    if cs < nw {
        return match warmup_lr_rate {
            None => (cs + 1.0) / py_max(1.0, nw),
            Some(w) => w + (1.0 - w) * cs / py_max(1.0, nw - 1.0),
        };
    }
    let progress = (cs - nw + 1.0) / py_max(1.0, nt - nw);
    let factor = 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos());
    let factor = factor * (1.0 - min_lr_rate) + min_lr_rate;
    py_max(0.0, factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kwargs(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn sched(name: &str, kw: Value) -> LrScheduler {
        LrScheduler::new(name, 1.0, 10, 100, &kwargs(kw)).unwrap()
    }

    #[test]
    fn linear_warms_up_then_decays_to_zero() {
        let s = sched("linear", json!({}));
        assert_eq!(s.lr_at(0), 0.0);
        assert_eq!(s.lr_at(5), 0.5);
        assert_eq!(s.lr_at(10), 1.0);
        assert_eq!(s.lr_at(55), 0.5);
        assert_eq!(s.lr_at(100), 0.0);
        assert_eq!(s.lr_at(150), 0.0);
    }

    #[test]
    fn cosine_and_constants() {
        let s = sched("cosine", json!({}));
        assert_eq!(s.lr_at(10), 1.0);
        assert!((s.lr_at(55) - 0.5).abs() < 1e-15);
        assert!(s.lr_at(100).abs() < 1e-15);
        let c = sched("constant", json!({"anything": 1}));
        assert_eq!(c.lr_at(0), 1.0);
        let cw = sched("constant_with_warmup", json!({}));
        assert_eq!(cw.lr_at(3), 0.3);
        assert_eq!(cw.lr_at(50), 1.0);
    }

    #[test]
    fn min_lr_and_wsd() {
        let s = sched("cosine_with_min_lr", json!({"min_lr": 0.1}));
        assert!((s.lr_at(100) - 0.1).abs() < 1e-15);
        let w = sched(
            "warmup_stable_decay",
            json!({"num_decay_steps": 20, "decay_type": "linear"}),
        );
        assert_eq!(w.lr_at(50), 1.0);
        assert_eq!(w.lr_at(90), 0.5);
        assert_eq!(w.lr_at(100), 0.0);
        let inv = sched("inverse_sqrt", json!({}));
        assert_eq!(inv.lr_at(10), 1.0);
        assert_eq!(inv.lr_at(40), 0.5);
    }

    #[test]
    fn python_mod_and_max() {
        assert_eq!(py_mod(2.25, 1.0), 0.25);
        assert_eq!(py_mod(-0.25, 1.0), 0.75);
        assert_eq!(py_max(0.0, -0.0).to_bits(), 0.0f64.to_bits());
    }

    #[test]
    fn errors_name_the_problem() {
        let e = LrScheduler::new("cosine_annealing", 1.0, 0, 10, &Map::new()).unwrap_err();
        assert!(e.to_string().contains("cosine_annealing"), "{e}");
        let e = LrScheduler::new("reduce_lr_on_plateau", 1.0, 0, 10, &Map::new()).unwrap_err();
        assert!(matches!(e, OptimError::UnknownScheduler { .. }));
        let e = LrScheduler::new("cosine", 1.0, 0, 10, &kwargs(json!({"power": 2}))).unwrap_err();
        assert!(e.to_string().contains("power"), "{e}");
        let e = LrScheduler::new("cosine", 1.0, 0, 10, &kwargs(json!({"num_cycles": "x"})))
            .unwrap_err();
        assert!(e.to_string().contains("num_cycles"), "{e}");
        let e = LrScheduler::new("cosine_with_min_lr", 1.0, 0, 10, &Map::new()).unwrap_err();
        assert!(e.to_string().contains("min_lr"), "{e}");
        let e = LrScheduler::new("polynomial", 1e-8, 0, 10, &Map::new()).unwrap_err();
        assert!(e.to_string().contains("lr_end"), "{e}");
        let e = LrScheduler::new("warmup_stable_decay", 1.0, 0, 10, &Map::new()).unwrap_err();
        assert!(e.to_string().contains("num_decay_steps"), "{e}");
        let e = LrScheduler::new(
            "warmup_stable_decay",
            1.0,
            0,
            10,
            &kwargs(json!({"num_decay_steps": 2, "warmup_type": "exp"})),
        )
        .unwrap_err();
        assert!(e.to_string().contains("warmup_type"), "{e}");
        assert!(LrScheduler::new("linear", 1.0, 0, 10, &kwargs(json!({"last_epoch": -1}))).is_ok());
        assert!(LrScheduler::new("linear", 1.0, 0, 10, &kwargs(json!({"last_epoch": 3}))).is_err());
    }
}
