//! The durable JSON Lines appender both file-writing handlers use: the warehouse's file sink
//! (files of one replica, rotated by size and age) and the learning dataset (one file per
//! UTC day, which replicas sharing a volume append to together). Which file a line goes to
//! is the caller's choice; how it gets there durably is decided here, once.
//!
//! An append is **one `write` of whole lines, then `fsync`** (`fdatasync`), and a file's
//! name is made durable by an fsync of its directory when the file is created, so a line
//! whose append returned `Ok` survives a crash or a power loss. Callers acknowledge only
//! such lines.
//!
//! What a failed append leaves behind depends on who else writes the file ([`Sharing`]):
//! an exclusive file is cut back to its last synced length; a shared one cannot be (another
//! process's lines may follow), so the torn line stays and the next append starts on a new
//! line. Either way the caller drops the [`JsonlFile`] after an error: an exclusive file is
//! given up, a shared one is reopened, which looks at how it ends.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Who appends to a file besides this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sharing {
    /// Nobody: its name is this process's own (the warehouse names files after the
    /// consumer). A failed append is cut off again.
    Exclusive,
    /// Other processes may append at the same time. Opened with `O_APPEND`, one `write` per
    /// append, so lines never interleave on a local file system.
    Shared,
}

/// One JSON Lines file opened for durable appends.
#[derive(Debug)]
pub(crate) struct JsonlFile {
    file: File,
    path: PathBuf,
    sharing: Sharing,
    /// Bytes on disk, synced, as far as this process knows (all of them for an exclusive
    /// file; where a failed append is cut back to).
    len: u64,
    /// The file does not end with a newline (a torn write): the next append starts with one.
    needs_newline: bool,
}

impl JsonlFile {
    /// Creates `path` for this process alone; fails with `AlreadyExists` when it exists
    /// (the caller picks another name).
    pub(crate) fn create_new(path: PathBuf) -> io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)?;
        sync_parent(&path)?;
        Ok(Self {
            file,
            path,
            sharing: Sharing::Exclusive,
            len: 0,
            needs_newline: false,
        })
    }

    /// Opens `path` for appending alongside other processes, creating it (and its
    /// directory) when missing.
    pub(crate) fn open_shared(path: PathBuf) -> io::Result<Self> {
        let existed = path.exists();
        if !existed && let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if !existed {
            sync_parent(&path)?;
        }
        let len = file.metadata()?.len();
        let needs_newline = len > 0 && !ends_with_newline(&path, len)?;
        Ok(Self {
            file,
            path,
            sharing: Sharing::Shared,
            len,
            needs_newline,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes this file holds on disk, synced, as far as this process knows.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends `lines` (whole lines, each ending with `\n`) in one write, then fsyncs.
    /// `Ok` means every line is durable; after an error, drop this file (see the module
    /// documentation).
    pub(crate) fn append(&mut self, lines: &[u8]) -> io::Result<()> {
        let written = if self.needs_newline {
            let mut buf = Vec::with_capacity(lines.len() + 1);
            buf.push(b'\n');
            buf.extend_from_slice(lines);
            self.file.write_all(&buf).map(|()| buf.len())
        } else {
            self.file.write_all(lines).map(|()| lines.len())
        }
        .and_then(|n| self.file.sync_data().map(|()| n));
        match written {
            Ok(n) => {
                self.len += n as u64;
                self.needs_newline = false;
                Ok(())
            }
            Err(e) if self.sharing == Sharing::Exclusive => {
                let cut = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data());
                Err(match cut {
                    Ok(()) => e,
                    Err(cut) => io::Error::new(
                        e.kind(),
                        format!(
                            "{e} (cutting the partial lines off failed too: {cut}; its last line may be incomplete)"
                        ),
                    ),
                })
            }
            Err(e) => {
                self.needs_newline = true;
                Err(e)
            }
        }
    }
}

/// Whether the file's last byte (of `len`) is a newline.
fn ends_with_newline(path: &Path, len: u64) -> io::Result<bool> {
    let mut reader = File::open(path)?;
    reader.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    reader.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Makes a new file's name durable: an fsync of its directory.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// A temporary directory for the tests that write files, without a dev-dependency:
/// unique per process and call, removed on drop.
#[cfg(test)]
pub(crate) struct TempDir(PathBuf);

#[cfg(test)]
impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "streamworker-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exclusive_file_is_new_and_counts_what_it_holds() {
        let dir = TempDir::new("jsonl");
        let path = dir.path().join("a.jsonl");
        let mut f = JsonlFile::create_new(path.clone()).unwrap();
        f.append(b"{\"a\":1}\n").unwrap();
        f.append(b"{\"a\":2}\n{\"a\":3}\n").unwrap();
        assert_eq!(f.len(), 24);
        assert_eq!(f.path(), path);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
        );
        let again = JsonlFile::create_new(path).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn a_shared_file_is_created_with_its_directory_and_a_torn_line_is_not_glued_to() {
        let dir = TempDir::new("jsonl");
        let path = dir.path().join("day").join("feedback.jsonl");
        let mut f = JsonlFile::open_shared(path.clone()).unwrap();
        f.append(b"1\n").unwrap();
        // Another replica appends to the same file meanwhile, and its write is torn.
        let mut other = JsonlFile::open_shared(path.clone()).unwrap();
        other.append(b"2\n").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"torn")
            .unwrap();
        // A file opened now sees the torn end and starts on a new line.
        let mut reopened = JsonlFile::open_shared(path.clone()).unwrap();
        reopened.append(b"3\n").unwrap();
        reopened.append(b"4\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "1\n2\n{\"torn\n3\n4\n"
        );
    }
}
