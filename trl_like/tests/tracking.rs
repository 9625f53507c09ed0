//! Experiment tracking outputs: TensorBoard event files checked by an
//! independent reader here (TFRecord framing, both CRCs, protobuf fields) and,
//! where the `tensorboard` Python package is installed, by TensorBoard's own
//! loader (`scripts/check_tensorboard.py`); `metrics.jsonl`; `make_trackers`;
//! and the training-curve plots.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use trl_like::tracking::{
    make_trackers, plot_training_curves, tensorboard_tag, JsonlTracker, TensorBoardTracker,
    Tracker, TrackingError,
};

/// A fresh, empty directory under cargo's per-test scratch space.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("tracking")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn logs(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

// ------------------------------------------------------------------ an independent event-file reader

/// CRC-32C, bit by bit (the library uses a table; agreeing is the point).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc ^ 0xFFFF_FFFF
}

#[allow(clippy::manual_rotate)] // spelled as the TFRecord format describes it
fn masked(crc: u32) -> u32 {
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// Splits a TFRecord file into records, checking both CRCs of each.
fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        assert!(bytes.len() - pos >= 12, "truncated record header at {pos}");
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(
            len_crc,
            masked(crc32c(len_bytes)),
            "length CRC of the record at {pos}"
        );
        let data = &bytes[pos + 12..pos + 12 + len];
        let data_crc =
            u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        assert_eq!(
            data_crc,
            masked(crc32c(data)),
            "data CRC of the record at {pos}"
        );
        records.push(data.to_vec());
        pos += 16 + len;
    }
    records
}

#[derive(Debug, Clone)]
enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

/// Decodes one protobuf message into (field number, value) pairs.
fn decode(mut buf: &[u8]) -> Vec<(u32, Field)> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = buf[0];
            *buf = &buf[1..];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return v;
            }
        }
        panic!("varint too long");
    }
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let (number, wire) = ((key >> 3) as u32, key & 7);
        let value = match wire {
            0 => Field::Varint(varint(&mut buf)),
            1 => {
                let v = buf[..8].try_into().unwrap();
                buf = &buf[8..];
                Field::Fixed64(v)
            }
            2 => {
                let len = varint(&mut buf) as usize;
                let v = buf[..len].to_vec();
                buf = &buf[len..];
                Field::Bytes(v)
            }
            5 => {
                let v = buf[..4].try_into().unwrap();
                buf = &buf[4..];
                Field::Fixed32(v)
            }
            w => panic!("unexpected wire type {w} for field {number}"),
        };
        fields.push((number, value));
    }
    fields
}

fn get(fields: &[(u32, Field)], number: u32) -> Option<&Field> {
    fields.iter().find(|(n, _)| *n == number).map(|(_, f)| f)
}

fn bytes(fields: &[(u32, Field)], number: u32) -> Vec<u8> {
    match get(fields, number) {
        Some(Field::Bytes(b)) => b.clone(),
        other => panic!("field {number}: expected bytes, got {other:?}"),
    }
}

fn all_bytes(fields: &[(u32, Field)], number: u32) -> Vec<Vec<u8>> {
    fields
        .iter()
        .filter(|(n, _)| *n == number)
        .map(|(_, f)| match f {
            Field::Bytes(b) => b.clone(),
            other => panic!("field {number}: expected bytes, got {other:?}"),
        })
        .collect()
}

#[derive(Debug, Default)]
struct EventFile {
    file_version: String,
    /// tag → [(step, value)]
    scalars: BTreeMap<String, Vec<(u64, f32)>>,
    /// tag → [(step, text, plugin name)]
    texts: BTreeMap<String, Vec<(u64, String, String)>>,
}

