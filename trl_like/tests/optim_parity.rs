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
        panic!("{}: {e} (generate it with scripts/make_trainer_fixtures.py)", path.display())
    });
    serde_json::from_str(&quote_numbers(&text)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
        Value::Object(map) => Value::Object(map.iter().map(|(k, x)| (k.clone(), setting(x))).collect()),
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

fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|x| x.to_bits()).collect()
}

/// Sets `p.grad = g` the way a backward pass does: d/dp sum(p * g) = g exactly.
fn give_grad(p: &Tensor, g: &Tensor) {
    (p * g).sum(None::<Kind>).backward();
}

fn max_abs_diff(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max)
}

#[test]
fn schedulers_match_transformers() {
    let fixture = load_fixture("schedulers.json");
    let cases = fixture.as_object().expect("object of schedulers");
    assert!(cases.len() >= 5, "only {} schedulers in the fixture", cases.len());
    let mut report = Vec::new();
    for (name, case) in cases {
        let kwargs = setting(&case["kwargs"]).as_object().cloned().unwrap_or_default();
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
            let rel = if *want == 0.0 { got.abs() / base_lr } else { ((got - want) / want).abs() };
            assert!(
                rel <= 1e-12,
                "{name} step {step}: got {got:e}, transformers {want:e} (relative difference {rel:e})"
            );
            worst = worst.max(rel);
            exact += usize::from(got == *want);
        }
        report.push(format!("{name}: {exact}/{} bit-identical, max rel diff {worst:e}", lrs.len()));
    }
    println!("{}", report.join("\n"));
}

/// The fixture's two parameters, as leaves, with the optimiser of the fixture.
fn fixture_optimizer(fx: &Value) -> (Tensor, Tensor, AdamW) {
    let p0 = leaf(&fx["p0_init"], &[3, 4]);
    let b0 = leaf(&fx["b0_init"], &[4]);
    let wd = |i: usize| number(&fx["groups"][i]["weight_decay"]);
    let groups = vec![
        ParamGroup { name: "decay".into(), params: vec![("p0".into(), p0.shallow_clone())], weight_decay: wd(0) },
        ParamGroup { name: "no_decay".into(), params: vec![("b0".into(), b0.shallow_clone())], weight_decay: wd(1) },
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
            assert!(d <= 1e-6, "step {}: {what} differs from torch by {d:e}", t + 1);
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
    ParamGroup { name: "g".into(), params: vec![(name.into(), p.shallow_clone())], weight_decay }
}

#[test]
fn clip_grad_norm_matches_hand_computation() {
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, -4.0]).reshape([2, 2]).set_requires_grad(true);
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
    let params = [a.shallow_clone(), b.shallow_clone(), no_grad.shallow_clone()];
    // The norm of the concatenated gradients.
    let hand = ga.iter().chain(&gb).map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();

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
    assert!((after - 1.0).abs() < 1e-5, "norm after clipping to 1: {after}");

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
    let mut opt = AdamW::new(vec![single("layer.lora_A.weight", &p, 0.0)], (0.9, 0.999), 1e-8);
    give_grad(&p, &Tensor::from_slice(&[0.1f32, 0.2]));
    opt.step(1e-2);

    // A different parameter name.
    let renamed: Vec<(String, Tensor)> = opt
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n.replace("lora_A", "lora_X"), t))
        .collect();
    let err = opt.load_state_dict(renamed).unwrap_err();
    assert!(matches!(&err, OptimError::UnexpectedState(n) if n.contains("lora_X")), "{err}");
    assert!(err.to_string().contains("layer.lora_X.weight"), "{err}");

    // A missing entry.
    let partial: Vec<(String, Tensor)> =
        opt.state_dict().into_iter().filter(|(n, _)| !n.ends_with(".exp_avg_sq")).collect();
    let err = opt.load_state_dict(partial).unwrap_err();
    assert!(
        matches!(&err, OptimError::MissingState(n) if n == "layer.lora_A.weight.exp_avg_sq"),
        "{err}"
    );

    // A shape that does not fit.
    let reshaped: Vec<(String, Tensor)> = opt
        .state_dict()
        .into_iter()
        .map(|(n, t)| if n.ends_with(".exp_avg") { (n, Tensor::zeros([3], (Kind::Float, Device::Cpu))) } else { (n, t) })
        .collect();
    let err = opt.load_state_dict(reshaped).unwrap_err();
    assert!(err.to_string().contains("layer.lora_A.weight.exp_avg") && err.to_string().contains("shape"), "{err}");

    // The failed loads left the state alone.
    assert_eq!(opt.param_step("layer.lora_A.weight"), Some(1));

    // A missing file names the path.
    let err = opt.load(&root().join("no/such/optimizer.safetensors")).unwrap_err();
    assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
}

