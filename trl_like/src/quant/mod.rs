//! 4-bit weights as bitsandbytes 0.50 stores them (`functional.quantize_4bit` /
//! `dequantize_4bit`, `QuantState`): what QLoRA freezes its base model into.
//!
//! A weight is cut into blocks of 64 values (row-major over the flattened tensor); each block
//! is divided by its absolute maximum and every value is replaced by the index of the nearest
//! NF4 or FP4 code value, two indices per byte, the first in the high nibble. With nested
//! ("double") quantization the fp32 absmax values are themselves quantized: their mean is
//! subtracted (the `offset`) and the rest is coded with the 8-bit dynamic map in blocks of
//! 256, leaving one fp32 absmax per 256 blocks.
//!
//! Every step repeats bitsandbytes' own arithmetic (the same torch ops for the 4-bit stage,
//! its CPU kernel's lookup table for the 8-bit stage), so codes and absmax values are equal
//! bit for bit and dequantized weights are identical (`tests/qlora_quant.rs`).

mod codebook;
mod state;

pub use codebook::{dynamic_map, QuantType};
pub use state::{NestedAbsmax, QuantState};

use tch::{Device, Kind, Tensor};

/// The block size transformers' `BitsAndBytesConfig` uses for 4-bit weights.
pub const BLOCKSIZE: i64 = 64;
/// The block size of the nested absmax quantization (fixed in bitsandbytes).
pub const NESTED_BLOCKSIZE: i64 = 256;

/// What can go wrong quantizing or reading a 4-bit weight. `tensor` is the checkpoint key.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(
        "{tensor}: 4-bit quantization takes float32, bfloat16 or float16 weights, not {kind:?}"
    )]
    Dtype { tensor: String, kind: Kind },
    #[error("{tensor}: missing from the checkpoint; a 4-bit weight needs it (the checkpoint is incomplete or was not saved by transformers with bitsandbytes)")]
    Missing { tensor: String },
    #[error("{tensor}: {what} has {found} elements, expected {expected} for a weight of shape {shape:?}; the checkpoint is corrupt")]
    Size {
        tensor: String,
        what: &'static str,
        found: i64,
        expected: i64,
        shape: Vec<i64>,
    },
    #[error("{tensor}: bad bitsandbytes quant state: {reason}")]
    State { tensor: String, reason: String },
}