/// Reads an event file the way TensorBoard's loader does, field by field
/// (Event / Summary / Value / TensorProto numbers from tensorboard's protos).
fn read_event_file(path: &Path) -> EventFile {
    let data = std::fs::read(path).unwrap();
    let mut out = EventFile::default();
    for (i, record) in read_records(&data).iter().enumerate() {
        let event = decode(record);
        let Some(Field::Fixed64(wall)) = get(&event, 1) else {
            panic!("event {i} has no wall_time")
        };
        let wall_time = f64::from_le_bytes(*wall);
        assert!(
            wall_time > 1.6e9,
            "wall_time {wall_time} is seconds since 1970"
        );
        if i == 0 {
            out.file_version = String::from_utf8(bytes(&event, 3)).unwrap();
            assert!(
                get(&event, 5).is_none(),
                "the version event carries no summary"
            );
            continue;
        }
        let step = match get(&event, 2) {
            Some(Field::Varint(s)) => *s,
            None => 0, // proto3 leaves out a zero step
            other => panic!("step: {other:?}"),
        };
        let summary = decode(&bytes(&event, 5));
        for value in all_bytes(&summary, 1) {
            let value = decode(&value);
            let tag = String::from_utf8(bytes(&value, 1)).unwrap();
            if let Some(Field::Fixed32(v)) = get(&value, 2) {
                out.scalars
                    .entry(tag)
                    .or_default()
                    .push((step, f32::from_le_bytes(*v)));
                continue;
            }
            let metadata = decode(&bytes(&value, 9));
            let plugin = decode(&bytes(&metadata, 1));
            let plugin_name = String::from_utf8(bytes(&plugin, 1)).unwrap();
            let tensor = decode(&bytes(&value, 8));
            assert!(
                matches!(get(&tensor, 1), Some(Field::Varint(7))),
                "dtype DT_STRING"
            );
            let shape = decode(&bytes(&tensor, 2));
            let dims = all_bytes(&shape, 2);
            assert_eq!(dims.len(), 1, "a rank-1 tensor");
            assert!(
                matches!(get(&decode(&dims[0]), 1), Some(Field::Varint(1))),
                "of one element"
            );
            let strings = all_bytes(&tensor, 8);
            assert_eq!(strings.len(), 1);
            let text = String::from_utf8(strings[0].clone()).unwrap();
            out.texts
                .entry(tag)
                .or_default()
                .push((step, text, plugin_name));
        }
    }
    out
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    files.sort();
    files
}

// ------------------------------------------------------------------ TensorBoard

const ANSWER: &str = "### 问：你是谁？\n答：我是 GLM-4 的微调模型。 <tags> & \"quotes\"";

/// What a short run logs: two training logs, an evaluation, a generated answer.
fn write_demo_run(tb: &mut dyn Tracker) {
    tb.log_scalars(
        10,
        &logs(&[
            ("loss", 2.5),
            ("grad_norm", 1.25),
            ("learning_rate", 5e-4),
            ("epoch", 0.1),
        ]),
    )
    .unwrap();
    tb.log_scalars(
        20,
        &logs(&[
            ("loss", 1.75),
            ("grad_norm", 0.5),
            ("learning_rate", 4.5e-4),
            ("epoch", 0.2),
        ]),
    )
    .unwrap();
    tb.log_scalars(
        20,
        &logs(&[("eval_loss", 1.8125), ("eval_runtime", 3.5), ("epoch", 0.2)]),
    )
    .unwrap();
    tb.log_text(20, "predictions", ANSWER).unwrap();
    tb.flush().unwrap();
}

fn expected_scalars() -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut m: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for (tag, step, v) in [
        ("train/loss", 10, 2.5),
        ("train/grad_norm", 10, 1.25),
        ("train/learning_rate", 10, 5e-4),
        ("train/epoch", 10, 0.1),
        ("train/loss", 20, 1.75),
        ("train/grad_norm", 20, 0.5),
        ("train/learning_rate", 20, 4.5e-4),
        ("train/epoch", 20, 0.2),
        ("eval/loss", 20, 1.8125),
        ("eval/runtime", 20, 3.5),
        ("train/epoch", 20, 0.2),
    ] {
        m.entry(tag.to_string()).or_default().push((step, v as f32));
    }
    m
}

