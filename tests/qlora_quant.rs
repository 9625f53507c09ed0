//! 4-bit quantization bit for bit against bitsandbytes 0.50 on the CPU.
//!
//! Fixture: `scripts/make_quant_fixtures.py` → tests/fixtures/quant/blockwise.safetensors,
//! NF4 / FP4 × nested on / off × fp32 / bf16 inputs × three shapes (one with a partial
//! last block, one with several nested blocks).

use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};
use trl_like::nn::{with_4bit_linears, Linear, LinearWeight};
use trl_like::quant::{Packed4bit, Quant4bitConfig, QuantError, QuantType};

fn fixture() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quant/blockwise.safetensors");
    Tensor::read_safetensors(path)
        .expect("fixture readable")
        .into_iter()
        .collect()
}

/// Equal bits. The one exception is the sign of a zero: bitsandbytes' own CPU kernels
/// disagree on FP4 code 8 (+0 in the AVX512 path that row lengths divisible by 16 take,
/// -0 in the scalar fallback), and no product or sum can tell the two apart.
fn same_bits(name: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size(), "{name}: shape");
    assert_eq!(a.kind(), b.kind(), "{name}: dtype");
    let as_int = |t: &Tensor| match t.kind() {
        Kind::Float => t.view_dtype(Kind::Int),
        Kind::BFloat16 | Kind::Half => t.view_dtype(Kind::Int16),
        _ => t.shallow_clone(),
    };
    let mut differ = as_int(a).ne_tensor(&as_int(b));
    if a.is_floating_point() {
        differ = differ.logical_and(&a.ne(0.0).logical_or(&b.ne(0.0)));
    }
    let differ = differ.sum(Kind::Int64).int64_value(&[]);
    assert_eq!(
        differ, 0,
        "{name}: {differ} elements differ from bitsandbytes"
    );
}

struct Case {
    name: String,
    quant_type: QuantType,
    nested: bool,
    input: String,
}

