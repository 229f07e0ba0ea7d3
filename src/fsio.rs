//! Reading files that come from outside the process: config, secrets, model package, images,
//! masks, dataset descriptions.
//!
//! Input: a path, an upper bound in bytes for that kind of file and a word saying what the file
//! is (`"config file"`, `"image"`…, used in messages). Output: the bytes ([`read_limited`],
//! [`read_limited_string`]) or an open [`File`] and its size ([`open_regular`], for streaming
//! readers such as the model hash). Failure modes ([`FsioError`], one line naming the file and
//! what it is): the path cannot be opened (a directory counts: `EISDIR`); it is not a regular
//! file (FIFO, character or block device, socket); it is larger than the bound; reading fails; text that is not UTF-8.
//!
//! Why: `std::fs::read` on a FIFO blocks forever in `open`, on `/dev/zero` reads until memory
//! runs out, and on a multi-gigabyte file allocates it whole before any size check. Here:
//! 1. `stat` the path first, so a device or FIFO is refused without being opened at all (opening
//!    some devices has side effects: a serial line raises DTR, a tape rewinds);
//! 2. open with `O_NONBLOCK | O_NOCTTY` (std adds `O_CLOEXEC`), so that a path swapped for a FIFO
//!    between the two steps still does not block the open, and a terminal never becomes our
//!    controlling terminal;
//! 3. `fstat` the open descriptor (what we will read, not what the path named a moment ago) and
//!    refuse anything but a regular file, then compare its size with the bound **before reading**;
//! 4. clear `O_NONBLOCK` (it means nothing for regular files, but the descriptor is handed to
//!    streaming readers that expect blocking semantics);
//! 5. read at most `bound + 1` bytes, so a file that grows while we read is still bounded and
//!    reported as too large.
//!
//! The bounds are the `MAX_*` constants below, one per kind of file, each far above what a real
//! file of that kind holds and far below what would hurt a small edge box.
//!
//! The module's only `unsafe` is the two `fcntl` calls of step 4 (`set_blocking`; std has no
//! safe way to change the flags of an open file, and `libc` is already a dependency).
//!
//! Not covered: a path checked here and opened again by a library by name (ONNX Runtime opens
//! `model.onnx` itself) can be swapped in between; the package directory is trusted not to change
//! under a running load (it is written once by `engines/export.py`).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The daemon's TOML config file. Real ones are a few KiB (`config/example.toml` is ~10 KiB with
/// every field documented); 1 MiB leaves room for hundreds of cameras.
pub const MAX_CONFIG_FILE: u64 = MIB;

/// `[mqtt] password_file`: one password (trailing newline stripped). 64 KiB is generous even for
/// a JWT used as a password.
pub const MAX_PASSWORD_FILE: u64 = 64 * KIB;

/// TLS files (`[mqtt.tls]` CA bundle, client certificate, client key) in PEM. Debian's whole CA
/// bundle (`/etc/ssl/certs/ca-certificates.crt`) is ~220 KiB; 4 MiB is far above any real one.
pub const MAX_PEM_FILE: u64 = 4 * MIB;

/// A model package's `manifest.toml` (~1 KiB in practice).
pub const MAX_MANIFEST: u64 = MIB;

/// A package's text constant (`text.f32`, float32 `[2, D]`): the exact size is checked from the
/// manifest; this bound matches `package::MAX_EMBED_DIM` (2 × 16384 × 4 bytes = 128 KiB).
pub const MAX_TEXT_FILE: u64 = 128 * KIB;

/// A file listed in a package's `[files]`: the ONNX model (ViT-L/14 at 518²: ~1.2 GB in fp32)
/// and any external-data file next to it. Only hashed (streamed), never read whole; the bound
/// rejects a device or a runaway file, not a large model.
pub const MAX_PACKAGE_FILE: u64 = 64 * GIB;

/// An encoded image file (PNG/JPEG/BMP). The decoded size is bounded separately by
/// `image_io::MAX_PIXELS` (checked from the header before pixels are allocated); an uncompressed
/// 24-bit BMP at that limit is ~537 MB, but such images are not scored in practice: 256 MiB
/// bounds what is read into memory per file.
pub const MAX_IMAGE_FILE: u64 = 256 * MIB;

/// A ground-truth mask (8-bit or 1-bit PNG, mostly zeros: a 1024² MVTec mask is a few KiB).
pub const MAX_MASK_FILE: u64 = 64 * MIB;

/// A dataset's `meta.json` (~250 bytes per image: MVTec AD's 5354 images make ~1.3 MB); 256 MiB
/// covers a million images.
pub const MAX_META_JSON: u64 = 256 * MIB;