#[test]
fn tensorboard_events_round_trip() {
    let dir = scratch("tb_round_trip");
    let mut tb = TensorBoardTracker::new(&dir).unwrap();
    let path = tb.path().to_path_buf();
    write_demo_run(&mut tb);
    drop(tb);

    // One file, named like TensorBoard's own: events.out.tfevents.<secs>.<host>.<pid>.<n>
    let files = event_files(&dir);
    assert_eq!(files, std::slice::from_ref(&path));
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let parts: Vec<&str> = name
        .trim_start_matches("events.out.tfevents.")
        .splitn(2, '.')
        .collect();
    assert_eq!(parts[0].len(), 10, "ten-digit unix time in {name}");
    assert!(parts[0].parse::<u64>().unwrap() > 1_600_000_000);

    let events = read_event_file(&path);
    assert_eq!(events.file_version, "brain.Event:2");
    assert_eq!(events.scalars, expected_scalars());
    let texts = &events.texts["predictions/text_summary"];
    assert_eq!(texts, &[(20, ANSWER.to_string(), "text".to_string())]);
    assert_eq!(events.texts.len(), 1);
}

#[test]
fn tensorboard_tags_are_transformers_names() {
    for (key, tag) in [
        ("loss", "train/loss"),
        ("learning_rate", "train/learning_rate"),
        ("grad_norm", "train/grad_norm"),
        ("mean_token_accuracy", "train/mean_token_accuracy"),
        ("eval_loss", "eval/loss"),
        ("eval_mean_token_accuracy", "eval/mean_token_accuracy"),
        ("test_loss", "test/loss"),
        ("epoch", "train/epoch"),
    ] {
        assert_eq!(tensorboard_tag(key), tag);
    }
}

/// The Python interpreter of the workspace's virtual environment, if it has `tensorboard`.
fn python_with_tensorboard() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import tensorboard"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

#[test]
fn tensorboard_reads_our_event_files() {
    let Some(python) = python_with_tensorboard() else {
        eprintln!(
            "SKIP tensorboard_reads_our_event_files: .venv/bin/python cannot import tensorboard \
             (install it with `.venv/bin/pip install tensorboard` to run this check)"
        );
        return;
    };
    let dir = scratch("tb_python");
    let mut tb = TensorBoardTracker::new(&dir).unwrap();
    write_demo_run(&mut tb);
    drop(tb);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_tensorboard.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check_tensorboard.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(seen["file_version"], json!(2.0));
    // Every scalar is on TensorBoard's Scalars dashboard with our steps and (f32) values.
    let mut scalars: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for (tag, points) in seen["scalars"].as_object().unwrap() {
        for p in points.as_array().unwrap() {
            scalars
                .entry(tag.clone())
                .or_default()
                .push((p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32));
        }
    }
    assert_eq!(scalars, expected_scalars());
    // And the text is on its Text dashboard.
    assert_eq!(
        seen["texts"],
        json!({"predictions/text_summary": [[20, ANSWER]]})
    );
}

// ------------------------------------------------------------------ jsonl