/// How to quantize a model's linear weights: the 4-bit part of transformers'
/// `BitsAndBytesConfig` (blocksize 64, nested blocks of 256, as bitsandbytes fixes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quant4bitConfig {
    /// `bnb_4bit_quant_type`.
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant` (TRL's `--use_bnb_nested_quant`).
    pub nested: bool,
}

/// The tensors of one 4-bit weight by key suffix (appended to the weight's key with a dot;
/// "" is the packed weight itself), as transformers names them, plus `nested_offset`, which
/// transformers keeps in the JSON quant state.
pub const STATE_SUFFIXES: [&str; 6] = [
    "",
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "nested_offset",
];

/// Whether `name` is a 4-bit weight's state tensor (`….weight.absmax`, …), not a parameter.
pub fn is_state_key(name: &str) -> bool {
    STATE_SUFFIXES[1..].iter().any(|s| {
        name.strip_suffix(s)
            .is_some_and(|rest| rest.ends_with(".weight."))
    })
}

/// A 4-bit weight: packed codes plus everything needed to restore it.
#[derive(Debug)]
pub struct Packed4bit {
    /// `[ceil(numel / 2), 1]` uint8, two codes a byte, high nibble first.
    pub packed: Tensor,
    pub state: QuantState,
}

impl Packed4bit {
    /// `bitsandbytes.functional.quantize_4bit(w, blocksize=64, compress_statistics=nested,
    /// quant_type=...)`. The result lives on `w`'s device.
    pub fn quantize(w: &Tensor, cfg: Quant4bitConfig) -> Result<Self, QuantError> {
        let Quant4bitConfig { quant_type, nested } = cfg;
        let dtype = w.kind();
        if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(QuantError::Dtype {
                tensor: String::new(),
                kind: dtype,
            });
        }
        let shape = w.size();
        let device = w.device();
        let (packed, absmax) = tch::no_grad(|| quantize_codes(w, quant_type, BLOCKSIZE));
        let (absmax, nested) = if nested {
            let (q, n) = tch::no_grad(|| nest_absmax(&absmax));
            (q, Some(n))
        } else {
            (absmax, None)
        };
        let state = QuantState {
            quant_type,
            blocksize: BLOCKSIZE,
            shape,
            dtype,
            absmax,
            code: quant_type.code().to_device(device),
            nested,
        };
        Ok(Self { packed, state })
    }

    /// `dequantize_4bit(packed, state)` converted to `kind` (bitsandbytes computes in fp32 and
    /// rounds once to the output dtype, as here).
    ///
    /// # Shapes
    /// → `state.shape` in `kind`, on the packed tensor's device.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let st = &self.state;
            let n: i64 = st.shape.iter().product();
            let code = st.quant_type.code().to_device(self.packed.device());
            // One lookup per byte: row b holds the values of its high and low nibble.
            let byte = Tensor::arange(256, (Kind::Int64, self.packed.device()));
            let pairs = Tensor::stack(
                &[
                    code.index_select(0, &byte.bitwise_right_shift_tensor_scalar(4)),
                    code.index_select(0, &byte.bitwise_and(15)),
                ],
                1,
            );
            let vals = pairs
                .index_select(0, &self.packed.reshape([-1]).to_kind(Kind::Int))
                .reshape([-1]);
            let absmax = st.absmax_f32();
            let blocks = absmax.size()[0];
            let padded = blocks * st.blocksize;
            let have = vals.size()[0];
            let vals = if have >= padded {
                vals.narrow(0, 0, padded)
            } else {
                vals.constant_pad_nd([0, padded - have])
            };
            (vals.view([blocks, st.blocksize]) * absmax.view([blocks, 1]))
                .reshape([-1])
                .narrow(0, 0, n)
                .to_kind(kind)
                .reshape(st.shape.as_slice())
        })
    }

    /// Zero-filled storage for a weight of `shape` (`dtype` being the dtype it is quantized
    /// from), to be filled by [`copy_from`](Self::copy_from): a model allocates its 4-bit
    /// layers this way and never holds the dense weights.
    pub fn empty(shape: &[i64], cfg: Quant4bitConfig, dtype: Kind, device: Device) -> Self {
        let n: i64 = shape.iter().product();
        let blocks = (n + BLOCKSIZE - 1) / BLOCKSIZE;
        let nested = cfg.nested.then(|| NestedAbsmax {
            absmax: Tensor::zeros(
                [(blocks + NESTED_BLOCKSIZE - 1) / NESTED_BLOCKSIZE],
                (Kind::Float, device),
            ),
            code: Tensor::from_slice(dynamic_map().as_slice()).to_device(device),
            offset: Tensor::zeros([], (Kind::Float, device)),
            blocksize: NESTED_BLOCKSIZE,
        });
        let absmax_kind = if cfg.nested { Kind::Uint8 } else { Kind::Float };
        Self {
            packed: Tensor::zeros([(n + 1) / 2, 1], (Kind::Uint8, device)),
            state: QuantState {
                quant_type: cfg.quant_type,
                blocksize: BLOCKSIZE,
                shape: shape.to_vec(),
                dtype,
                absmax: Tensor::zeros([blocks], (absmax_kind, device)),
                code: cfg.quant_type.code().to_device(device),
                nested,
            },
        }
    }

    /// The tensors of this weight by [`STATE_SUFFIXES`] entry (absent nested ones skipped).
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let st = &self.state;
        let mut out = vec![
            ("", &self.packed),
            ("absmax", &st.absmax),
            ("quant_map", &st.code),
        ];
        if let Some(n) = &st.nested {
            out.push(("nested_absmax", &n.absmax));
            out.push(("nested_quant_map", &n.code));
            out.push(("nested_offset", &n.offset));
        }
        out
    }

    /// The configuration this weight was quantized with.
    pub fn config(&self) -> Quant4bitConfig {
        Quant4bitConfig {
            quant_type: self.state.quant_type,
            nested: self.state.nested.is_some(),
        }
    }

    /// Overwrites this weight's tensors in place with `src`'s (same shape and configuration:
    /// a model's storage filled from a checkpoint or a fresh quantization).
    pub fn copy_from(&self, src: &Packed4bit) -> Result<(), tch::TchError> {
        for ((_, dst), (_, src)) in self.tensors().into_iter().zip(src.tensors()) {
            dst.shallow_clone().f_copy_(src)?;
        }
        Ok(())
    }

    /// Moves codes and state to `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            packed: self.packed.to_device(device),
            state: self.state.to_device(device),
        }
    }

    /// Bytes held by the packed codes and the quantization state.
    pub fn nbytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let mut total = bytes(&self.packed) + bytes(&self.state.absmax) + bytes(&self.state.code);
        if let Some(n) = &self.state.nested {
            total += bytes(&n.absmax) + bytes(&n.code);
        }
        total
    }
}

