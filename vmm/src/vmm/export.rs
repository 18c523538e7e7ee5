//! `save --export`: the state written to a file the user names. The VMM may run as root, so
//! it replaces only a regular file (never a device, FIFO, directory or symlink), takes only
//! absolute paths (its working directory is not the caller's), and leaves no temporary file
//! behind when it fails.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use luvmm_resources::files::{require_regular, NotRegularFile};

/// Why the state could not be exported; the path is named by the caller's error.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A relative path would be resolved against the VMM's directory, not the caller's.
    #[error("the path is relative; give an absolute path")]
    Relative,
    /// The path names something the export must not replace.
    #[error("refused: only a regular file is replaced")]
    NotRegular(#[source] NotRegularFile),
    /// The path cannot be inspected.
    #[error("cannot inspect it")]
    Inspect(#[source] io::Error),
    /// The temporary file cannot be created (it may already exist: it is never reused).
    #[error("cannot create {tmp}")]
    CreateTemp {
        tmp: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing or syncing the temporary file failed; it was removed.
    #[error("cannot write {tmp}")]
    Write {
        tmp: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The temporary file cannot take the path's place; it was removed.
    #[error("cannot rename {tmp} over it")]
    Rename {
        tmp: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks that `path` may be written: absolute, and absent or a regular file (a symlink is
/// refused, not followed). Run before the VM is paused, and again just before the rename.
pub(super) fn check_target(path: &Path) -> Result<(), ExportError> {
    if !path.is_absolute() {
        return Err(ExportError::Relative);
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => require_regular(&meta).map_err(ExportError::NotRegular),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ExportError::Inspect(e)),
    }
}

/// Writes `blob` to `path` atomically: a new temporary file next to it, fsync, rename.
pub(super) fn export_state(path: &Path, blob: &[u8]) -> Result<(), ExportError> {
    export_with(path, |file| file.write_all(blob))
}

/// [`export_state`] with the writing step given, so a test can make it fail.
fn export_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), ExportError> {
    check_target(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // `create_new` never opens what is already there: not a planted FIFO, device or symlink.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| ExportError::CreateTemp {
            tmp: tmp.clone(),
            source,
        })?;
    let written = write(&mut file).and_then(|()| file.sync_all());
    drop(file);
    let result = match written {
        Err(source) => Err(ExportError::Write {
            tmp: tmp.clone(),
            source,
        }),
        // The path may have changed while the state was written.
        Ok(()) => check_target(path).and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|source| ExportError::Rename {
                tmp: tmp.clone(),
                source,
            })
        }),
    };
    if result.is_err() {
        if let Err(e) = std::fs::remove_file(&tmp) {
            log::warn!("cannot remove {}: {e}", tmp.display());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luvmm-export-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn nothing_lost_export_replaces_a_regular_file_and_nothing_else() {
        let dir = scratch("kinds");
        let file = dir.join("state.bin");
        export_state(&file, b"one").unwrap();
        export_state(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");

        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for (path, kind) in [
            (fifo.as_path(), "FIFO"),
            (link.as_path(), "symbolic link"),
            (dir.as_path(), "directory"),
        ] {
            let err = export_state(path, b"x").unwrap_err();
            assert!(
                matches!(&err, ExportError::NotRegular(e) if e.kind == kind),
                "{}: {err:?}",
                path.display()
            );
        }
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!dir.join("fifo.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_lost_export_refuses_a_device() {
        // Only looked at: a correct export never opens or replaces it.
        let err = export_state(Path::new("/dev/null"), b"x").unwrap_err();
        assert!(
            matches!(&err, ExportError::NotRegular(e) if e.kind == "character device"),
            "{err:?}"
        );
        assert!(std::fs::symlink_metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        assert!(!Path::new("/dev/null.tmp").exists());
    }

    #[test]
    fn nothing_lost_export_refuses_a_relative_path() {
        let name = format!("luvmm-export-relative-{}.state", std::process::id());
        let result = export_state(Path::new(&name), b"x");
        // Had it been written, it would be in this process's directory: clean up first.
        let written = std::fs::remove_file(&name).is_ok();
        assert!(matches!(result, Err(ExportError::Relative)), "{result:?}");
        assert!(!written);
    }

    #[test]
    fn nothing_lost_a_failed_export_leaves_no_temporary_file() {
        let dir = scratch("fail");
        let path = dir.join("state.bin");
        let err = export_with(&path, |_| Err(io::Error::other("disk on fire"))).unwrap_err();
        assert!(matches!(err, ExportError::Write { .. }), "{err:?}");
        assert!(!dir.join("state.bin.tmp").exists());
        assert!(!path.exists());
        // A temporary file already there is not the export's: refused, and left alone.
        std::fs::write(dir.join("state.bin.tmp"), b"someone's").unwrap();
        let err = export_state(&path, b"x").unwrap_err();
        assert!(matches!(err, ExportError::CreateTemp { .. }), "{err:?}");
        assert_eq!(
            std::fs::read(dir.join("state.bin.tmp")).unwrap(),
            b"someone's"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
