//! Parity of `trl_like::optim` with PyTorch 2.11 / transformers 5.23, and the
//! properties the Trainer relies on (exact resume, `zero_grad`, clipping).
//!
//! Fixtures in `tests/fixtures/trainer/` (written by
//! `scripts/make_trainer_fixtures.py` with the real libraries):
//! * `schedulers.json`: `get_scheduler(name, AdamW(lr=5e-4), 10, 100, kwargs)`,
//!   `get_last_lr()[0]` before each of 101 `scheduler.step()` calls;
//! * `adamw.json`: `torch.optim.AdamW(foreach=False)` on p0 [3,4] (weight decay
//!   0.1) and b0 [4] (no decay), lr 1e-2, 5 steps with stored gradients.

use std::path::PathBuf;

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use trl_like::optim::{clip_grad_norm, AdamW, LrScheduler, OptimError, ParamGroup};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Reads a fixture. serde_json (without its `float_roundtrip` feature, which
/// this workspace does not enable) may parse long decimals such as
/// `0.00045000000000000004` one ulp off; to compare bit for bit, every number
/// is first turned into a string holding its exact text, which `floats`
/// parses with Rust's correctly rounded `str::parse::<f64>`. Numbers used as
/// settings (kwargs, lr, betas) are read with [`setting`].
fn load_fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures/trainer").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate it with scripts/make_trainer_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&quote_numbers(&text))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Wraps every JSON number token (outside strings) in quotes.
fn quote_numbers(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + json.len() / 4);
    let mut chars = json.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => out.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if c == '-' || c.is_ascii_digit() {
            out.push('"');
            out.push(c);
            while let Some(&d) = chars.peek() {
                if d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '+' | '-') {
                    out.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push('"');
        } else {
            out.push(c);
        }
    }
    out
}

/// A number of the fixture, exactly as Python wrote it.
fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}")),
        Value::Number(n) => n.as_f64().expect("number"),
        other => panic!("expected a number, got {other}"),
    }
}

/// A setting (kwargs, hyper-parameters) back as ordinary JSON.
fn setting(v: &Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_number)
            .unwrap_or_else(|| v.clone()),
        Value::Array(items) => Value::Array(items.iter().map(setting).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, x)| (k.clone(), setting(x))).collect())
        }
        other => other.clone(),
    }
}

/// Flattens a nested JSON array of numbers.
fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![number(other)],
    }
}

/// An fp32 tensor of the given shape from a JSON (nested) array.
fn tensor(v: &Value, shape: &[i64]) -> Tensor {
    let data: Vec<f32> = floats(v).into_iter().map(|x| x as f32).collect();
    Tensor::from_slice(&data).reshape(shape)
}

fn leaf(v: &Value, shape: &[i64]) -> Tensor {
    tensor(v, shape).set_requires_grad(true)
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.detach().flatten(0, -1)).expect("f32 tensor")
}

/// Exact (f32 → f64 is lossless), for comparing with long decimal literals.
fn as_f64(t: &Tensor) -> Vec<f64> {
    values(t).into_iter().map(f64::from).collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|x| x.to_bits()).collect()
}

/// Sets `p.grad = g` the way a backward pass does: d/dp sum(p * g) = g exactly.
fn give_grad(p: &Tensor, g: &Tensor) {
    (p * g).sum(None::<Kind>).backward();
}

fn max_abs_diff(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
}

