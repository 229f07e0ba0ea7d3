//! The state directory (`state_dir`): ours alone, for the daemon's whole life.
//!
//! Input: the configured path. Output: a [`StateDir`] that holds an exclusive lock on
//! `<state_dir>/lock` until it is dropped, and the file primitives every writer in the state
//! directory uses ([`replace_file`], [`open_append`], [`read_file`]).
//!
//! [`StateDir::open`] creates the directory if it is missing (mode 0750), and refuses it when it
//! is a symbolic link, not a directory, or writable by everyone (anyone could plant files
//! there). It then takes an exclusive `flock(2)` on `<state_dir>/lock` (created if missing,
//! never followed if it is a symlink) and writes the holder's pid into it. A second daemon on
//! the same state directory — two services on one config, or a manual `run` beside the
//! service — gets [`StateDirError::Locked`] naming the holder's pid and the lock file, and
//! `anomalyclip-edge run` exits 2; without the lock both would append to one alarm queue and
//! take the MQTT client id from each other in turns. The lock is released by the kernel when the
//! process ends, however it ends, so a crash never leaves a stale lock behind (the pid in the
//! file is informative only; the file itself stays).
//!
//! Files: every file in the state directory is opened with `O_NOFOLLOW`, so a symbolic link
//! planted at its name is an error (`ELOOP`) instead of a write outside the directory.
//! [`replace_file`] writes a whole file atomically: the temporary file `<name>.tmp` (a stale
//! one is unlinked first; unlink does not follow symlinks) is created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW`, written, fsync'd, renamed over `<name>` (rename replaces a
//! symlink at `<name>` itself, never its target), then the directory is fsync'd.
//!
//! Failure modes: every error names the path ([`StateDirError`], or an [`io::Error`] whose
//! message does for the file helpers).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::warn;

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// Mode of a state directory this process creates.
const DIR_MODE: u32 = 0o750;
/// Mode of the files this process creates in it (the queue may hold camera names and scores:
/// nothing secret, but nothing for everyone either).
const FILE_MODE: u32 = 0o640;

/// Errors opening the state directory.
#[derive(Debug, Error)]
pub enum StateDirError {
    #[error("state directory {path}: cannot create it: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("state directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("state directory {path} is a symbolic link: point state_dir at the real directory")]
    Symlink { path: PathBuf },
    #[error("state directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "state directory {path} is writable by everyone (mode {mode:04o}): anyone could plant \
         files in it; use a directory of the service user (chmod o-w)"
    )]
    WorldWritable { path: PathBuf, mode: u32 },
    #[error(
        "state directory {dir} is in use by another anomalyclip-edge (pid {}, lock file {lock}): \
         stop it, or give this one its own state_dir",
        .pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    )]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        /// The holder's pid as written in the lock file (`None` if unreadable).
        pid: Option<u32>,
    },
}

/// The state directory, locked for this process until dropped.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Holds the `flock`; closing it releases the lock.
    _lock: File,
}

impl StateDir {
    /// Creates (mode 0750) or checks the directory and takes its lock; see the module docs.
    pub fn open(path: &Path) -> Result<Self, StateDirError> {
        let io_err = |source| StateDirError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dir(path).map_err(|source| StateDirError::Create {
                    path: path.to_owned(),
                    source,
                })?;
                std::fs::symlink_metadata(path).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        };
        if meta.file_type().is_symlink() {
            return Err(StateDirError::Symlink {
                path: path.to_owned(),
            });
        }
        if !meta.is_dir() {
            return Err(StateDirError::NotADirectory {
                path: path.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o002 != 0 {
            return Err(StateDirError::WorldWritable {
                path: path.to_owned(),
                mode,
            });
        }
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| StateDirError::Io {
                path: lock_path.clone(),
                source: nofollow_error(&lock_path, e),
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateDirError::Locked {
                    dir: path.to_owned(),
                    pid: read_pid(&mut lock),
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StateDirError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        // Ours: record the pid for the error message of the next one (informative only).
        let pid = format!("{}\n", std::process::id());
        let res = lock
            .set_len(0)
            .and_then(|()| lock.seek(SeekFrom::Start(0)))
            .and_then(|_| lock.write_all(pid.as_bytes()));
        if let Err(e) = res {
            warn!(path = %lock_path.display(), error = %e, "cannot write the pid into the state directory lock file (the lock is held)");
        }
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_pid(f: &mut File) -> Option<u32> {
    let mut text = String::new();
    f.seek(SeekFrom::Start(0)).ok()?;
    f.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Creates `dir` and its missing parents with mode 0750 (the umask still applies).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// An `O_NOFOLLOW` refusal (`ELOOP`) as an error that says what happened.
fn nofollow_error(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            format!(
                "{} is a symbolic link: refusing to follow it (remove it)",
                path.display()
            ),
        )
    } else {
        e
    }
}

/// Reads a whole file without following a symlink at its name; `Ok(None)` if it is missing.
pub fn read_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    // O_NONBLOCK: a FIFO planted at the name must not block the open; it is refused below.
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(nofollow_error(path, e)),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file (remove it)", path.display()),
        ));
    }
    if meta.len() > MAX_STATE_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {} bytes, more than the {MAX_STATE_FILE} a state file may (remove it)",
                path.display(),
                meta.len()
            ),
        ));
    }
    let mut buf = Vec::new();
    f.take(MAX_STATE_FILE + 1).read_to_end(&mut buf)?;
    Ok(Some(buf))
}

