//! The data directory's format version, so a Lumen never misreads data an
//! earlier (or later) Lumen wrote: ids stored as hex text by one version
//! would be garbage to the next. A directory written in another format is
//! refused with a message saying what to do; nothing in it is touched.

use std::fs;
use std::io::Write;
use std::path::Path;

/// Bumped whenever the WAL or Parquet layout changes incompatibly.
/// 2: trace and span ids as fixed-size binary (1 stored them as hex text).
pub const CURRENT: u32 = 2;

const FILE: &str = "FORMAT";
const PREFIX: &str = "lumen data format ";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "{dir} holds data in Lumen data format {found}, this Lumen reads format {CURRENT}: \
         {advice}"
    )]
    Mismatch {
        dir: String,
        found: String,
        advice: &'static str,
    },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// Checks the format of `data` (creating the marker in a new directory).
pub fn check(data: &Path) -> Result<(), FormatError> {
    let path = data.join(FILE);
    let io = |e: std::io::Error| FormatError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found = text.trim().strip_prefix(PREFIX).unwrap_or(text.trim());
            if found == CURRENT.to_string() {
                return Ok(());
            }
            let newer = found.parse::<u32>().is_ok_and(|v| v > CURRENT);
            Err(FormatError::Mismatch {
                dir: data.display().to_string(),
                found: found.to_string(),
                advice: if newer {
                    "it was written by a newer Lumen; run that version"
                } else {
                    "move it aside (or delete it) to start afresh"
                },
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_data = ["wal", "tables"].iter().any(|d| {
                fs::read_dir(data.join(d)).is_ok_and(|mut entries| entries.next().is_some())
            });
            if has_data {
                return Err(FormatError::Mismatch {
                    dir: data.display().to_string(),
                    found: "1".into(),
                    advice: "move it aside (or delete it) to start afresh",
                });
            }
            let mut f = fs::File::create(&path).map_err(io)?;
            writeln!(f, "{PREFIX}{CURRENT}").map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(())
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_marked_and_data_of_other_formats_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path()).unwrap();
        check(dir.path()).unwrap();
        assert!(
            fs::read_to_string(dir.path().join(FILE))
                .unwrap()
                .contains(&CURRENT.to_string())
        );

        let old = tempfile::tempdir().unwrap();
        fs::create_dir_all(old.path().join("wal")).unwrap();
        fs::write(old.path().join("wal/00000001.wal"), b"x").unwrap();
        let e = check(old.path()).unwrap_err().to_string();
        assert!(e.contains("format 1") && e.contains("move it aside"), "{e}");

        let newer = tempfile::tempdir().unwrap();
        fs::write(
            newer.path().join(FILE),
            format!("{PREFIX}{}\n", CURRENT + 1),
        )
        .unwrap();
        let e = check(newer.path()).unwrap_err().to_string();
        assert!(e.contains("newer Lumen"), "{e}");
    }
}
