//! TensorBoard event files written by hand: TFRecord framing around
//! protobuf-encoded `tensorboard.Event` messages, the same bytes PyTorch's
//! `torch.utils.tensorboard.SummaryWriter` produces for `add_scalar` and
//! `add_text`.
//!
//! Field numbers are from tensorboard's `compat/proto` (`event.proto`,
//! `summary.proto`, `tensor.proto`, `tensor_shape.proto`, `types.proto`):
//!
//! ```text
//! Event        { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary      { repeated Value value = 1; }
//! Value        { string tag = 1; float simple_value = 2; TensorProto tensor = 8; SummaryMetadata metadata = 9; }
//! SummaryMetadata { PluginData plugin_data = 1; }   PluginData { string plugin_name = 1; bytes content = 2; }
//! TensorProto  { DataType dtype = 1; TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8; }
//! TensorShapeProto { repeated Dim dim = 2; }        Dim { int64 size = 1; }
//! DataType     DT_STRING = 7
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{tensorboard_tag, Tracker};

/// Writes one TensorBoard event file, like `SummaryWriter(log_dir)`.
///
/// [`Tracker::log_scalars`] renames keys as transformers' `TensorBoardCallback`
/// does ([`super::tensorboard_tag`]: `loss` → `train/loss`, `eval_loss` →
/// `eval/loss`); [`TensorBoardTracker::add_scalars`] and
/// [`TensorBoardTracker::add_text`] take tags as given. Every call is flushed
/// to the OS at once (transformers flushes after each `on_log` too), so a
/// TensorBoard watching the directory sees a run as it trains.
pub struct TensorBoardTracker {
    path: PathBuf,
    out: BufWriter<File>,
}

/// Makes file names unique within the process, like tensorboard's `_global_uid`.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TensorBoardTracker {
    /// Creates `logging_dir` (and parents) and a new event file in it named as
    /// TensorBoard's own writer names them:
    /// `events.out.tfevents.<unix seconds>.<hostname>.<pid>.<counter>`.
    /// The file starts with the `brain.Event:2` version record.
    pub fn new(logging_dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(logging_dir)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!(
            "events.out.tfevents.{now:010}.{}.{}.{}",
            hostname(),
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = logging_dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut tracker = TensorBoardTracker {
            path,
            out: BufWriter::new(file),
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        tracker.write_record(&event)?;
        tracker.out.flush()?;
        Ok(tracker)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes scalars under the given tags at `step`, in one event (as
    /// `simple_value`, a 32-bit float, like `SummaryWriter.add_scalar`).
    pub fn add_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> io::Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            put_bytes(&mut v, 1, tag.as_bytes());
            put_float(&mut v, 2, *value as f32);
            put_bytes(&mut summary, 1, &v);
        }
        self.write_summary(step, &summary)
    }

    /// Writes text the way `SummaryWriter.add_text(tag, text, step)` does: the
    /// tag gets `/text_summary` appended, and the value is a one-element
    /// `DT_STRING` tensor marked for TensorBoard's `text` plugin (which
    /// renders it as Markdown).
    pub fn add_text(&mut self, step: u64, tag: &str, text: &str) -> io::Result<()> {
        // PluginData { plugin_name: "text" }; `content` would be TextPluginData{version: 0},
        // which serialises to zero bytes, so it is left out (as protobuf itself does).
        let mut plugin_data = Vec::new();
        put_bytes(&mut plugin_data, 1, b"text");
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, 1, &plugin_data);

        let mut dim = Vec::new();
        put_varint_field(&mut dim, 1, 1);
        let mut shape = Vec::new();
        put_bytes(&mut shape, 2, &dim);
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, 1, DT_STRING);
        put_bytes(&mut tensor, 2, &shape);
        put_bytes(&mut tensor, 8, text.as_bytes());

        let mut value = Vec::new();
        put_bytes(&mut value, 1, format!("{tag}/text_summary").as_bytes());
        put_bytes(&mut value, 8, &tensor);
        put_bytes(&mut value, 9, &metadata);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &value);
        self.write_summary(step, &summary)
    }

    fn write_summary(&mut self, step: u64, summary: &[u8]) -> io::Result<()> {
        let mut event = Vec::with_capacity(summary.len() + 24);
        put_double(&mut event, 1, wall_time());
        // int64 on the wire; steps beyond i64::MAX do not occur in practice.
        put_varint_field(&mut event, 2, step.min(i64::MAX as u64));
        put_bytes(&mut event, 5, summary);
        self.write_record(&event)?;
        self.out.flush()
    }

    /// TFRecord framing: length (u64 LE), masked CRC32C of the length bytes,
    /// the data, masked CRC32C of the data.
    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc32c(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc32c(data).to_le_bytes())
    }
}

impl Tracker for TensorBoardTracker {
    fn log_scalars(&mut self, step: u64, logs: &[(String, f64)]) -> io::Result<()> {
        let tags: Vec<String> = logs.iter().map(|(k, _)| tensorboard_tag(k)).collect();
        let scalars: Vec<(&str, f64)> = tags
            .iter()
            .map(String::as_str)
            .zip(logs.iter().map(|(_, v)| *v))
            .collect();
        self.add_scalars(step, &scalars)
    }

    fn log_text(&mut self, step: u64, tag: &str, text: &str) -> io::Result<()> {
        self.add_text(step, tag, text)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

const DT_STRING: u64 = 7;

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The machine's name, as Python's `socket.gethostname()` gives it for
/// transformers' `runs/<date>_<hostname>` and TensorBoard's file names.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // A file name component: no separators.
    let name: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

// ---- protobuf encoding (only the wire types the Event messages need) ----

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_key(buf, field, 0);
    put_varint(buf, v);
}

fn put_double(buf: &mut Vec<u8>, field: u32, v: f64) {
    put_key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_float(buf: &mut Vec<u8>, field: u32, v: f32) {
    put_key(buf, field, 5);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

// ---- CRC32C (Castagnoli), as TFRecord uses it ----

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            // 0x82F63B78 is the Castagnoli polynomial 0x1EDC6F41, bit-reversed.
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's checksum: CRC32C rotated right by 15 bits plus `0xa282ead8`
/// (so that a CRC over data that contains CRCs stays well distributed).
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C (RFC 3720 appendix, "123456789").
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    #[allow(clippy::manual_rotate)] // spelled as TensorFlow's crc32c.h writes it
    fn mask_matches_tensorflow_formula() {
        let crc = crc32c(b"abc");
        assert_eq!(
            masked_crc32c(b"abc"),
            ((crc >> 15) | (crc << 17)).wrapping_add(0xa282ead8)
        );
    }

    #[test]
    fn varints() {
        let mut b = Vec::new();
        put_varint(&mut b, 300);
        assert_eq!(b, [0xAC, 0x02]);
    }
}