#[test]
fn jsonl_lines_parse_back() {
    let dir = scratch("jsonl");
    {
        let mut j = JsonlTracker::new(&dir).unwrap();
        assert_eq!(j.path(), dir.join("metrics.jsonl"));
        write_demo_run(&mut j);
        j.log_scalars(30, &logs(&[("loss", f64::NAN), ("step", 99.0)]))
            .unwrap();
    }
    // A second tracker (a resumed run) appends.
    JsonlTracker::new(&dir)
        .unwrap()
        .log_scalars(40, &logs(&[("loss", 1.5)]))
        .unwrap();

    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            json!({"step": 10, "loss": 2.5, "grad_norm": 1.25, "learning_rate": 5e-4, "epoch": 0.1}),
            json!({"step": 20, "loss": 1.75, "grad_norm": 0.5, "learning_rate": 4.5e-4, "epoch": 0.2}),
            json!({"step": 20, "eval_loss": 1.8125, "eval_runtime": 3.5, "epoch": 0.2}),
            json!({"step": 20, "tag": "predictions", "text": ANSWER}),
            json!({"step": 30, "loss": null}),
            json!({"step": 40, "loss": 1.5}),
        ]
    );
    // Keys keep the order they were logged in, step first.
    assert!(text
        .lines()
        .next()
        .unwrap()
        .starts_with(r#"{"step":10,"loss":2.5,"grad_norm""#));
}

// ------------------------------------------------------------------ make_trackers

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn make_trackers_none_and_empty_give_nothing() {
    let dir = scratch("make_none");
    assert!(make_trackers(&names(&["none"]), &dir, "run")
        .unwrap()
        .is_empty());
    assert!(make_trackers(&[], &dir, "run").unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn make_trackers_builds_named_integrations() {
    let dir = scratch("make_all");
    let mut trackers = make_trackers(&names(&["all"]), &dir, "glm4-lora").unwrap();
    assert_eq!(trackers.len(), 2);
    for t in &mut trackers {
        t.log_scalars(5, &logs(&[("loss", 1.0)])).unwrap();
        t.flush().unwrap();
    }
    drop(trackers);
    let files = event_files(&dir);
    assert_eq!(files.len(), 1);
    let events = read_event_file(&files[0]);
    assert_eq!(events.texts["run_name/text_summary"][0].1, "glm4-lora");
    assert_eq!(events.scalars["train/loss"], [(5, 1.0)]);
    let jsonl = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 2, "run name + one log:\n{jsonl}");

    // Case-insensitive, duplicates collapse.
    let dir = scratch("make_tb");
    let trackers = make_trackers(
        &names(&["TensorBoard", "tensorboard", "jsonl", "all"]),
        &dir,
        "",
    )
    .unwrap();
    assert_eq!(trackers.len(), 2);
}

#[test]
fn make_trackers_explains_unknown_integrations() {
    let dir = scratch("make_unknown");
    for name in ["swanlab", "wandb"] {
        let err = make_trackers(&names(&["tensorboard", name]), &dir, "run")
            .err()
            .expect("an error");
        assert!(matches!(err, TrackingError::UnknownIntegration { .. }));
        let msg = err.to_string();
        eprintln!("{msg}");
        let import = format!(
            "swanlab convert -t tensorboard --tb-log-dir {}",
            dir.display()
        );
        for needle in [
            name,
            "\"tensorboard\"",
            "\"jsonl\"",
            "\"all\"",
            "\"none\"",
            &import,
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
    }
    assert!(event_files(&dir).is_empty(), "no files for a rejected list");
    assert!(matches!(
        make_trackers(&names(&["none", "jsonl"]), &dir, "").err(),
        Some(TrackingError::NoneWithOthers(_))
    ));
}

// ------------------------------------------------------------------ plots

/// A plausible SFT run: warmup then linear decay, loss falling with noise, eval every 50 steps.
fn demo_history() -> Vec<Value> {
    let mut history = Vec::new();
    let total = 300.0;
    for step in (10..=300).step_by(10) {
        let s = step as f64;
        let lr = if s <= 30.0 {
            5e-4 * s / 30.0
        } else {
            5e-4 * (total - s) / (total - 30.0)
        };
        let noise = ((s * 12.9898).sin() * 43758.5453).fract() * 0.08;
        let loss = 0.95 + 1.6 * (-s / 70.0).exp() + noise;
        history.push(json!({"loss": loss, "grad_norm": 0.8, "learning_rate": lr, "epoch": s / 100.0, "step": step}));
        if step % 50 == 0 {
            history.push(json!({"eval_loss": 1.02 + 1.4 * (-s / 80.0).exp(), "eval_runtime": 3.1, "epoch": s / 100.0, "step": step}));
        }
    }
    history.push(json!({"train_runtime": 100.0, "train_loss": 1.3, "epoch": 3.0, "step": 300}));
    history
}

/// A small well-formedness check: the prolog, one `<svg>` root, balanced tags,
/// quoted attributes, and only the five XML entities.
fn assert_well_formed_svg(svg: &str) {
    assert!(svg.starts_with("<?xml version=\"1.0\""), "XML declaration");
    let body = &svg[svg.find("?>").unwrap() + 2..];
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    let mut roots = 0;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..text[i..]
                .find(';')
                .map(|e| i + e + 1)
                .expect("unterminated entity")];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&ent),
                "entity {ent}"
            );
        }
        let close = rest[open..].find('>').expect("unterminated tag") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "closing tag");
        } else {
            let self_closing = tag.ends_with('/');
            let name = tag
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_string();
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in <{tag}>"
            );
            if stack.is_empty() {
                roots += 1;
                assert_eq!(name, "svg");
            }
            if !self_closing {
                stack.push(name);
            }
        }
        rest = &rest[close + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1);
    assert!(rest.trim().is_empty());
}

