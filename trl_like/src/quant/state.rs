//! bitsandbytes' `QuantState` and its safetensors form (`QuantState.as_dict(packed=True)` /
//! `from_dict`), the keys transformers writes next to a 4-bit `*.weight`:
//! `.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map` and
//! `.quant_state.bitsandbytes__{nf4|fp4}` (a uint8 tensor holding a JSON object with the
//! non-tensor fields).

use super::{Packed4bit, QuantError, QuantType};
use tch::{Device, Kind, Tensor};

/// The absmax values of a nested (double-quantized) state.
#[derive(Debug)]
pub struct NestedAbsmax {
    /// fp32, one per `blocksize` first-level blocks.
    pub absmax: Tensor,
    /// fp32 `[256]`: the 8-bit dynamic map (`nested_quant_map`).
    pub code: Tensor,
    /// The mean subtracted from the first-level absmax before coding it: a 0-dim fp32
    /// tensor, so a model can allocate it and a loader fill it in place.
    pub offset: Tensor,
    pub blocksize: i64,
}

/// Everything needed to restore a 4-bit weight, as in `bitsandbytes.functional.QuantState`.
#[derive(Debug)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: i64,
    /// The weight's shape, `[out, in]` for a linear layer.
    pub shape: Vec<i64>,
    /// The dtype the weight had when it was quantized (what `dequantize_4bit` returns).
    pub dtype: Kind,
    /// fp32 per block, or uint8 codes of the nested quantization.
    pub absmax: Tensor,
    /// fp32 `[16]` (`quant_map`).
    pub code: Tensor,
    pub nested: Option<NestedAbsmax>,
}

impl QuantState {
    /// The fp32 absmax of every block; for a nested state
    /// `nested_code[q] * nested_absmax[i / 256] + offset`, two fp32 roundings as in
    /// bitsandbytes (`dequantize_blockwise`, then `absmax += offset`).
    pub fn absmax_f32(&self) -> Tensor {
        match &self.nested {
            None => self.absmax.shallow_clone(),
            Some(n) => {
                let vals = n.code.index_select(0, &self.absmax.to_kind(Kind::Int64));
                let blocks = vals.size()[0];
                let scale = n
                    .absmax
                    .repeat_interleave_self_int(n.blocksize, 0, None)
                    .narrow(0, 0, blocks);
                vals * scale + &n.offset
            }
        }
    }

    pub fn to_device(&self, device: Device) -> Self {
        Self {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            shape: self.shape.clone(),
            dtype: self.dtype,
            absmax: self.absmax.to_device(device),
            code: self.code.to_device(device),
            nested: self.nested.as_ref().map(|n| NestedAbsmax {
                absmax: n.absmax.to_device(device),
                code: n.code.to_device(device),
                offset: n.offset.to_device(device),
                blocksize: n.blocksize,
            }),
        }
    }
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

fn parse_dtype(name: &str) -> Option<Kind> {
    match name {
        "float32" => Some(Kind::Float),
        "bfloat16" => Some(Kind::BFloat16),
        "float16" => Some(Kind::Half),
        _ => None,
    }
}

/// Python's `json.dumps` spacing, so a saved state reads byte-for-byte like bitsandbytes'.
fn quant_state_json(st: &QuantState) -> String {
    let shape: Vec<String> = st.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        st.quant_type,
        st.blocksize,
        dtype_name(st.dtype),
        shape.join(", ")
    );
    if let Some(n) = &st.nested {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            n.blocksize,
            serde_json::Value::from(n.offset.double_value(&[]))
        ));
    }
    s.push('}');
    s
}