/// The 4-bit stage, op for op as bitsandbytes' default `quantize_4bit` kernel (the one its
/// CPU backend runs): returns the packed codes and the fp32 absmax of each block.
fn quantize_codes(w: &Tensor, quant_type: QuantType, bs: i64) -> (Tensor, Tensor) {
    let device = w.device();
    let a = w.to_kind(Kind::Float).reshape([-1]);
    let n = a.size()[0];
    let rem = n % bs;
    let full = n - rem;
    let a_com = a.narrow(0, 0, full).reshape([full / bs, bs]);
    let mut absmax = a_com.abs().max_dim(-1, false).0;
    // `x * (1 / absmax)`, not `x / absmax`: the two round differently.
    let inv = absmax.clamp_min(1e-38).reciprocal().view([-1, 1]);
    let mut scaled = (&a_com * inv).clamp(-1.0, 1.0).reshape([-1]);
    if rem > 0 {
        // The partial last block divides, and keeps its clamped absmax.
        let tail = a.narrow(0, full, rem);
        let am = tail.abs().max().clamp_min(1e-38);
        scaled = Tensor::cat(&[scaled, (&tail / &am).clamp(-1.0, 1.0)], 0);
        absmax = Tensor::cat(&[absmax, am.unsqueeze(0)], 0);
    }
    if scaled.size()[0] % 2 == 1 {
        scaled = scaled.constant_pad_nd([0, 1]);
    }
    let (bounds, order) = quant_type.bounds();
    let mut q = scaled
        .bucketize(&bounds.to_device(device), true, false)
        .to_kind(Kind::Int64);
    if quant_type == QuantType::Fp4 {
        q = order.to_device(device).index_select(0, &q);
    }
    let hi = q.slice(0, 0, None, 2);
    let lo = q.slice(0, 1, None, 2);
    let packed = (hi * 16 + lo).to_kind(Kind::Uint8).unsqueeze(1);
    (packed, absmax)
}

/// The nested stage: `offset = absmax.mean()`, then bitsandbytes' CPU 8-bit blockwise
/// quantization of `absmax - offset` with the dynamic map, blocks of 256.
fn nest_absmax(absmax: &Tensor) -> (Tensor, NestedAbsmax) {
    let device = absmax.device();
    let offset = absmax.mean(Kind::Float);
    let centred = Vec::<f32>::try_from(&(absmax - &offset).to_device(Device::Cpu))
        .expect("an fp32 vector converts");
    let code = dynamic_map();
    let (q, absmax2) = quantize_blockwise_8bit(&centred, code, NESTED_BLOCKSIZE as usize);
    let nested = NestedAbsmax {
        absmax: Tensor::from_slice(&absmax2).to_device(device),
        code: Tensor::from_slice(code.as_slice()).to_device(device),
        offset,
        blocksize: NESTED_BLOCKSIZE,
    };
    (Tensor::from_slice(&q).to_device(device), nested)
}

/// bitsandbytes 0.50's `quantize_cpu_impl` for fp32: per block the absmax, then each value
/// times `1 / absmax` through the 65,536-entry lookup table. An all-zero block codes to 0.
fn quantize_blockwise_8bit(x: &[f32], code: &[f32; 256], bs: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = codebook::quantize_lut(code);
    let mut out = vec![0u8; x.len()];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(bs));
    for (block, q) in x.chunks(bs).zip(out.chunks_mut(bs)) {
        let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        if a == 0.0 {
            continue;
        }
        let inv = 1.0 / a;
        for (v, q) in block.iter().zip(q.iter_mut()) {
            *q = lut[codebook::lut_index(v * inv)];
        }
    }
    (out, absmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_is_sorted_and_spans_minus_one_to_one() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(m[255], 1.0);
        assert!((m[0] + 0.993).abs() < 1e-3, "{}", m[0]);
    }

    #[test]
    fn round_trip_error_is_within_half_a_code_step() {
        let w = Tensor::randn([8, 128], (Kind::Float, Device::Cpu)) * 0.02;
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for nested in [false, true] {
                let p = Packed4bit::quantize(
                    &w,
                    Quant4bitConfig {
                        quant_type: qt,
                        nested,
                    },
                )
                .unwrap();
                assert_eq!(p.packed.size(), [512, 1]);
                let back = p.dequantize(Kind::Float);
                let rel = ((&back - &w).abs().max() / w.abs().max()).double_value(&[]);
                // The widest gap of either code book is 1/3 (FP4 between 2/3 and 1).
                assert!(rel < 0.17 + 1e-3, "{qt} nested={nested}: {rel}");
            }
        }
    }

    #[test]
    fn integer_weights_are_refused() {
        let w = Tensor::zeros([4, 64], (Kind::Int64, Device::Cpu));
        assert!(matches!(
            Packed4bit::quantize(
                &w,
                Quant4bitConfig {
                    quant_type: QuantType::Nf4,
                    nested: false
                }
            ),
            Err(QuantError::Dtype { .. })
        ));
    }
}