#[test]
fn schedulers_match_transformers() {
    let fixture = load_fixture("schedulers.json");
    let cases = fixture.as_object().expect("object of schedulers");
    assert!(
        cases.len() >= 5,
        "only {} schedulers in the fixture",
        cases.len()
    );
    let mut report = Vec::new();
    for (name, case) in cases {
        let kwargs = setting(&case["kwargs"])
            .as_object()
            .cloned()
            .unwrap_or_default();
        let warmup = number(&case["warmup"]) as usize;
        let total = number(&case["total"]) as usize;
        let base_lr = case.get("base_lr").map(number).unwrap_or(5e-4);
        let sched = LrScheduler::new(name, base_lr, warmup, total, &kwargs)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let lrs = floats(&case["lrs"]);
        assert_eq!(lrs.len(), total + 1, "{name}");
        let mut worst = 0.0f64;
        let mut exact = 0;
        for (step, want) in lrs.iter().enumerate() {
            let got = sched.lr_at(step);
            let rel = if *want == 0.0 {
                got.abs() / base_lr
            } else {
                ((got - want) / want).abs()
            };
            assert!(
                rel <= 1e-12,
                "{name} step {step}: got {got:e}, transformers {want:e} (relative difference {rel:e})"
            );
            worst = worst.max(rel);
            exact += usize::from(got == *want);
        }
        report.push(format!(
            "{name}: {exact}/{} bit-identical, max rel diff {worst:e}",
            lrs.len()
        ));
    }
    println!("{}", report.join("\n"));
}

/// The fixture's two parameters, as leaves, with the optimiser of the fixture.
fn fixture_optimizer(fx: &Value) -> (Tensor, Tensor, AdamW) {
    let p0 = leaf(&fx["p0_init"], &[3, 4]);
    let b0 = leaf(&fx["b0_init"], &[4]);
    let wd = |i: usize| number(&fx["groups"][i]["weight_decay"]);
    let groups = vec![
        ParamGroup {
            name: "decay".into(),
            params: vec![("p0".into(), p0.shallow_clone())],
            weight_decay: wd(0),
        },
        ParamGroup {
            name: "no_decay".into(),
            params: vec![("b0".into(), b0.shallow_clone())],
            weight_decay: wd(1),
        },
    ];
    let betas = (number(&fx["betas"][0]), number(&fx["betas"][1]));
    let opt = AdamW::new(groups, betas, number(&fx["eps"]));
    (p0, b0, opt)
}

fn fixture_step(fx: &Value, t: usize, p0: &Tensor, b0: &Tensor, opt: &mut AdamW) {
    opt.zero_grad();
    give_grad(p0, &tensor(&fx["grads_p0"][t], &[3, 4]));
    give_grad(b0, &tensor(&fx["grads_b0"][t], &[4]));
    opt.step(number(&fx["lr"]));
}

