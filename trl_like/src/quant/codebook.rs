//! The code books of bitsandbytes 0.50: NF4 and FP4 (`functional.get_4bit_type`) for the
//! weights, and the signed 8-bit "dynamic" map (`functional.create_dynamic_map`) for the
//! nested quantization of the absmax values.
//!
//! Built with the same torch ops in the same order as the Python, so every entry has the
//! same fp32 bits.

use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// bitsandbytes' two 4-bit data types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// NormalFloat4: quantiles of N(0, 1), sorted (QLoRA, arXiv 2305.14314).
    Nf4,
    /// 1 sign, 2 exponent and 1 mantissa bit, listed in bit-pattern order.
    Fp4,
}

impl QuantType {
    /// The name transformers and bitsandbytes use (`bnb_4bit_quant_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses `nf4` / `fp4`; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// The 16 code values (`get_4bit_type`), fp32 on the CPU, indexed by the 4-bit code.
    pub fn code(self) -> Tensor {
        let data: &[f32] = match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        };
        let t = Tensor::from_slice(data);
        // get_4bit_type divides by the largest magnitude (12 for FP4, 1 for NF4) in fp32.
        let max = t.abs().max();
        t / max
    }

    /// `(midpoints, order)` of bitsandbytes' `_get_4bit_quantize_bounds`: the decision
    /// boundaries between neighbouring sorted code values and the code index of each sorted
    /// position. The same `argsort` call keeps FP4's ±0 tie resolved as bitsandbytes does.
    pub(crate) fn bounds(self) -> (Tensor, Tensor) {
        let code = self.code();
        let order = code.argsort(-1, false);
        let sorted = code.index_select(0, &order);
        let n = sorted.size()[0];
        let mid = (sorted.narrow(0, 0, n - 1) + sorted.narrow(0, 1, n - 1)) / 2.0;
        (mid, order)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `get_4bit_type("nf4")`: `create_normal_map(offset=0.9677083)`, as bitsandbytes hard-codes it.
// The decimal strings bitsandbytes writes; each names one f32 exactly.
#[allow(clippy::excessive_precision)]
const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// `get_4bit_type("fp4")` before normalisation by 12. Code 8 is +0: the Python list spells
/// it `-0`, an integer, so the tensor holds +0.0 (bitsandbytes' AVX512 dequantizer agrees;
/// its scalar CPU fallback returns -0.0 there, which no product or sum can tell apart).
const FP4: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256 sorted fp32
/// values in [-0.993, 1], the code of the nested absmax quantization.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let max_exponent_bits = 7i32;
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for i in 0..max_exponent_bits {
            // signed: 2^(i + 7 - 7) + 1 boundaries, their means scaled by 10^(i - 6).
            let items = (1i64 << i) + 1;
            let b = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
            let means = (b.narrow(0, 0, items - 1) + b.narrow(0, 1, items - 1)) / 2.0;
            let scale = 10f64.powi(-(max_exponent_bits - 1) + i);
            for t in [&means * scale, &means * -scale] {
                data.extend(Vec::<f32>::try_from(&t).unwrap_or_default());
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(f32::total_cmp);
        let mut out = [0f32; 256];
        out.copy_from_slice(&data);
        out
    })
}

/// bitsandbytes' CPU `build_quantize_lut`: the code index nearest to each of 65,536 evenly
/// spaced values in [-1, 1] (ties to the lower index). Its 8-bit CPU quantizer rounds a
/// normalised value onto this grid first, then reads the index from the table, which is
/// not always the exactly nearest code value: matching it needs the same table.
pub(crate) fn quantize_lut(code: &[f32; 256]) -> Box<[u8; 65536]> {
    let mut mid = [0f32; 255];
    for (i, m) in mid.iter_mut().enumerate() {
        *m = 0.5 * (code[i] + code[i + 1]);
    }
    let mut lut = Box::new([0u8; 65536]);
    let mut idx = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
        while idx < 255 && mid[idx] < val {
            idx += 1;
        }
        *slot = idx as u8;
    }
    lut
}

/// The grid index of bitsandbytes' `norm_to_lut_index`: clamp, shift to [0, 1], scale,
/// round half up by truncation (separate f32 roundings; Rust never fuses them).
pub(crate) fn lut_index(val: f32) -> usize {
    let v = val.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5 * 65535.0 + 0.5) as u16 as usize
}