impl Packed4bit {
    /// The tensors transformers saves for this weight under `key` (e.g.
    /// `model.layers.0.self_attn.q_proj.weight`), moved to the CPU.
    pub fn state_dict(&self, key: &str) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(Device::Cpu);
        let st = &self.state;
        let mut out = vec![
            (key.to_string(), cpu(&self.packed)),
            (format!("{key}.absmax"), cpu(&st.absmax)),
            (format!("{key}.quant_map"), cpu(&st.code)),
        ];
        if let Some(n) = &st.nested {
            out.push((format!("{key}.nested_absmax"), cpu(&n.absmax)));
            out.push((format!("{key}.nested_quant_map"), cpu(&n.code)));
        }
        let json = quant_state_json(st);
        out.push((
            format!("{key}.quant_state.bitsandbytes__{}", st.quant_type),
            Tensor::from_slice(json.as_bytes()),
        ));
        out
    }

    /// Reads a weight saved by transformers + bitsandbytes (`QuantState.from_dict`): `take`
    /// returns (and removes) a tensor by its full key. Sizes are checked against the shape
    /// in the quant state so a corrupt file is refused naming the tensor.
    pub fn from_state_dict(
        key: &str,
        take: &mut dyn FnMut(&str) -> Option<Tensor>,
    ) -> Result<Self, QuantError> {
        let need = |take: &mut dyn FnMut(&str) -> Option<Tensor>, suffix: &str| {
            let name = if suffix.is_empty() {
                key.to_string()
            } else {
                format!("{key}.{suffix}")
            };
            take(&name).ok_or(QuantError::Missing { tensor: name })
        };
        let packed = need(take, "")?;
        let absmax = need(take, "absmax")?;
        let code = need(take, "quant_map")?;
        let (json_key, json) = match (
            take(&format!("{key}.quant_state.bitsandbytes__nf4")),
            take(&format!("{key}.quant_state.bitsandbytes__fp4")),
        ) {
            (Some(t), None) => (format!("{key}.quant_state.bitsandbytes__nf4"), t),
            (None, Some(t)) => (format!("{key}.quant_state.bitsandbytes__fp4"), t),
            (None, None) => {
                return Err(QuantError::Missing {
                    tensor: format!("{key}.quant_state.bitsandbytes__nf4"),
                })
            }
            (Some(_), Some(_)) => {
                return Err(QuantError::State {
                    tensor: key.to_string(),
                    reason: "both an nf4 and an fp4 quant_state are present".into(),
                })
            }
        };
        let bad = |reason: String| QuantError::State {
            tensor: json_key.clone(),
            reason,
        };
        let bytes = Vec::<u8>::try_from(&json.to_kind(Kind::Uint8).reshape([-1]))
            .map_err(|e| bad(e.to_string()))?;
        let fields: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| bad(format!("no `{name}` field")))
        };
        let quant_type = field("quant_type")?
            .as_str()
            .and_then(QuantType::parse)
            .ok_or_else(|| bad("quant_type must be \"nf4\" or \"fp4\"".into()))?;
        let blocksize = field("blocksize")?
            .as_i64()
            .filter(|b| [32, 64, 128, 256, 512, 1024, 2048, 4096].contains(b))
            .ok_or_else(|| bad("blocksize must be a power of two from 32 to 4096".into()))?;
        let dtype = field("dtype")?
            .as_str()
            .and_then(parse_dtype)
            .ok_or_else(|| bad("dtype must be float32, bfloat16 or float16".into()))?;
        let shape: Vec<i64> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_i64().filter(|d| *d > 0)).collect())
            .ok_or_else(|| bad("shape must be a list of positive integers".into()))?;
        let n: i64 = shape.iter().product();
        let blocks = (n + blocksize - 1) / blocksize;
        let size = |what: &'static str, t: &Tensor, expected: i64| {
            let found = t.numel() as i64;
            if found == expected {
                Ok(())
            } else {
                Err(QuantError::Size {
                    tensor: if what == "weight" {
                        key.to_string()
                    } else {
                        format!("{key}.{what}")
                    },
                    what,
                    found,
                    expected,
                    shape: shape.clone(),
                })
            }
        };
        // bnb_4bit_quant_storage other than uint8 stores the same bytes under another dtype.
        let packed = packed.contiguous().view_dtype(Kind::Uint8).reshape([-1, 1]);
        size("weight", &packed, (n + 1) / 2)?;
        size("quant_map", &code, 16)?;
        let code = code.to_kind(Kind::Float);
        let nested = if fields.get("nested_offset").is_some() {
            let nested_absmax = need(take, "nested_absmax")?;
            let nested_code = need(take, "nested_quant_map")?;
            let nested_blocksize = field("nested_blocksize")?
                .as_i64()
                .filter(|b| *b > 0)
                .ok_or_else(|| bad("nested_blocksize must be a positive integer".into()))?;
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| bad("nested_offset must be a number".into()))?;
            if absmax.kind() != Kind::Uint8 {
                return Err(QuantError::State {
                    tensor: format!("{key}.absmax"),
                    reason: format!(
                        "a nested state stores uint8 absmax codes, found {:?}",
                        absmax.kind()
                    ),
                });
            }
            size("absmax", &absmax, blocks)?;
            size(
                "nested_absmax",
                &nested_absmax,
                (blocks + nested_blocksize - 1) / nested_blocksize,
            )?;
            size("nested_quant_map", &nested_code, 256)?;
            Some(NestedAbsmax {
                absmax: nested_absmax.to_kind(Kind::Float),
                code: nested_code.to_kind(Kind::Float),
                offset: Tensor::from(offset as f32),
                blocksize: nested_blocksize,
            })
        } else {
            size("absmax", &absmax, blocks)?;
            None
        };
        let absmax = if nested.is_some() {
            absmax
        } else {
            absmax.to_kind(Kind::Float)
        };
        Ok(Self {
            packed,
            state: QuantState {
                quant_type,
                blocksize,
                shape,
                dtype,
                absmax,
                code,
                nested,
            },
        })
    }
}