struct Png {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

/// Parses an RGB PNG written by the plotter: signature, chunk CRCs, IHDR, and
/// the zlib stream undone with its scanline filters (None, Sub, Up).
fn decode_png(bytes: &[u8]) -> Png {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let crc32 = |data: &[u8]| {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    };
    let (mut pos, mut width, mut height, mut idat, mut seen_end) = (8, 0, 0, Vec::new(), false);
    while pos < bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let data = &bytes[pos + 8..pos + 8 + len];
        let crc = u32::from_be_bytes(bytes[pos + 8 + len..pos + 12 + len].try_into().unwrap());
        assert_eq!(
            crc,
            crc32(&bytes[pos + 4..pos + 8 + len]),
            "CRC of chunk {}",
            String::from_utf8_lossy(kind)
        );
        match kind {
            b"IHDR" => {
                width = u32::from_be_bytes(data[0..4].try_into().unwrap());
                height = u32::from_be_bytes(data[4..8].try_into().unwrap());
                assert_eq!(&data[8..13], &[8, 2, 0, 0, 0], "8-bit RGB, not interlaced");
            }
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => seen_end = true,
            _ => {}
        }
        pos += 12 + len;
    }
    assert!(seen_end && width > 0 && height > 0);
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = width as usize * 3;
    assert_eq!(
        raw.len(),
        (stride + 1) * height as usize,
        "one filter byte + RGB per row"
    );
    let mut rgb = vec![0u8; stride * height as usize];
    for y in 0..height as usize {
        let filter = raw[y * (stride + 1)];
        for x in 0..stride {
            let v = raw[y * (stride + 1) + 1 + x];
            let left = if x >= 3 { rgb[y * stride + x - 3] } else { 0 };
            let up = if y > 0 { rgb[(y - 1) * stride + x] } else { 0 };
            rgb[y * stride + x] = match filter {
                0 => v,
                1 => v.wrapping_add(left),
                2 => v.wrapping_add(up),
                f => panic!("filter {f} not expected"),
            };
        }
    }
    Png { width, height, rgb }
}

/// Pixels close to a colour (anti-aliasing blends the edges of lines).
fn count_near(png: &Png, (r, g, b): (u8, u8, u8)) -> usize {
    png.rgb
        .chunks(3)
        .filter(|p| p[0].abs_diff(r) < 24 && p[1].abs_diff(g) < 24 && p[2].abs_diff(b) < 24)
        .count()
}

const TRAIN_BLUE: (u8, u8, u8) = (0x1f, 0x77, 0xb4);
const EVAL_ORANGE: (u8, u8, u8) = (0xff, 0x7f, 0x0e);
const LR_GREEN: (u8, u8, u8) = (0x2c, 0xa0, 0x2c);