#[test]
fn bf16_params_keep_state_in_their_dtype() {
    let p = Tensor::from_slice(&[1.0f32, -1.0, 0.5]).to_kind(Kind::BFloat16).set_requires_grad(true);
    let mut opt = AdamW::new(vec![single("p", &p, 0.01)], (0.9, 0.999), 1e-8);
    give_grad(&p, &Tensor::from_slice(&[0.1f32, 0.2, -0.3]).to_kind(Kind::BFloat16));
    opt.step(1e-2);
    let sd = opt.state_dict();
    assert_eq!(sd[0].1.kind(), Kind::BFloat16);
    assert_eq!(sd[1].1.kind(), Kind::BFloat16);
    assert_eq!(sd[2].1.kind(), Kind::Float);
    assert_eq!(p.kind(), Kind::BFloat16);
}


#[test]
fn zz_tmp_extra() {
    let cases: Value = serde_json::from_str(&std::fs::read_to_string("/tmp/optx/sched.json").unwrap()).unwrap();
    for c in cases.as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let kw = c["kwargs"].as_object().cloned().unwrap();
        let s = LrScheduler::new(name, 3e-4, c["warmup"].as_u64().unwrap() as usize, c["total"].as_u64().unwrap() as usize, &kw).unwrap();
        let mut bad = 0; let mut worst = 0.0f64;
        for (i, w) in c["lrs"].as_array().unwrap().iter().enumerate() {
            let w: f64 = w.as_str().unwrap().parse().unwrap();
            let g = s.lr_at(i);
            if g != w { bad += 1; worst = worst.max(((g - w) / w).abs()); }
        }
        println!("{name} {:?} w{} t{}: {bad} differ, worst {worst:e}", c["kwargs"], c["warmup"], c["total"]);
    }
    let t: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors("/tmp/optx/extra.safetensors").unwrap().into_iter().collect();
    let ps: Vec<Tensor> = (0..3).map(|i| t[&format!("g{i}")].zeros_like().set_requires_grad(true)).collect();
    for (i, p) in ps.iter().enumerate() { give_grad(p, &t[&format!("g{i}")]); }
    let total = clip_grad_norm(&ps, 1.0);
    println!("clip total {total} vs torch {} ; eq {}", t["total"].double_value(&[0]), total == t["total"].double_value(&[0]));
    for (i, p) in ps.iter().enumerate() { println!("clipped{i} bit-eq {}", bits(&p.grad()) == bits(&t[&format!("clipped{i}")])); }
    let pb = t["pb0"].copy().set_requires_grad(true);
    let pf = t["pf0"].copy().set_requires_grad(true);
    let mut opt = AdamW::new(vec![single("pb", &pb, 0.05), single("pf", &pf, 0.0)], (0.9, 0.95), 1e-6);
    for s in 0..6 {
        opt.zero_grad();
        give_grad(&pb, &t[&format!("gb{s}")]);
        give_grad(&pf, &t[&format!("gf{s}")]);
        opt.step(2e-3);
    }
    let diff = (pb.detach().to_kind(Kind::Float) - t["pb_final"].to_kind(Kind::Float)).abs();
    println!("bf16 differing {} of {}, max {}", diff.gt(0.0).sum(Kind::Int64).int64_value(&[]), diff.numel(), diff.max().double_value(&[]));
    let eqb = pb.detach().to_kind(Kind::Float).eq_tensor(&t["pb_final"].to_kind(Kind::Float)).all().int64_value(&[]);
    let eqf = bits(&pf) == bits(&t["pf_final"]);
    let sd = opt.state_dict();
    let v = &sd[1].1;
    let eqv = v.to_kind(Kind::Float).eq_tensor(&t["pb_exp_avg_sq"].to_kind(Kind::Float)).all().int64_value(&[]);
    println!("bf16 param eq {eqb}, bf16 exp_avg_sq eq {eqv}, fp32 [333,7] eq {eqf}; maxdiff pf {}", (&pf.detach() - &t["pf_final"]).abs().max().double_value(&[]));
}
