//! Files the VMM reads or replaces on a user's word: only regular files, so that a FIFO cannot
//! hang it and a device node is never opened or replaced.

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// A path names something other than a regular file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("is a {kind}, not a regular file")]
pub struct NotRegularFile {
    /// What it is instead: "directory", "FIFO", "character device", ...
    pub kind: &'static str,
}

/// What a file type is, in words for an error message.
pub fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_file() {
        "regular file"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Refuses metadata that is not a regular file's.
pub fn require_regular(meta: &Metadata) -> Result<(), NotRegularFile> {
    if meta.is_file() {
        Ok(())
    } else {
        Err(NotRegularFile {
            kind: kind_of(meta.file_type()),
        })
    }
}

/// Opens `path` for reading if it is a regular file. The type is checked before the open (a
/// device is never opened) and again on the open file (the path may change in between); the
/// open itself does not block, so a FIFO swapped in cannot hang the caller either. A refusal
/// is an `InvalidInput` I/O error carrying [`NotRegularFile`].
pub fn open_regular(path: &Path) -> io::Result<File> {
    let not_regular = |e: NotRegularFile| io::Error::new(io::ErrorKind::InvalidInput, e);
    require_regular(&std::fs::metadata(path)?).map_err(not_regular)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    require_regular(&file.metadata()?).map_err(not_regular)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_lost_only_regular_files_are_opened() {
        let exe = std::env::current_exe().unwrap();
        assert!(open_regular(&exe).is_ok());
        for (path, kind) in [("/", "directory"), ("/dev/null", "character device")] {
            let err = open_regular(Path::new(path)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{path}");
            assert_eq!(err.to_string(), format!("is a {kind}, not a regular file"));
        }
        assert_eq!(
            open_regular(Path::new("/nonexistent/file"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }
}