/// Why a file from outside could not be read. `Display` is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum FsioError {
    /// `stat`/`open` failed (missing, permission denied, …).
    #[error("cannot read {what} {path}: {source}")]
    Open {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// The path is a FIFO, device or socket (a directory is an [`FsioError::Open`] error with
    /// the OS's `EISDIR`).
    #[error("{what} {path} is {kind}, not a regular file")]
    NotRegular {
        path: PathBuf,
        what: &'static str,
        /// E.g. "a FIFO (named pipe)", "a character device".
        kind: &'static str,
    },
    /// Larger than the bound for this kind of file (at open, or it grew while being read).
    #[error("{what} {path} is {}, over the {what} limit of {}", human_pair(*.size, *.max).0, human_pair(*.size, *.max).1)]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        /// Bytes found (at least `max + 1` when the file grew while being read).
        size: u64,
        max: u64,
    },
    /// Reading the open file failed.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// [`read_limited_string`] on bytes that are not UTF-8.
    #[error("{what} {path} is not UTF-8 text (byte {offset})")]
    NotUtf8 {
        path: PathBuf,
        what: &'static str,
        offset: usize,
    },
}

impl FsioError {
    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FsioError::Open { path, .. }
            | FsioError::NotRegular { path, .. }
            | FsioError::TooLarge { path, .. }
            | FsioError::Read { path, .. }
            | FsioError::NotUtf8 { path, .. } => path,
        }
    }

    /// The reason alone, without the path and the kind of file, for callers whose message names
    /// them already (`config.toml: cannot read config file: <cause>`).
    pub fn cause(&self) -> String {
        match self {
            FsioError::Open { source, .. } | FsioError::Read { source, .. } => source.to_string(),
            FsioError::NotRegular { kind, .. } => format!("it is {kind}, not a regular file"),
            FsioError::TooLarge { size, max, .. } => {
                let (size, max) = human_pair(*size, *max);
                format!("it is {size}, over the limit of {max}")
            }
            FsioError::NotUtf8 { offset, .. } => format!("not UTF-8 text (byte {offset})"),
        }
    }

    /// The I/O error behind an open or read failure (`None` for the checks made here).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            FsioError::Open { source, .. } | FsioError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A byte count for messages: exact bytes below 1 KiB, else KiB/MiB/GiB with one decimal.
fn human(n: u64) -> String {
    // Precision loss is irrelevant for a message.
    let f = n as f64;
    if n < KIB {
        format!("{n} bytes")
    } else if n < MIB {
        format!("{:.1} KiB", f / KIB as f64)
    } else if n < GIB {
        format!("{:.1} MiB", f / MIB as f64)
    } else {
        format!("{:.1} GiB", f / GIB as f64)
    }
}

/// `human` of both, in exact bytes when the rounded forms would read the same.
fn human_pair(size: u64, max: u64) -> (String, String) {
    let (a, b) = (human(size), human(max));
    if a == b {
        (format!("{size} bytes"), format!("{max} bytes"))
    } else {
        (a, b)
    }
}

/// What a non-regular file is, for messages.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Opens `path` for reading if, and only if, it is a regular file of at most `max` bytes (see
/// the module doc for the steps). Returns the file, positioned at its start, in blocking mode,
/// and its size at open time. `what` names the kind of file in messages.
pub fn open_regular(path: &Path, max: u64, what: &'static str) -> Result<(File, u64), FsioError> {
    let open_err = |source| FsioError::Open {
        path: path.to_owned(),
        what,
        source,
    };
    // A directory keeps the OS's own wording ("Is a directory (os error 21)"), as `read` gave.
    let not_regular = |ft: std::fs::FileType| {
        if ft.is_dir() {
            open_err(std::io::Error::from_raw_os_error(libc::EISDIR))
        } else {
            FsioError::NotRegular {
                path: path.to_owned(),
                what,
                kind: kind_of(ft),
            }
        }
    };
    // Step 1: refuse special files by name, before opening them (follows symlinks, as open does).
    let meta = std::fs::metadata(path).map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(not_regular(meta.file_type()));
    }
    // Step 2: a FIFO swapped in since step 1 must not block the open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(open_err)?;
    // Step 3: what we opened, not what the path named.
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let size = meta.len();
    if size > max {
        return Err(FsioError::TooLarge {
            path: path.to_owned(),
            what,
            size,
            max,
        });
    }
    // Step 4: back to blocking mode for the readers.
    set_blocking(&file).map_err(open_err)?;
    Ok((file, size))
}

