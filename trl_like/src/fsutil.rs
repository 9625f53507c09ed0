//! Atomic file writes: every final output (adapter, model weights, tokenizer
//! files, configs, `trainer_state.json`, plots) is written to a temporary name
//! in the same folder, flushed to disk and renamed over the final name. A kill
//! or a full disk in the middle of a write then leaves the previous file (or
//! none) under the final name, never a truncated one.
//!
//! Fault injection for the tests: when `TRL_LIKE_FAIL_WRITE` equals the path of
//! a file being written (as the caller spelled it), that write stops half-way
//! with "no space left on device". It does nothing unless set.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Environment variable naming one file whose write fails half-way (tests only).
pub const FAIL_WRITE_VAR: &str = "TRL_LIKE_FAIL_WRITE";

/// Marks the temporary files of [`write_atomic`]; a kill can leave them behind,
/// and `--overwrite_output_dir` clears them.
pub const TMP_MARK: &str = ".tmp-";

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp)?;
        if injected_failure(path) {
            // Half the bytes reach the disk before the error, as with ENOSPC.
            f.write_all(&bytes[..bytes.len() / 2])?;
            return Err(injected_error(path));
        }
        f.write_all(bytes)
    })
}

/// Atomic write through a writer that takes a path (e.g. libtorch's
/// `write_safetensors`): `write` fills the temporary file, which is then
/// synced and renamed to `path`. On any error the temporary file is removed
/// and `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = tmp_path(path);
    let result = write(&tmp).and_then(|()| {
        if injected_failure(path) {
            truncate_half(&tmp)?;
            return Err(injected_error(path));
        }
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Copies `from` to `to` atomically.
pub fn copy_atomic(from: &Path, to: &Path) -> io::Result<()> {
    let bytes = std::fs::read(from)?;
    write_atomic(to, &bytes)
}

/// Flushes every file under `dir` and the folders themselves to disk: a
/// folder renamed into place afterwards (a checkpoint) is complete even after
/// a power loss.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)?.sync_all()?;
        }
    }
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether `name` is a temporary file left by an interrupted [`write_atomic`].
pub fn is_tmp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TMP_MARK)
}

/// `dir/.name.tmp-PID`: hidden, in the same folder (so the rename stays on one
/// file system), and unique per process.
fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{TMP_MARK}{}", std::process::id()))
}

/// The rename itself is durable only once the folder's entry is on disk.
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Some file systems refuse to open or sync a directory; the data is synced already.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Only test builds (the `fault-injection` feature, or this crate's unit
/// tests) read the variable.
#[cfg(any(test, feature = "fault-injection"))]
fn injected_failure(path: &Path) -> bool {
    std::env::var_os(FAIL_WRITE_VAR).is_some_and(|v| Path::new(&v) == path)
}

#[cfg(not(any(test, feature = "fault-injection")))]
#[inline(always)]
fn injected_failure(_path: &Path) -> bool {
    false
}

fn injected_error(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        format!(
            "no space left on device ({FAIL_WRITE_VAR}={} injected this failure)",
            path.display()
        ),
    )
}

fn truncate_half(tmp: &Path) -> io::Result<()> {
    let len = std::fs::metadata(tmp)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(tmp)?
        .set_len(len / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fsutil-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_replaces_without_leftovers() {
        let d = tmpdir("ok");
        let p = d.join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(&d), ["a.json"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failing_writer_leaves_the_previous_file_and_no_temporary() {
        let d = tmpdir("fail");
        let p = d.join("w.bin");
        write_atomic(&p, b"previous").unwrap();
        let err = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"partial")?;
            Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(std::fs::read(&p).unwrap(), b"previous");
        assert_eq!(names(&d), ["w.bin"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn temporary_names_are_recognised() {
        let t = tmp_path(Path::new("/x/adapter_model.safetensors"));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert!(is_tmp_name(name), "{name}");
        assert!(!is_tmp_name("adapter_model.safetensors"));
        assert_eq!(t.parent(), Some(Path::new("/x")));
    }
}