#[test]
fn plot_normal_history() {
    let dir = scratch("plot_normal");
    let history = demo_history();
    plot_training_curves(&history, &dir.join("training_curves.svg")).unwrap();
    plot_training_curves(&history, &dir.join("nested/training_curves.png")).unwrap();

    let svg = std::fs::read_to_string(dir.join("training_curves.svg")).unwrap();
    assert_well_formed_svg(&svg);
    for needle in [
        "Training curves",
        "train loss",
        "eval loss",
        "learning rate",
        ">step<",
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
    ] {
        assert!(svg.contains(needle), "{needle} missing from the SVG");
    }
    assert!(svg.contains("best eval loss"), "summary line");
    assert_eq!(
        svg.matches("<polyline").count(),
        3,
        "train loss, eval loss and learning rate lines"
    );

    let png = decode_png(&std::fs::read(dir.join("nested/training_curves.png")).unwrap());
    assert_eq!((png.width, png.height), (1200, 800));
    assert!(count_near(&png, TRAIN_BLUE) > 500, "train loss line drawn");
    assert!(count_near(&png, EVAL_ORANGE) > 100, "eval markers drawn");
    assert!(count_near(&png, LR_GREEN) > 500, "learning rate line drawn");
    let white = count_near(&png, (255, 255, 255));
    assert!(white > png.rgb.len() / 3 / 2, "mostly background");
}

#[test]
fn plot_empty_and_single_point_histories() {
    let dir = scratch("plot_edge");
    let cases = [
        ("empty", vec![]),
        (
            "single",
            vec![json!({"loss": 2.0, "learning_rate": 1e-4, "step": 1})],
        ),
        ("eval_only", vec![json!({"eval_loss": 1.5, "step": 0})]),
        (
            "flat",
            vec![
                json!({"loss": 1.0, "step": 1}),
                json!({"loss": 1.0, "step": 2}),
            ],
        ),
        (
            "junk",
            vec![
                json!("not an object"),
                json!({"loss": "nan"}),
                json!({"loss": null, "step": 3}),
                json!({"step": 4}),
            ],
        ),
    ];
    for (name, history) in cases {
        let svg_path = dir.join(format!("{name}.svg"));
        let png_path = dir.join(format!("{name}.png"));
        plot_training_curves(&history, &svg_path).unwrap();
        plot_training_curves(&history, &png_path).unwrap();
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        assert_well_formed_svg(&svg);
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "{name}: non-finite coordinates"
        );
        let png = decode_png(&std::fs::read(&png_path).unwrap());
        assert_eq!((png.width, png.height), (1200, 800));
        if matches!(name, "empty" | "junk") {
            assert!(
                svg.contains("no loss logged") && svg.contains("no learning rate logged"),
                "{name}"
            );
        }
        if name == "single" {
            assert!(svg.contains("<circle"), "a lone point is drawn as a dot");
            assert!(count_near(&png, TRAIN_BLUE) > 20 && count_near(&png, LR_GREEN) > 20);
        }
    }
}

#[test]
fn plot_long_run_with_small_learning_rate() {
    // Logging every step of a 3,000-step run with a cosine schedule peaking at 2e-5.
    let history: Vec<Value> = (1..=3000)
        .map(|step| {
            let s = step as f64;
            let lr = 2e-5 * 0.5 * (1.0 + (std::f64::consts::PI * s / 3000.0).cos());
            let loss = 0.6 + 1.2 / (1.0 + s / 150.0) + 0.05 * (s * 0.37).sin();
            json!({"loss": loss, "learning_rate": lr, "step": step})
        })
        .collect();
    let dir = scratch("plot_long");
    let started = std::time::Instant::now();
    plot_training_curves(&history, &dir.join("long.png")).unwrap();
    plot_training_curves(&history, &dir.join("long.svg")).unwrap();
    eprintln!(
        "plotted 3,000 steps as PNG and SVG in {:.2?}",
        started.elapsed()
    );
    let svg = std::fs::read_to_string(dir.join("long.svg")).unwrap();
    assert_well_formed_svg(&svg);
    assert!(
        svg.contains(">2e-5<") || svg.contains(">2.0e-5<"),
        "learning-rate ticks in scientific notation"
    );
    assert!(svg.contains("peak lr 2e-5"));
    let png = decode_png(&std::fs::read(dir.join("long.png")).unwrap());
    assert!(count_near(&png, TRAIN_BLUE) > 1000 && count_near(&png, LR_GREEN) > 500);
}