#[test]
fn adamw_matches_torch() {
    let fx = load_fixture("adamw.json");
    let (p0, b0, mut opt) = fixture_optimizer(&fx);
    let steps = fx["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 5);
    let mut worst = 0.0f64;
    let mut identical = true;
    for (t, want) in steps.iter().enumerate() {
        fixture_step(&fx, t, &p0, &b0, &mut opt);
        let state = opt.state_dict();
        let get = |key: &str| &state.iter().find(|(n, _)| n == key).expect(key).1;
        for (what, got) in [
            ("p0", values(&p0)),
            ("b0", values(&b0)),
            ("p0_exp_avg", values(get("p0.exp_avg"))),
            ("p0_exp_avg_sq", values(get("p0.exp_avg_sq"))),
        ] {
            let expected = floats(&want[what]);
            let d = max_abs_diff(&got, &expected);
            assert!(
                d <= 1e-6,
                "step {}: {what} differs from torch by {d:e}",
                t + 1
            );
            worst = worst.max(d);
            identical &= got.iter().zip(&expected).all(|(g, w)| *g as f64 == *w);
        }
        assert_eq!(get("p0.step").double_value(&[]), (t + 1) as f64);
    }
    println!("AdamW vs torch: max abs diff {worst:e}, bit-identical: {identical}");
}

#[test]
fn resume_from_saved_state_is_bit_exact() {
    let fx = load_fixture("adamw.json");
    // Uninterrupted run.
    let (p_ref, b_ref, mut opt_ref) = fixture_optimizer(&fx);
    for t in 0..5 {
        fixture_step(&fx, t, &p_ref, &b_ref, &mut opt_ref);
    }
    // Two steps, checkpoint (parameters + optimizer file), fresh process-like
    // restart from the checkpoint, three more steps.
    let (p1, b1, mut opt1) = fixture_optimizer(&fx);
    for t in 0..2 {
        fixture_step(&fx, t, &p1, &b1, &mut opt1);
    }
    let dir = std::env::temp_dir().join(format!("trl_like_optim_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("optimizer.safetensors");
    opt1.save(&file).unwrap();
    let saved_p = p1.detach().copy();
    let saved_b = b1.detach().copy();
    drop(opt1);

    let (p2, b2, mut opt2) = fixture_optimizer(&fx);
    tch::no_grad(|| {
        p2.shallow_clone().copy_(&saved_p);
        b2.shallow_clone().copy_(&saved_b);
    });
    opt2.load(&file).unwrap();
    assert_eq!(opt2.param_step("p0"), Some(2));
    for t in 2..5 {
        fixture_step(&fx, t, &p2, &b2, &mut opt2);
    }
    assert_eq!(bits(&p2), bits(&p_ref), "p0 after resume");
    assert_eq!(bits(&b2), bits(&b_ref), "b0 after resume");
    for ((n1, t1), (n2, t2)) in opt2.state_dict().iter().zip(opt_ref.state_dict().iter()) {
        assert_eq!(n1, n2);
        assert_eq!(bits(t1), bits(t2), "{n1} after resume");
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn single(name: &str, p: &Tensor, weight_decay: f64) -> ParamGroup {
    ParamGroup {
        name: "g".into(),
        params: vec![(name.into(), p.shallow_clone())],
        weight_decay,
    }
}

#[test]
fn clip_grad_norm_matches_hand_computation() {
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, -4.0])
        .reshape([2, 2])
        .set_requires_grad(true);
    let b = Tensor::from_slice(&[0.5f32, -1.5, 2.5]).set_requires_grad(true);
    let no_grad = Tensor::from_slice(&[100.0f32]).set_requires_grad(true);
    let ga = [0.3f32, -1.2, 2.0, 0.7];
    let gb = [-0.4f32, 1.1, 0.25];
    let set = || {
        for t in [&a, &b] {
            let mut t = t.shallow_clone();
            t.zero_grad();
        }
        give_grad(&a, &Tensor::from_slice(&ga).reshape([2, 2]));
        give_grad(&b, &Tensor::from_slice(&gb));
    };
    let params = [
        a.shallow_clone(),
        b.shallow_clone(),
        no_grad.shallow_clone(),
    ];
    // The norm of the concatenated gradients.
    let hand = ga
        .iter()
        .chain(&gb)
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt();

    set();
    let total = clip_grad_norm(&params, 1.0);
    assert!(((total - hand) / hand).abs() < 1e-6, "{total} vs {hand}");
    // Clipped: every gradient scaled by max_norm / (total + 1e-6).
    let coef = 1.0 / (hand + 1e-6);
    for (t, g) in [(&a, &ga[..]), (&b, &gb[..])] {
        for (got, orig) in values(&t.grad()).iter().zip(g) {
            let want = *orig as f64 * coef;
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
    assert!(!no_grad.grad().defined());
    let after = clip_grad_norm(&params, 0.0);
    assert!(
        (after - 1.0).abs() < 1e-5,
        "norm after clipping to 1: {after}"
    );

    // Coefficient >= 1: gradients unchanged, bit for bit.
    set();
    let before = (bits(&a.grad()), bits(&b.grad()));
    let total = clip_grad_norm(&params, 10.0);
    assert!(((total - hand) / hand).abs() < 1e-6);
    assert_eq!((bits(&a.grad()), bits(&b.grad())), before);

    // max_norm <= 0: only the norm.
    let total = clip_grad_norm(&params, 0.0);
    assert!(((total - hand) / hand).abs() < 1e-6);
    assert_eq!((bits(&a.grad()), bits(&b.grad())), before);

    // No gradients at all.
    assert_eq!(clip_grad_norm(&[no_grad.shallow_clone()], 1.0), 0.0);
}

#[test]
fn zero_grad_sets_grads_to_none() {
    let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    let q = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
    let opt = AdamW::new(
        vec![single("p", &p, 0.0), single("q", &q, 0.0)],
        (0.9, 0.999),
        1e-8,
    );
    give_grad(&p, &Tensor::from_slice(&[1.0f32, 1.0]));
    give_grad(&q, &Tensor::from_slice(&[1.0f32]));
    assert!(p.grad().defined() && q.grad().defined());
    opt.zero_grad();
    assert!(!p.grad().defined(), "p.grad should be None");
    assert!(!q.grad().defined(), "q.grad should be None");
    // The next backward starts from scratch (no accumulation into old grads).
    give_grad(&p, &Tensor::from_slice(&[0.5f32, -0.5]));
    assert_eq!(values(&p.grad()), [0.5, -0.5]);
}

#[test]
fn params_without_grad_are_skipped() {
    let p = Tensor::from_slice(&[1.0f32, -1.0]).set_requires_grad(true);
    let frozen_this_step = Tensor::from_slice(&[2.0f32, 3.0]).set_requires_grad(true);
    let mut opt = AdamW::new(
        vec![single("p", &p, 0.1), single("idle", &frozen_this_step, 0.1)],
        (0.9, 0.999),
        1e-8,
    );
    let idle_before = bits(&frozen_this_step);
    give_grad(&p, &Tensor::from_slice(&[0.1f32, 0.2]));
    opt.step(1e-2);
    // No weight decay and no state either, as in torch.
    assert_eq!(bits(&frozen_this_step), idle_before);
    assert_eq!(opt.param_step("p"), Some(1));
    assert_eq!(opt.param_step("idle"), Some(0));
    assert_ne!(values(&p), [1.0, -1.0]);
    // The state file still lists it (step 0, zero moments = torch's lazy init).
    let sd = opt.state_dict();
    let idle_step = &sd.iter().find(|(n, _)| n == "idle.step").unwrap().1;
    assert_eq!(idle_step.double_value(&[]), 0.0);
}

#[test]
fn load_state_dict_rejects_foreign_state() {
    let p = Tensor::from_slice(&[1.0f32, -1.0]).set_requires_grad(true);
    let mut opt = AdamW::new(
        vec![single("layer.lora_A.weight", &p, 0.0)],
        (0.9, 0.999),
        1e-8,
    );
    give_grad(&p, &Tensor::from_slice(&[0.1f32, 0.2]));
    opt.step(1e-2);

    // A different parameter name.
    let renamed: Vec<(String, Tensor)> = opt
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n.replace("lora_A", "lora_X"), t))
        .collect();
    let err = opt.load_state_dict(renamed).unwrap_err();
    assert!(
        matches!(&err, OptimError::UnexpectedState(n) if n.contains("lora_X")),
        "{err}"
    );
    assert!(err.to_string().contains("layer.lora_X.weight"), "{err}");

    // A missing entry.
    let partial: Vec<(String, Tensor)> = opt
        .state_dict()
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".exp_avg_sq"))
        .collect();
    let err = opt.load_state_dict(partial).unwrap_err();
    assert!(
        matches!(&err, OptimError::MissingState(n) if n == "layer.lora_A.weight.exp_avg_sq"),
        "{err}"
    );

    // A shape that does not fit.
    let reshaped: Vec<(String, Tensor)> = opt
        .state_dict()
        .into_iter()
        .map(|(n, t)| {
            if n.ends_with(".exp_avg") {
                (n, Tensor::zeros([3], (Kind::Float, Device::Cpu)))
            } else {
                (n, t)
            }
        })
        .collect();
    let err = opt.load_state_dict(reshaped).unwrap_err();
    assert!(
        err.to_string().contains("layer.lora_A.weight.exp_avg")
            && err.to_string().contains("shape"),
        "{err}"
    );

    // The failed loads left the state alone.
    assert_eq!(opt.param_step("layer.lora_A.weight"), Some(1));

    // A missing file names the path.
    let err = opt
        .load(&root().join("no/such/optimizer.safetensors"))
        .unwrap_err();
    assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
}

#[test]
fn bf16_params_keep_state_in_their_dtype() {
    let p = Tensor::from_slice(&[1.0f32, -1.0, 0.5])
        .to_kind(Kind::BFloat16)
        .set_requires_grad(true);
    let mut opt = AdamW::new(vec![single("p", &p, 0.01)], (0.9, 0.999), 1e-8);
    give_grad(
        &p,
        &Tensor::from_slice(&[0.1f32, 0.2, -0.3]).to_kind(Kind::BFloat16),
    );
    opt.step(1e-2);
    let sd = opt.state_dict();
    assert_eq!(sd[0].1.kind(), Kind::BFloat16);
    assert_eq!(sd[1].1.kind(), Kind::BFloat16);
    assert_eq!(sd[2].1.kind(), Kind::Float);
    assert_eq!(p.kind(), Kind::BFloat16);
}

/// Spot values of the schedules `schedulers.json` does not cover, from
/// transformers 5.23 (`get_scheduler(name, AdamW(lr=3e-4), warmup, total,
/// scheduler_specific_kwargs=kwargs)`, `get_last_lr()[0]` before the
/// `step`-th `scheduler.step()`, printed with Python's `repr`).
/// (name, kwargs as JSON, warmup, total, [(step, lr)]).
type SpotValues = (
    &'static str,
    &'static str,
    usize,
    usize,
    &'static [(usize, f64)],
);

const EXTRA_SCHEDULES: &[SpotValues] = &[
    (
        "inverse_sqrt",
        r#"{}"#,
        10,
        100,
        &[
            (0, 0.0),
            (3, 8.999999999999999e-05),
            (7, 0.00020999999999999998),
            (10, 0.0003),
            (13, 0.00026311740579210873),
            (34, 0.00016269784336399212),
            (50, 0.00013416407864998736),
            (77, 0.00010811249552346706),
            (85, 0.00010289915108550528),
            (90, 9.999999999999999e-05),
            (99, 9.534625892455922e-05),
            (100, 9.486832980505138e-05),
            (101, 9.439751632913289e-05),
            (120, 8.660254037844386e-05),
        ],
    ),
    (
        "inverse_sqrt",
        r#"{"timescale": 25}"#,
        10,
        100,
        &[
            (0, 0.0),
            (3, 8.999999999999999e-05),
            (7, 0.00020999999999999998),
            (10, 0.0003),
            (13, 0.00028347335475692036),
            (34, 0.00021428571428571427),
            (50, 0.00018605210188381264),
            (77, 0.00015638581054280607),
            (85, 0.00015),
            (90, 0.00014638501094227995),
            (99, 0.0001404878717372541),
            (100, 0.00013987572123604707),
            (101, 0.0001392715036327889),
            (120, 0.00012909944487358055),
        ],
    ),
    (
        "cosine_warmup_with_min_lr",
        r#"{"min_lr": 1e-05}"#,
        10,
        100,
        &[
            (0, 2.9999999999999997e-05),
            (3, 0.00011999999999999999),
            (7, 0.00023999999999999998),
            (10, 0.00029991166991776886),
            (13, 0.00029858886996752767),
            (34, 0.00024820420340454817),
            (50, 0.00017518009963920947),
            (77, 5.0695728950895605e-05),
            (85, 2.6972599035455587e-05),
            (90, 1.7096805137202738e-05),
            (99, 1e-05),
            (100, 1.0088330082231116e-05),
            (101, 1.0353212712325475e-05),
            (120, 4.7244000305777834e-05),
        ],
    ),
    (
        "cosine_warmup_with_min_lr",
        r#"{"min_lr_rate": 0.1, "warmup_lr_rate": 0.2}"#,
        10,
        100,
        &[
            (0, 5.9999999999999995e-05),
            (3, 0.00014000000000000001),
            (7, 0.0002466666666666666),
            (10, 0.00029991776164757793),
            (13, 0.000298686189280112),
            (34, 0.0002517763273076828),
            (50, 0.00018378836862960882),
            (77, 6.788912695428212e-05),
            (85, 4.580207496404486e-05),
            (90, 3.660737030015427e-05),
            (99, 2.9999999999999997e-05),
            (100, 3.008223835242207e-05),
            (101, 3.0328853214923716e-05),
            (120, 6.467544856055177e-05),
        ],
    ),
    (
        "warmup_stable_decay",
        r#"{"num_decay_steps": 30, "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1}"#,
        10,
        100,
        &[
            (0, 2.9999999999999997e-05),
            (3, 8.564899094051612e-05),
            (7, 0.0002443510090594838),
            (10, 0.0003),
            (13, 0.0003),
            (34, 0.0003),
            (50, 0.0003),
            (77, 0.00016957760928429505),
            (85, 0.00010908116907963214),
            (90, 7.954592314951396e-05),
            (99, 3.4538138332452745e-05),
            (100, 2.9999999999999997e-05),
            (101, 2.9999999999999997e-05),
            (120, 2.9999999999999997e-05),
        ],
    ),
    (
        "warmup_stable_decay",
        r#"{"num_decay_steps": 20, "num_stable_steps": 50, "warmup_type": "1-sqrt", "decay_type": "linear"}"#,
        7,
        100,
        &[
            (0, 0.0),
            (3, 7.322131619446367e-05),
            (7, 0.0003),
            (10, 0.0003),
            (13, 0.0003),
            (34, 0.0003),
            (50, 0.0003),
            (77, 0.0),
            (85, 0.0),
            (90, 0.0),
            (99, 0.0),
            (100, 0.0),
            (101, 0.0),
            (120, 0.0),
        ],
    ),
    (
        "warmup_stable_decay",
        r#"{"num_decay_steps": 25, "num_cycles": 0.75, "min_lr_ratio": 0.05}"#,
        10,
        100,
        &[
            (0, 1.4999999999999999e-05),
            (3, 0.00010049999999999998),
            (7, 0.00021449999999999998),
            (10, 0.0003),
            (13, 0.0003),
            (34, 0.0003),
            (50, 0.0003),
            (77, 0.0002899931492390758),
            (85, 0.00011346507830156998),
            (90, 2.197444642794062e-05),
            (99, 0.0001307981626715342),
            (100, 1.4999999999999999e-05),
            (101, 1.4999999999999999e-05),
            (120, 1.4999999999999999e-05),
        ],
    ),
    (
        "polynomial",
        r#"{"power": 0.5, "lr_end": 1e-05}"#,
        3,
        77,
        &[
            (0, 0.0),
            (3, 0.0003),
            (7, 0.00029205328229618964),
            (10, 0.000285943100284451),
            (13, 0.0002796945218856607),
            (34, 0.00023106315595078006),
            (50, 0.00018517173041086035),
            (77, 1e-05),
            (85, 1e-05),
            (90, 1e-05),
            (99, 1e-05),
            (100, 1e-05),
            (101, 1e-05),
            (120, 1e-05),
        ],
    ),
    (
        "cosine_with_restarts",
        r#"{"num_cycles": 3}"#,
        10,
        100,
        &[
            (0, 0.0),
            (3, 8.999999999999999e-05),
            (7, 0.00020999999999999998),
            (10, 0.0003),
            (13, 0.00029265847744427303),
            (34, 2.8647450843757897e-05),
            (50, 0.00022500000000000005),
            (77, 0.0002614717238216091),
            (85, 0.00015),
            (90, 7.500000000000009e-05),
            (99, 8.217156947589898e-07),
            (100, 0.0),
            (101, 0.0),
            (120, 0.0),
        ],
    ),
    (
        "cosine_with_min_lr",
        r#"{"min_lr": 5e-05, "num_cycles": 0.7}"#,
        13,
        91,
        &[
            (0, 0.0),
            (3, 6.923076923076922e-05),
            (7, 0.00016153846153846153),
            (10, 0.00023076923076923076),
            (13, 0.0003),
            (34, 0.00022213685521104006),
            (50, 0.00011337403726213282),
            (77, 6.339652225426697e-05),
            (85, 9.910468652266106e-05),
            (90, 0.00012973435018389794),
            (99, 0.00019206420149259142),
            (100, 0.00019901583966921359),
            (101, 0.00020589113834570865),
            (120, 0.0002961228201938275),
        ],
    ),
    (
        "linear",
        r#"{}"#,
        120,
        100,
        &[
            (0, 0.0),
            (3, 7.499999999999999e-06),
            (7, 1.75e-05),
            (10, 2.4999999999999998e-05),
            (13, 3.25e-05),
            (34, 8.499999999999999e-05),
            (50, 0.000125),
            (77, 0.0001925),
            (85, 0.0002125),
            (90, 0.000225),
            (99, 0.00024749999999999994),
            (100, 0.00025),
            (101, 0.00025249999999999996),
            (120, 0.0),
        ],
    ),
];

#[test]
fn other_schedulers_match_transformers_spot_values() {
    for (name, kwargs, warmup, total, expected) in EXTRA_SCHEDULES {
        let kwargs: serde_json::Map<String, Value> = serde_json::from_str(kwargs).unwrap();
        let sched = LrScheduler::new(name, 3e-4, *warmup, *total, &kwargs)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (step, want) in expected.iter() {
            let got = sched.lr_at(*step);
            let rel = if *want == 0.0 {
                got.abs()
            } else {
                ((got - want) / want).abs()
            };
            assert!(
                rel <= 1e-12,
                "{name} {kwargs:?} step {step}: got {got:e}, transformers {want:e}"
            );
        }
    }
}

/// torch 2.11 `AdamW(foreach=False)` on a bf16 parameter (lr 2e-3, betas
/// (0.9, 0.95), eps 1e-6, weight_decay 0.05, 4 steps with these gradients
/// cast to bf16): the parameter and `exp_avg_sq` afterwards, as floats.
/// Bit-exact parity needs torch's exact kernels: Python's `t.mul_(float)` is
/// `mul_.Tensor`, which rounds differently from `mul_.Scalar` on bf16 (7 of
/// these 24 `exp_avg_sq` values would differ).
const BF16_P0: [f32; 24] = [
    -1.3, 1.29, -0.19, 2.4, 0.92, -0.56, 2.03, 0.55, -0.93, 1.66, 0.18, -1.3, 1.29, -0.19, 2.4,
    0.92, -0.56, 2.03, 0.55, -0.93, 1.66, 0.18, -1.3, 1.29,
];
const BF16_GRADS: [[f32; 24]; 4] = [
    [
        -0.27, 0.06, 0.39, 0.72, -0.38, -0.05, 0.28, 0.61, -0.49, -0.16, 0.17, 0.5, -0.6, -0.27,
        0.06, 0.39, 0.72, -0.38, -0.05, 0.28, 0.61, -0.49, -0.16, 0.17,
    ],
    [
        -0.16, 0.28, 0.72, -0.27, 0.17, 0.61, -0.38, 0.06, 0.5, -0.49, -0.05, 0.39, -0.6, -0.16,
        0.28, 0.72, -0.27, 0.17, 0.61, -0.38, 0.06, 0.5, -0.49, -0.05,
    ],
    [
        -0.05, 0.5, -0.38, 0.17, 0.72, -0.16, 0.39, -0.49, 0.06, 0.61, -0.27, 0.28, -0.6, -0.05,
        0.5, -0.38, 0.17, 0.72, -0.16, 0.39, -0.49, 0.06, 0.61, -0.27,
    ],
    [
        0.06, 0.72, -0.05, 0.61, -0.16, 0.5, -0.27, 0.39, -0.38, 0.28, -0.49, 0.17, -0.6, 0.06,
        0.72, -0.05, 0.61, -0.16, 0.5, -0.27, 0.39, -0.38, 0.28, -0.49,
    ],
];
const BF16_P_FINAL: [f64; 24] = [
    -1.296875,
    1.2890625,
    -0.1962890625,
    2.40625,
    0.92578125,
    -0.5546875,
    2.03125,
    0.546875,
    -0.92578125,
    1.65625,
    0.1787109375,
    -1.296875,
    1.2890625,
    -0.18359375,
    2.40625,
    0.91796875,
    -0.5625,
    2.03125,
    0.5546875,
    -0.93359375,
    1.65625,
    0.181640625,
    -1.296875,
    1.2890625,
];
const BF16_EXP_AVG_SQ_FINAL: [f64; 24] = [
    0.004547119140625,
    0.04150390625,
    0.037109375,
    0.04541015625,
    0.033203125,
    0.030517578125,
    0.0208740234375,
    0.034912109375,
    0.0289306640625,
    0.033447265625,
    0.016845703125,
    0.0228271484375,
    0.0673828125,
    0.004547119140625,
    0.04150390625,
    0.037109375,
    0.04541015625,
    0.033203125,
    0.030517578125,
    0.0208740234375,
    0.034912109375,
    0.0289306640625,
    0.033447265625,
    0.016845703125,
];

#[test]
fn adamw_bf16_matches_torch_bit_for_bit() {
    let p = Tensor::from_slice(&BF16_P0)
        .to_kind(Kind::BFloat16)
        .set_requires_grad(true);
    let mut opt = AdamW::new(vec![single("p", &p, 0.05)], (0.9, 0.95), 1e-6);
    for g in &BF16_GRADS {
        opt.zero_grad();
        give_grad(&p, &Tensor::from_slice(g).to_kind(Kind::BFloat16));
        opt.step(2e-3);
    }
    assert_eq!(p.kind(), Kind::BFloat16);
    assert_eq!(as_f64(&p.to_kind(Kind::Float)), BF16_P_FINAL);
    let sd = opt.state_dict();
    assert_eq!(sd[1].0, "p.exp_avg_sq");
    assert_eq!(sd[1].1.kind(), Kind::BFloat16);
    assert_eq!(as_f64(&sd[1].1.to_kind(Kind::Float)), BF16_EXP_AVG_SQ_FINAL);
}

/// A group of several parameters takes the flat update (one kernel per
/// operation for the group); it must give exactly the bits of the per-tensor
/// loop, which the fixture test pins to torch's. Odd sizes put values on the
/// kernels' vectorised and scalar paths differently in the two layouts; a
/// save/load in the middle leaves and re-enters the flat layout.
#[test]
fn flat_group_update_equals_the_per_tensor_loop_bit_for_bit() {
    tch::manual_seed(7);
    let shapes: [&[i64]; 5] = [&[3, 5], &[7], &[16, 8], &[1], &[33, 3]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, tch::kind::FLOAT_CPU))
        .collect();
    let grads: Vec<Vec<Tensor>> = (0..6)
        .map(|_| {
            shapes
                .iter()
                .map(|s| Tensor::randn(*s, tch::kind::FLOAT_CPU) * 0.1)
                .collect()
        })
        .collect();
    let leaves = || -> Vec<Tensor> {
        init.iter()
            .map(|t| t.copy().set_requires_grad(true))
            .collect()
    };
    let named = |ps: &[Tensor]| -> Vec<(String, Tensor)> {
        ps.iter()
            .enumerate()
            .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
            .collect()
    };
    // One group of five (flat) against five groups of one (per tensor).
    let flat_params = leaves();
    let mut flat = AdamW::new(
        vec![ParamGroup {
            name: "all".into(),
            params: named(&flat_params),
            weight_decay: 0.1,
        }],
        (0.9, 0.999),
        1e-8,
    );
    let loop_params = leaves();
    let mut per_tensor = AdamW::new(
        named(&loop_params)
            .into_iter()
            .map(|(n, p)| ParamGroup {
                name: n.clone(),
                params: vec![(n, p)],
                weight_decay: 0.1,
            })
            .collect(),
        (0.9, 0.999),
        1e-8,
    );
    let dir = std::env::temp_dir().join(format!("trl-like-flat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (t, g) in grads.iter().enumerate() {
        for (opt, ps) in [(&mut flat, &flat_params), (&mut per_tensor, &loop_params)] {
            opt.zero_grad();
            for (p, gi) in ps.iter().zip(g) {
                give_grad(p, gi);
            }
            opt.step(1e-2 * (1.0 + t as f64));
        }
        if t == 2 {
            let path = dir.join("flat.safetensors");
            flat.save(&path).unwrap();
            flat.load(&path).unwrap();
        }
        for (a, b) in flat_params.iter().zip(&loop_params) {
            assert_eq!(bits(a), bits(b), "step {}: parameters differ", t + 1);
        }
        let (sa, sb) = (flat.state_dict(), per_tensor.state_dict());
        for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
            assert_eq!(na, nb);
            assert_eq!(bits(ta), bits(tb), "step {}: {na} differs", t + 1);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