/// Clears `O_NONBLOCK` on `file`.
fn set_blocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file`, which outlives both calls; F_GETFL and
    // F_SETFL take no pointer arguments and cannot affect memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        // SAFETY: as above.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads the whole regular file at `path`, refusing it (without reading) when it is not a
/// regular file or holds more than `max` bytes, and reading at most `max + 1` bytes in any case.
pub fn read_limited(path: &Path, max: u64, what: &'static str) -> Result<Vec<u8>, FsioError> {
    let (file, size) = open_regular(path, max, what)?;
    // `size <= max`, and every caller's `max` fits in memory by design.
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|source| FsioError::Read {
            path: path.to_owned(),
            what,
            source,
        })?;
    let read = buf.len() as u64;
    if read > max {
        return Err(FsioError::TooLarge {
            path: path.to_owned(),
            what,
            size: read,
            max,
        });
    }
    Ok(buf)
}

/// [`read_limited`], then UTF-8 text.
pub fn read_limited_string(path: &Path, max: u64, what: &'static str) -> Result<String, FsioError> {
    let bytes = read_limited(path, max, what)?;
    String::from_utf8(bytes).map_err(|e| FsioError::NotUtf8 {
        path: path.to_owned(),
        what,
        offset: e.utf8_error().valid_up_to(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// Runs `f` on a thread and fails the test if it takes longer than `limit` (a hang must fail,
    /// not block the test run). The thread is left behind on failure.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("did not return within {limit:?} (hang)"))
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "hello\n").unwrap();
        assert_eq!(read_limited(&p, 6, "note").unwrap(), b"hello\n");
        assert_eq!(read_limited_string(&p, 100, "note").unwrap(), "hello\n");
        let (mut f, size) = open_regular(&p, 6, "note").unwrap();
        assert_eq!(size, 6);
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello\n");
        // Blocking mode again for streaming readers.
        // SAFETY: F_GETFL on a descriptor `f` owns.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        assert_eq!(read_limited(&empty, 0, "note").unwrap(), b"");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pipe.toml");
        mkfifo(&p);
        let q = p.clone();
        let e = within(Duration::from_secs(5), move || {
            read_limited(&q, MAX_CONFIG_FILE, "config file").unwrap_err()
        });
        assert!(matches!(e, FsioError::NotRegular { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("FIFO") && msg.contains(&p.display().to_string()),
            "{msg}"
        );
        assert!(msg.starts_with("config file "), "{msg}");
    }

    #[test]
    fn dev_zero_is_refused_without_reading() {
        let t0 = Instant::now();
        let e = within(Duration::from_secs(5), || {
            read_limited(Path::new("/dev/zero"), MAX_IMAGE_FILE, "image").unwrap_err()
        });
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(
            e.to_string()
                .contains("image /dev/zero is a character device, not a regular file"),
            "{e}"
        );
        assert_eq!(e.cause(), "it is a character device, not a regular file");
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_regular(dir.path(), 10, "manifest").unwrap_err();
        assert!(
            e.to_string().contains("Is a directory (os error 21)"),
            "{e}"
        );
        assert_eq!(
            e.io_error().map(std::io::Error::kind),
            Some(std::io::ErrorKind::IsADirectory)
        );
    }

    #[test]
    fn a_missing_file_names_the_path_and_the_os_error() {
        let e = read_limited(Path::new("/nonexistent/x.png"), 10, "image").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot read image /nonexistent/x.png: "),
            "{msg}"
        );
        assert!(msg.contains("No such file"), "{msg}");
        assert_eq!(
            e.io_error().map(std::io::Error::kind),
            Some(std::io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn a_file_over_the_bound_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        let mut f = File::create(&p).unwrap();
        f.write_all(&[7u8; 2048]).unwrap();
        drop(f);
        let e = read_limited(&p, 2047, "manifest").unwrap_err();
        match &e {
            FsioError::TooLarge { size, max, .. } => assert_eq!((*size, *max), (2048, 2047)),
            other => panic!("{other}"),
        }
        assert!(
            e.to_string()
                .contains("is 2048 bytes, over the manifest limit of 2047 bytes"),
            "{e}"
        );
        assert!(read_limited(&p, 2048, "manifest").is_ok());
        // A sparse file: the size is refused from fstat, nothing is read or allocated.
        let sparse = dir.path().join("sparse");
        File::create(&sparse).unwrap().set_len(100 * GIB).unwrap();
        let t0 = Instant::now();
        let e = read_limited(&sparse, MAX_IMAGE_FILE, "image").unwrap_err();
        assert!(e.to_string().contains("100.0 GiB"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn symlinks_to_regular_files_are_followed_and_to_devices_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        std::fs::write(&target, "x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_limited(&link, 1, "note").unwrap(), b"x");
        let dev = dir.path().join("zero.png");
        std::os::unix::fs::symlink("/dev/zero", &dev).unwrap();
        let e = read_limited(&dev, MAX_IMAGE_FILE, "image").unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, b"ab\xffcd").unwrap();
        let e = read_limited_string(&p, 100, "config file").unwrap_err();
        assert!(e.to_string().contains("not UTF-8 text (byte 2)"), "{e}");
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human(0), "0 bytes");
        assert_eq!(human(1023), "1023 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(MAX_IMAGE_FILE), "256.0 MiB");
        assert_eq!(human(MAX_PACKAGE_FILE), "64.0 GiB");
        assert_eq!(human_pair(300 * MIB, MAX_IMAGE_FILE).0, "300.0 MiB");
        assert_eq!(
            human_pair(2049, 2048),
            ("2049 bytes".into(), "2048 bytes".into())
        );
    }
}