fn cases(fx: &HashMap<String, Tensor>) -> Vec<Case> {
    let mut out: Vec<Case> = fx
        .keys()
        .filter_map(|k| k.strip_suffix(".dequant"))
        .map(|name| {
            let parts: Vec<&str> = name.split('_').collect();
            Case {
                name: name.to_string(),
                quant_type: QuantType::parse(parts[0]).unwrap(),
                nested: parts[1] == "nested",
                input: format!("input.{}.{}", parts[2], parts[3]),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(out.len(), 24, "2 types x 2 nesting x 2 dtypes x 3 shapes");
    out
}

#[test]
fn quantize_matches_bitsandbytes_bit_for_bit() {
    let fx = fixture();
    for case in cases(&fx) {
        let name = &case.name;
        let w = &fx[&case.input];
        let q = Packed4bit::quantize(
            w,
            Quant4bitConfig {
                quant_type: case.quant_type,
                nested: case.nested,
            },
        )
        .unwrap();
        // Every tensor bitsandbytes saves, under the same keys.
        let ours: HashMap<String, Tensor> = q
            .state_dict(&format!("{name}.weight"))
            .into_iter()
            .collect();
        let theirs: Vec<&String> = fx
            .keys()
            .filter(|k| k.starts_with(&format!("{name}.weight")))
            .collect();
        assert_eq!(ours.len(), theirs.len(), "{name}: saved keys");
        for key in theirs {
            let mine = ours
                .get(key)
                .unwrap_or_else(|| panic!("{key} not produced"));
            if key.contains(".quant_state.") {
                // JSON with Python's spacing and float repr: the same bytes.
                let text = |t: &Tensor| String::from_utf8(Vec::<u8>::try_from(t).unwrap()).unwrap();
                assert_eq!(text(mine), text(&fx[key]), "{key}");
                continue;
            }
            same_bits(key, mine, &fx[key]);
        }
        if case.nested {
            let offset = q.state.nested.as_ref().unwrap().offset.double_value(&[]) as f32;
            let json_key = format!(
                "{name}.weight.quant_state.bitsandbytes__{}",
                case.quant_type
            );
            let bytes = Vec::<u8>::try_from(&fx[&json_key]).unwrap();
            let fields: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                fields["nested_offset"].as_f64().unwrap() as f32,
                offset,
                "{name}: offset"
            );
        }
        same_bits(
            &format!("{name}: dequantized"),
            &q.dequantize(w.kind()),
            &fx[&format!("{name}.dequant")],
        );
    }
}

#[test]
fn saved_quant_state_loads_and_dequantizes_like_bitsandbytes() {
    let mut fx = fixture();
    for case in cases(&fx) {
        let name = &case.name;
        let expected = fx[&format!("{name}.dequant")].shallow_clone();
        let key = format!("{name}.weight");
        let q = Packed4bit::from_state_dict(&key, &mut |k: &str| fx.remove(k)).unwrap();
        assert_eq!(q.state.quant_type, case.quant_type);
        assert_eq!(q.state.nested.is_some(), case.nested);
        same_bits(
            &format!("{name}: loaded + dequantized"),
            &q.dequantize(q.state.dtype),
            &expected,
        );
    }
}

#[test]
fn corrupt_quant_state_names_the_tensor() {
    let fx = fixture();
    let name = "nf4_nested_fp32_33x512";
    let key = format!("{name}.weight");
    let load = |drop: &str, replace: Option<(&str, Tensor)>| {
        let mut fx: HashMap<String, Tensor> = fx
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        fx.remove(drop);
        if let Some((k, t)) = replace {
            fx.insert(k.to_string(), t);
        }
        Packed4bit::from_state_dict(&key, &mut |k: &str| fx.remove(k)).unwrap_err()
    };
    let err = load(&format!("{key}.absmax"), None);
    assert!(
        matches!(&err, QuantError::Missing { tensor } if *tensor == format!("{key}.absmax")),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("{key}.absmax")));

    let short = fx[&key].narrow(0, 0, 100);
    let err = load("", Some((&key, short)));
    assert!(
        matches!(&err, QuantError::Size { tensor, found: 100, .. } if *tensor == key),
        "{err}"
    );

    let short = fx[&format!("{key}.nested_absmax")].narrow(0, 0, 1);
    let err = load("", Some((&format!("{key}.nested_absmax"), short)));
    assert!(
        err.to_string()
            .starts_with(&format!("{key}.nested_absmax:")),
        "{err}"
    );
}

#[test]
fn linear4bit_forward_and_input_gradient_match_bitsandbytes() {
    let fx = fixture();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = Quant4bitConfig {
        quant_type: QuantType::Nf4,
        nested: true,
    };
    let lin = with_4bit_linears(Some(cfg), || Linear::new(vs.root() / "proj", 128, 16, true));
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "proj.bias",
            "proj.weight",
            "proj.weight.absmax",
            "proj.weight.nested_absmax",
            "proj.weight.nested_offset",
            "proj.weight.nested_quant_map",
            "proj.weight.quant_map"
        ],
        "4-bit storage lives under transformers' keys"
    );
    let LinearWeight::Quant4bit(q) = &lin.weight else {
        panic!("Linear::new inside with_4bit_linears builds a 4-bit weight")
    };
    q.copy_from(&Packed4bit::quantize(&fx["input.fp32.16x128"], cfg).unwrap())
        .unwrap();
    tch::no_grad(|| {
        lin.bias
            .as_ref()
            .unwrap()
            .shallow_clone()
            .copy_(&fx["linear4bit.bias"])
    });

    let x = fx["linear4bit.x"].copy().set_requires_grad(true);
    let y = lin.forward_t(&x, true);
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert!(
        diff(&y, &fx["linear4bit.y"]) < 1e-6,
        "output differs by {}",
        diff(&y, &fx["linear4bit.y"])
    );
    (&y * Tensor::arange(16, (Kind::Float, tch::Device::Cpu)))
        .sum(Kind::Float)
        .backward();
    let gx = x.grad();
    assert!(
        diff(&gx, &fx["linear4bit.x_grad"]) < 1e-6,
        "input gradient differs by {}",
        diff(&gx, &fx["linear4bit.x_grad"])
    );
    assert!(
        !q.packed.requires_grad() && !q.state.absmax.requires_grad(),
        "the codes are frozen"
    );
    assert_eq!(lin.dense_weight(Kind::Float).size(), [16, 128]);
    assert_eq!((lin.in_features(), lin.out_features()), (128, 16));
}