/// Largest state file read back (alarm queue, alarm state): the queue holds at most
/// `queue_max_alarms` records between compactions, far below this.
pub const MAX_STATE_FILE: u64 = 256 << 20;

/// Opens (creating, mode 0640) a file for appending, without following a symlink at its name.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| nofollow_error(path, e))
}

/// The temporary name [`replace_file`] writes before renaming: `<name>.tmp` beside `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` atomically and durably: after a crash the file holds either
/// the old or the new content, never a mix; a symlink planted at the temporary name or at
/// `path` is never followed (see the module docs).
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| nofollow_error(&tmp, e))
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// Fsyncs the directory holding `path`, so a rename or a new file in it survives a crash.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_open_of_one_state_dir_fails_naming_the_holder_pid_and_the_lock_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateDir::open(dir.path()).expect("first open");
        let err = StateDir::open(dir.path()).expect_err("second open must fail");
        let pid = std::process::id();
        assert!(
            matches!(&err, StateDirError::Locked { pid: Some(p), .. } if *p == pid),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("pid {pid}")), "{msg}");
        assert!(
            msg.contains(&dir.path().join(LOCK_FILE).display().to_string()),
            "{msg}"
        );
        // Released on drop: the next one gets it.
        drop(first);
        StateDir::open(dir.path()).expect("open after the first was dropped");
    }

    #[test]
    fn a_missing_state_dir_is_created_with_mode_0750() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b");
        let s = StateDir::open(&path).expect("open");
        assert_eq!(s.path(), path);
        let mode = std::fs::metadata(&path).expect("meta").mode() & 0o777;
        // The umask may take bits away, never add them.
        assert_eq!(mode & !0o750, 0, "{mode:o}");
        assert!(path.join(LOCK_FILE).is_file());
    }

    #[test]
    fn a_symlinked_file_or_world_writable_state_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = StateDir::open(&link).expect_err("symlink");
        assert!(matches!(err, StateDirError::Symlink { .. }), "{err:?}");
        assert!(!real.join(LOCK_FILE).exists());

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = StateDir::open(&file).expect_err("file");
        assert!(
            matches!(err, StateDirError::NotADirectory { .. }),
            "{err:?}"
        );

        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = StateDir::open(&open).expect_err("world-writable");
        assert!(
            matches!(err, StateDirError::WorldWritable { mode: 0o777, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("chmod o-w"), "{err}");
    }

    #[test]
    fn a_symlink_at_the_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").expect("write");
        std::os::unix::fs::symlink(&outside, state.join(LOCK_FILE)).expect("symlink");
        let err = StateDir::open(&state).expect_err("symlinked lock");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
    }

    #[test]
    fn replace_file_unlinks_a_symlink_planted_at_the_temp_name_and_writes_nothing_outside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").expect("write");
        let target = state.join("f.json");
        std::os::unix::fs::symlink(&outside, temp_path(&target)).expect("symlink tmp");
        replace_file(&target, b"new").expect("replace");
        assert_eq!(std::fs::read(&target).expect("read"), b"new");
        assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
        assert!(!temp_path(&target).exists());

        // A symlink at the name itself is replaced, not written through.
        std::fs::remove_file(&target).expect("rm");
        std::os::unix::fs::symlink(&outside, &target).expect("symlink name");
        assert!(read_file(&target).is_err(), "read_file follows no symlink");
        assert!(
            open_append(&target).is_err(),
            "open_append follows no symlink"
        );
        replace_file(&target, b"newer").expect("replace over a symlink");
        assert!(
            !std::fs::symlink_metadata(&target)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&target).expect("read"), b"newer");
        assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
    }
}
