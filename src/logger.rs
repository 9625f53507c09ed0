//! The binary's `log` backend: the notes and warnings of the libraries on
//! stderr, as plain lines (`warning: …` for warnings), from `info` up by
//! default; `GLM4_LOG=warn` (or `error`, `off`, `debug`) changes the level.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let prefix = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            _ => "",
        };
        // One write per line: stderr is unbuffered, so `eprintln!` would write each
        // formatted piece separately, and ranks sharing a stderr (torchrun) could
        // then interleave inside a line.
        let line = format!("{prefix}{}\n", record.args());
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger (once; later calls do nothing).
pub fn init() {
    let level = std::env::var("GLM4_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
